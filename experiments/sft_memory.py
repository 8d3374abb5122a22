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

from experiments.bench_train import make_batch
from promed_jax import assets
from promed_jax.device_memory import available_bytes, gib, step_bytes
from promed_jax.models.checkpoints import load_gguf
from promed_jax.sharding import make_mesh
from promed_jax.training import state as S
from promed_jax.training.sft import make_sft_loss


def estimate(*, remat: bool, rows: int, length: int, lora_rank: int) -> tuple[int | None, float]:
    model = load_gguf(assets.smollm2_gguf_path(), remat=remat, lora_rank=lora_rank, lora_alpha=32.0, lora_dropout=0.1)
    lora = lora_rank > 0
    mesh = make_mesh((1,), ("data",))
    opt = S.OptimizerConfig(learning_rate=2e-4, total_steps=100)
    tx = S.make_optimizer(opt)
    graphdef, params, frozen = S.split_for_training(model, lora=lora)
    state = S.place_state(S.init_state(params, frozen, tx, seed=0), mesh)
    step = S.compile_step(S.make_train_step(make_sft_loss(8192), graphdef, tx, S.schedule(opt)), state, mesh, rows)
    batch = make_batch(model.config.vocab_size, rows, length, 1)
    start = time.perf_counter()
    compiled = step.lower(state, batch).compile()
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
