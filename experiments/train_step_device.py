"""The SFT train step on whatever device JAX has (the GPU check's step 3): tokens/s, MFU, XLA's memory estimate.

A SmolLM2-shaped model with random weights (`--config-json`: a Hugging Face config.json; the GPU machine
carries SmolLM2's, `.gpu/smollm2/config.json`) in `--dtype` (compute and parameters), LoRA (`--lora-rank`,
default the paper's 8 on q, v) or full fine-tuning, `model.remat` on or off, one batch of `--rows` x `--length`
random tokens. The step is the trainer's (`training.state.make_train_step` under `CheckedStep`): compiled ahead
of time (compile time apart), its memory estimate printed, then `--reps` timed steps (median). MFU is
6 x parameters x tokens/s over the peak of a large matmul in the same dtype measured in the same run (the
device's, not a datasheet's; LoRA's backward skips the base weights' gradients, so 6N overstates its work).

    python experiments/train_step_device.py --quick                               # CPU smoke run
    python experiments/train_step_device.py --config-json .gpu/smollm2/config.json --dtype bfloat16 --rows 8 --length 1024
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import sys
import time

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from promed_jax.device_memory import CheckedStep, gib, step_bytes
from promed_jax.models import ModelConfig, Transformer
from promed_jax.sharding import make_mesh
from promed_jax.training import state as S
from promed_jax.training.sft import make_sft_loss


def matmul_peak(dtype: str, size: int, reps: int) -> float:
    a = jax.random.normal(jax.random.key(0), (size, size), jnp.float32).astype(dtype)
    mm = jax.jit(lambda x: x @ x)
    mm(a).block_until_ready()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        mm(a).block_until_ready()
        times.append(time.perf_counter() - t)
    return 2 * size**3 / statistics.median(times)


def sft_step(model, rows: int, length: int, *, lora: bool):
    """(the jitted SFT step on one device, its train state, a batch of `rows` x `length` random tokens)."""
    mesh = make_mesh((1,), ("data",))
    opt = S.OptimizerConfig(learning_rate=2e-4, total_steps=100)
    tx = S.make_optimizer(opt)
    graphdef, params, frozen = S.split_for_training(model, lora=lora)
    state = S.place_state(S.init_state(params, frozen, tx, seed=0), mesh)
    jitted = S.compile_step(S.make_train_step(make_sft_loss(8192), graphdef, tx, S.schedule(opt)), state, mesh, rows)
    tokens = np.random.default_rng(0).integers(0, model.config.vocab_size, (1, rows, length)).astype(np.int32)
    batch = {
        "tokens": tokens,
        "targets": np.roll(tokens, -1, axis=-1),
        "weights": np.ones((1, rows, length), bool),
        "valid": np.ones((1, rows, length), bool),
    }
    return jitted, state, batch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config-json", type=pathlib.Path)
    p.add_argument("--quick", action="store_true", help="a tiny model, 2 x 64 tokens (a CPU smoke run)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--length", type=int, default=1024)
    p.add_argument("--lora-rank", type=int, default=8, help="0: full fine-tuning")
    p.add_argument("--no-remat", action="store_true")
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args()
    overrides = {
        "dtype": args.dtype,
        "param_dtype": args.dtype,
        "remat": not args.no_remat,
        "lora_rank": args.lora_rank,
        "lora_alpha": 32.0,
        "lora_dropout": 0.1 if args.lora_rank else 0.0,
    }
    if args.quick:
        cfg = ModelConfig.tiny(**overrides)
        rows, length, size = 2, 64, 512
    else:
        cfg = ModelConfig.from_hf(json.loads(args.config_json.read_text()), **overrides)
        rows, length, size = args.rows, args.length, 8192
    device = jax.devices()[0]
    print(f"device {device.device_kind} ({device.platform}), jax {jax.__version__}, load average {os.getloadavg()}")
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    lora = args.lora_rank > 0
    n_params = sum(int(np.size(x)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    jitted, state, batch = sft_step(model, rows, length, lora=lora)
    step = CheckedStep(jitted, name="the SFT step", hint="lower --rows or --length, or drop --no-remat")
    t0 = time.perf_counter()
    compiled = step.compiled(state, batch)
    compile_s = time.perf_counter() - t0
    need = step_bytes(compiled)
    kind = f"LoRA r={args.lora_rank}" if lora else "full"
    print(
        f"{n_params / 1e6:.1f} M parameters, {args.dtype}, {kind}, "
        f"remat {cfg.remat}, batch {rows} x {length}: compile {compile_s:.1f} s, "
        f"XLA's estimate beyond the inputs {gib(need) if need is not None else 'n/a'}"
    )
    times = []
    for i in range(args.reps + 1):
        t = time.perf_counter()
        state, metrics = step(state, batch)
        jax.block_until_ready(metrics)
        if i:  # the first call is a warm-up
            times.append(time.perf_counter() - t)
    seconds = statistics.median(times)
    rate = rows * length / seconds
    peak = matmul_peak(args.dtype, size, args.reps)
    print(
        f"step {seconds * 1e3:.1f} ms (median of {args.reps}), {rate:,.0f} tokens/s, loss {float(metrics['loss']):.3f}; "
        f"{args.dtype} matmul peak {peak / 1e12:.1f} TFLOP/s, MFU (6N) {6 * n_params * rate / peak:.1%}"
    )


if __name__ == "__main__":
    main()
