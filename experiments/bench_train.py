"""SFT step speed: our jitted train step against a PyTorch/transformers AdamW step, SmolLM2-135M fp32.

Both models come from the same GGUF (dequantized to fp32); both train every parameter (full fine-tuning, or
`--lora`: our LoRA step, reported beside the full one) with AdamW (lr 1e-5, clipping at norm 1) on the same
batch: B = 8 rows x T = 512 random tokens, cross-entropy on every position but the last. Reported, medians
of `--reps` steps after one warm-up step:
  * tokens/s (B x T / step time) for both, and the ratio ours / torch;
  * MFU = 6 x N_params x tokens/s / peak, with the peak the FLOP/s of a large fp32 matmul measured in the same
    run (the better of JAX's and torch's): this CPU's number, not a datasheet's;
  * a profile of both steps' parts: the forward (loss only; ours on the first microbatch), forward + backward,
    and the whole step;
  * our compile time, apart.
torch runs with `torch.set_num_threads(2)`, SDPA attention, no gradient checkpointing, and so does ours by
default (every activation kept: XLA estimates 12.4 GiB at this batch); `--remat` recomputes each block in the
backward pass (the blocks then run as a scan, `transformer._scanned_blocks`: a few GiB, a forward more of
compute). Before the blocks were scanned, remat in the unrolled loop saved nothing on the CPU (XLA hoisted
the recomputations), so earlier runs "with remat" measured the no-remat step. The loss runs over
vocabulary chunks of 8,192 (the fp32 logits [8, 512, 49152] are 0.8 GB; torch materializes them).
The load average is printed: on a shared machine the numbers are only comparable within one run.
The process reuses its freed host buffers (`device_memory.reuse_host_buffers`, as the entry point does;
`--malloc default` for glibc's own behaviour): set before either framework starts, it holds for both.
With `--reps 1` our steps are compiled ahead of time and not warmed up (the first call of a compiled step is
its steady-state time on CPU, give or take allocation); torch's first step is always run untimed.

    nice -n 10 python experiments/bench_train.py            # the real run (several minutes)
    nice -n 10 python experiments/bench_train.py --grpo     # the GRPO step (experiments/bench_grpo.py)
    python experiments/bench_train.py --quick               # smoke run: tiny sizes, 1 repetition (--reps 5)
    python experiments/bench_train.py --grpo --quick        # the GRPO step at its smoke size
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))  # experiments/ is not an installed package (as in shapley_stratified.py)

import jax
import numpy as np
from flax import nnx

from experiments.bench_json import result_row, write_results
from experiments.bench_sampler import matmul_flops, median_time  # one timing rule for every benchmark
from promed_jax import assets
from promed_jax.device_memory import reuse_host_buffers
from promed_jax.models.checkpoints import load_gguf
from promed_jax.sharding import make_mesh
from promed_jax.training import state as S
from promed_jax.training.sft import make_sft_loss


def make_batch(vocab: int, rows: int, length: int, microbatches: int) -> dict:
    tokens = np.asarray(jax.random.randint(jax.random.key(1), (rows, length), 0, vocab), np.int32)
    targets = np.concatenate([tokens[:, 1:], np.zeros((rows, 1), np.int32)], axis=1)
    weights = np.ones((rows, length), bool)
    weights[:, -1] = False
    shape = (microbatches, rows // microbatches, length)
    batch = {"tokens": tokens, "targets": targets, "weights": weights, "valid": np.ones((rows, length), bool)}
    return {k: v.reshape(shape) for k, v in batch.items()}


def ours(model, batch: dict, *, lora: bool, reps: int, chunk: int) -> dict[str, float]:
    """Compile time and median seconds of our forward, forward + backward and whole step."""
    mesh = make_mesh((1,), ("data",))
    opt = S.OptimizerConfig(learning_rate=1e-5, total_steps=1000, max_grad_norm=1.0)
    tx = S.make_optimizer(opt)
    loss_fn = make_sft_loss(chunk)
    graphdef, params, frozen = S.split_for_training(model, lora=lora)
    state = S.place_state(S.init_state(params, frozen, tx, seed=0), mesh)
    key = jax.random.key(0)
    forward = jax.jit(lambda p, f, b: loss_fn(nnx.merge(graphdef, p, f), jax.tree.map(lambda x: x[0], b), key)[0])
    grads = jax.jit(lambda p, f, b: S.accumulate(loss_fn, graphdef, p, f, b, key)[:3])  # [:2] let XLA drop the backward
    step = S.compile_step(
        S.make_train_step(loss_fn, graphdef, tx, S.schedule(opt)), state, mesh, batch["tokens"].shape[1]
    )
    start = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    compile_s = time.perf_counter() - start
    # ahead-of-time compiled, so that the first timed call is not a compile (with --reps 1 there is no warm-up)
    forward = forward.lower(state.params, state.frozen, batch).compile()
    grads = grads.lower(state.params, state.frozen, batch).compile()
    holder = {"state": state}

    def run_step():
        holder["state"], metrics = compiled(holder["state"], batch)
        jax.block_until_ready(metrics)

    if reps > 1:
        run_step()
    out = {"compile_s": compile_s, "step_s": median_time(run_step, reps)}
    state = holder["state"]
    out["forward_s"] = median_time(lambda: jax.block_until_ready(forward(state.params, state.frozen, batch)), reps)
    out["backward_s"] = median_time(lambda: jax.block_until_ready(grads(state.params, state.frozen, batch)), reps)
    return out


def theirs(batch: dict, *, reps: int) -> dict[str, float]:
    import torch
    from transformers import AutoModelForCausalLM

    path = assets.smollm2_gguf_path()
    model = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32, attn_implementation="sdpa"
    ).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.0)
    tokens = torch.tensor(batch["tokens"].reshape(-1, batch["tokens"].shape[-1]), dtype=torch.long)
    labels = tokens.clone()  # transformers shifts labels itself: every position but the last is scored

    def loss():
        return model(input_ids=tokens, labels=labels).loss

    def forward():
        with torch.no_grad():
            loss()

    def backward():
        model.zero_grad(set_to_none=True)
        loss().backward()

    def step():
        backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    step()
    return {
        "step_s": median_time(step, reps),
        "forward_s": median_time(forward, reps),
        "backward_s": median_time(backward, reps),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 x 32 tokens, one repetition by default")
    parser.add_argument("--reps", type=int, default=None, help="repetitions per median (default 5, --quick 1)")
    parser.add_argument("--json", type=pathlib.Path, help="also write the results here (experiments/bench_json.py)")
    parser.add_argument("--remat", action="store_true", help="recompute each block in the backward pass")
    parser.add_argument("--microbatches", type=int, default=1)
    parser.add_argument("--chunk", type=int, default=8192)
    parser.add_argument("--lora", action="store_true", help="also time our LoRA step (adapters on q, v, r = 8)")
    parser.add_argument("--grpo", action="store_true", help="the GRPO step instead (experiments/bench_grpo.py)")
    parser.add_argument(
        "--malloc",
        choices=("reuse", "default"),
        default="reuse",
        help="reuse: the entry point's host allocator setting (device_memory.reuse_host_buffers), for both "
        "frameworks; default: glibc's own (every large buffer a fresh mapping)",
    )
    args, rest = parser.parse_known_args()
    reused = args.malloc == "reuse" and reuse_host_buffers()  # before jax or torch starts a thread
    reps = args.reps or (1 if args.quick else 5)
    if args.grpo:
        from experiments import bench_grpo

        passed = [f"--reps={reps}"] + ["--quick"] * args.quick + ([f"--json={args.json}"] if args.json else [])
        bench_grpo.run(bench_grpo.parser().parse_args(rest + passed))
        return
    rows, length = (2, 32) if args.quick else (8, 512)

    import torch

    torch.set_num_threads(2)
    print(
        f"load average (1, 5, 15 min): {os.getloadavg()}; cpus: {os.cpu_count()}; jax {jax.__version__}, "
        f"torch {torch.__version__}; host buffers reused (both, one process): {reused}"
    )
    path = assets.smollm2_gguf_path()
    model = load_gguf(path, remat=args.remat)
    cfg = model.config
    n_params = sum(np.size(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    batch = make_batch(cfg.vocab_size, rows, length, args.microbatches)
    tokens = rows * length
    print(
        f"SmolLM2-135M fp32 ({n_params / 1e6:.1f} M parameters), batch {rows} x {length} = {tokens} tokens, "
        f"{args.microbatches} microbatch(es), remat {args.remat}, vocabulary chunk {args.chunk}; "
        f"medians of {reps}"
    )
    peak_jax, peak_torch = matmul_flops(1024 if args.quick else 4096, reps)
    peak = max(peak_jax, peak_torch)
    print(
        f"large fp32 matmul: jax {peak_jax / 1e9:.1f} GFLOP/s, torch {peak_torch / 1e9:.1f} GFLOP/s "
        f"(peak assumed for MFU: {peak / 1e9:.1f})"
    )
    results = {"ours (full)": ours(model, batch, lora=False, reps=reps, chunk=args.chunk)}
    print(f"our compile time (full step): {results['ours (full)']['compile_s']:.1f} s")
    if args.lora:
        lora_model = load_gguf(path, remat=args.remat, lora_rank=8, lora_alpha=32.0, lora_dropout=0.1)
        results["ours (LoRA)"] = ours(lora_model, batch, lora=True, reps=reps, chunk=args.chunk)
        print(f"our compile time (LoRA step): {results['ours (LoRA)']['compile_s']:.1f} s")
    results["torch (full)"] = theirs(batch, reps=reps)
    print(f"load average now: {os.getloadavg()}")
    print(
        "step | tokens/s | MFU | forward s (ours: first microbatch) | forward+backward s | whole step s | "
        "tokens/s vs torch"
    )
    base = tokens / results["torch (full)"]["step_s"]
    for name, r in results.items():
        rate = tokens / r["step_s"]
        print(
            f"{name} | {rate:8.1f} | {6 * n_params * rate / peak:5.1%} | {r['forward_s']:.2f} | "
            f"{r['backward_s']:.2f} | {r['step_s']:.2f} | {rate / base:.2f}x"
        )
    torch_r = results.pop("torch (full)")
    rows_out = [
        result_row(
            f"SFT step {rows} x {length}, {name} vs torch full",
            "tok/s",
            tokens / r["step_s"],
            tokens / torch_r["step_s"],
            compile_s=r["compile_s"],
        )
        for name, r in results.items()
    ]
    if args.microbatches == 1:  # our forward is timed on the first microbatch only
        full = results["ours (full)"]
        rows_out.append(result_row("SFT forward (loss)", "s", full["forward_s"], torch_r["forward_s"], better="lower"))
        rows_out.append(
            result_row("SFT forward + backward", "s", full["backward_s"], torch_r["backward_s"], better="lower")
        )
    write_results(args.json, "bench_train", rows_out, reps=reps)


if __name__ == "__main__":
    main()
