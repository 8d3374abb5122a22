"""XLA's memory estimate of the SFT step with SmolLM2-135M (LoRA, as configs/sft.py:smollm), remat off and on.

Compiles (never runs) the train step at batch `--rows` for each of the length buckets and prints what
`promed_jax.device_memory.step_bytes` reads from `Compiled.memory_analysis()`: the bytes a call allocates
beyond its inputs, the number `CheckedStep` compares with the free memory before a step's first call.
Random tokens; the weights are the GGUF's (only their shapes matter).

    nice -n 10 python experiments/sft_memory.py                 # batch 8, lengths 512 1024 2048
    python experiments/sft_memory.py --lengths 256 --rows 2     # quicker
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from experiments.train_step_device import sft_step
from promed_jax import assets
from promed_jax.device_memory import available_bytes, gib, step_bytes
from promed_jax.models.checkpoints import load_gguf


def estimate(*, remat: bool, rows: int, length: int, lora_rank: int) -> tuple[int | None, float]:
    model = load_gguf(assets.smollm2_gguf_path(), remat=remat, lora_rank=lora_rank, lora_alpha=32.0, lora_dropout=0.1)
    jitted, state, batch = sft_step(model, rows, length, lora=lora_rank > 0)
    start = time.perf_counter()
    compiled = jitted.lower(state, batch).compile()
    return step_bytes(compiled), time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048])
    parser.add_argument("--lora-rank", type=int, default=8, help="0: full fine-tuning")
    args = parser.parse_args()
    free = available_bytes()
    print(f"free memory now: {gib(free) if free else 'unknown'}; load average {os.getloadavg()}")
    print("rows x length | remat | step needs (XLA) | compile s")
    for length in args.lengths:
        for remat in (False, True):
            need, seconds = estimate(remat=remat, rows=args.rows, length=length, lora_rank=args.lora_rank)
            shown = gib(need) if need is not None else "n/a"
            print(f"{args.rows} x {length} | {remat} | {shown} | {seconds:.0f}", flush=True)


if __name__ == "__main__":
    main()
