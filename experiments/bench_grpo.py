"""GRPO speed (Stage 2): rollout and update tokens/s of SmolLM2-135M fp32, against a PyTorch GRPO update.

One rollout batch as Stage 2 runs it: 2 MedQA dev cases x 4 generations by SmolLM2 with fresh LoRA adapters
(r = 8 on q, v), the fact_select patient, the RL sampling settings (T = 0.7, repetition penalty 1.1, no
repeated 3-grams within a turn), token in and token out (`promed_jax.rl.loop.Stage2`'s path), then the update
of `promed_jax.rl.step.GrpoUpdater` on that batch (uniform fact weights: speed does not depend on them).
Reported:
  * rollout: doctor tokens sampled per second: the first batch (compiling the sampler's shape buckets: prompt
    length and batch size change every turn), the same batch again (warm), and a batch of other cases;
  * update: the log-prob pass (old + reference + entropy, dropout off) and the optimizer step, tokens/s over
    the batch's real tokens (rows x their lengths), for our LoRA update (the paper's) and our full
    fine-tuning update, and a PyTorch/transformers full fine-tuning GRPO update of the same batch (no peft
    here): a no-grad forward for the old log-probs, one for the reference (a frozen copy), then PPO-clip + k3
    KL on the doctor tokens, backward, gradient clipping and AdamW;
  * MFU = FLOPs / s / peak with 2N FLOPs per token for each no-grad forward and 6N for the step (N the
    parameter count; the LoRA backward skips the weight gradients, so 6N overstates its work), the peak the
    FLOP/s of a large fp32 matmul measured in this run (`bench_train.matmul_flops`).
torch runs with 2 threads. Compile time is apart; times are medians of `--reps`; the load average is printed.

Measured 2026-12-02 on 2 shared CPU cores (load average 3.5 at the start, 1.9 at the end), `--reps 3
--max-questions 1 --max-new-tokens 32`, 8 rows x 512 padded (2,562 real tokens, 139 doctor tokens), peak
148.9 GFLOP/s: rollout 6.8 doctor tokens/s warm (5.3 compiling, 5.1 on other cases); update (pass + step)
torch full 89.0 s (28.8 tokens/s, MFU 26%), ours LoRA 40.7 s (62.9, 57%, 2.18x), ours full 50.1 s (51.1,
46%, 1.78x); our compile 78 s (LoRA), 61 s (full). Medians of 3, not 5 (time).

Again 2026-12-04 through `bench_train.py --grpo` (same flags; that entry reuses freed host buffers for both
frameworks, `device_memory.reuse_host_buffers`), load 0.3 at the start, 2.0 at the end, peak 181.0 GFLOP/s:
rollout 10.8 doctor tokens/s warm (7.0 compiling, 6.2 on other cases); update torch full 48.4 s (52.9
tokens/s, MFU 39%), ours LoRA 44.5 s (57.5, 43%, 1.09x), ours full 51.8 s (49.4, 37%, 0.93x); the log-prob
pass 18.9 s torch, 19.6 ours. torch gained most from the allocator (89.0 -> 48.4 s); ours did not move
(the loads differ and the causes were not separated).

    nice -n 10 python experiments/bench_grpo.py              # CPU defaults: 64 new tokens, 2 questions
    python experiments/bench_train.py --grpo                 # the same, from the training benchmark
    python experiments/bench_grpo.py --quick --reps 5 --json out.json   # experiments/run_benchmarks.py's size

`--quick`: 1 case x 2 generations, 1 question, 8 new tokens per turn, one microbatch, no rollout of other cases
no full fine-tuning update of ours (the paper's LoRA update against torch's full one), and the log-prob pass
timed only inside the update (pass + step).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import numpy as np
from flax import nnx

from configs import rl as rl_config
from experiments.bench_json import result_row, write_results
from experiments.bench_train import matmul_flops, median_time
from promed_jax.rl import loop
from promed_jax.rl import step as step_lib


def build(args, lora: bool) -> loop.Stage2:
    """Stage 2 on SmolLM2 and MedQA's training split, with uniform fact weights instead of the Shapley cache."""
    c = rl_config.get_config("smollm")
    c.model.lora_rank = 8 if lora else 0
    c.model.remat = True  # without it the update's activations took the process past 13.9 GB (OOM-killed)
    c.grpo.batch_cases, c.grpo.num_generations, c.grpo.eval_every = args.batch_cases, args.generations, 0
    c.grpo.grad_accum = args.grad_accum  # 1 microbatch of 8 rows took the process past 14 GB (OOM-killed)
    c.sampling.max_new_tokens = args.max_new_tokens
    c.consult.max_questions = args.max_questions
    train, _ = loop.select_cases(c)
    weights = {case.id: np.full(case.n_facts, 1.0 / case.n_facts) for case in train}
    return loop.build(c, "/tmp/bench_grpo", weights=weights)


def rollout_rate(stage: loop.Stage2, batch: int) -> tuple[float, float, object]:
    start = time.perf_counter()
    rollout = stage.rollout(batch)
    seconds = time.perf_counter() - start
    return float(rollout.role_mask.sum()) / seconds, seconds, rollout


def update_arrays(stage: loop.Stage2, rollout) -> dict:
    advantages, *_ = stage.rewards(rollout)
    pad = stage.tokenizer.pad_token_id or 0
    return step_lib.update_batch(rollout.tokens, rollout.role_mask, rollout.lengths, advantages, pad_id=pad)


def ours(stage: loop.Stage2, arrays: dict, reps: int, *, passes: bool = True) -> dict[str, float]:
    up = stage.updater
    start = time.perf_counter()
    up.update(arrays, batch_index=0)  # compiles the pass and the step
    compile_s = time.perf_counter() - start
    pass_s = median_time(lambda: up.logprobs(arrays), reps) if passes else float("nan")
    update_s = median_time(lambda: up.update(arrays, batch_index=0), reps)
    return {"compile_s": compile_s, "pass_s": pass_s, "update_s": update_s}


def theirs(arrays: dict, reps: int, *, time_passes: bool = True) -> dict[str, float]:
    import torch
    from transformers import AutoModelForCausalLM

    from promed_jax import assets

    path = assets.smollm2_gguf_path()

    def load():
        return AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch.float32, attn_implementation="sdpa"
        )

    policy, reference = load().train(), load().eval()
    for p in reference.parameters():
        p.requires_grad_(False)
    opt = torch.optim.AdamW(policy.parameters(), lr=5e-6, weight_decay=0.0)
    tokens = torch.tensor(arrays["tokens"], dtype=torch.long)
    targets = torch.tensor(arrays["targets"], dtype=torch.long)
    valid = torch.tensor(arrays["valid"])
    mask = torch.tensor(arrays["weights"]).float()
    adv = torch.tensor(arrays["advantages"])

    def logps(model):
        logits = model(input_ids=tokens, attention_mask=valid.long()).logits.float()
        return torch.log_softmax(logits, -1).gather(-1, targets[..., None])[..., 0]

    def passes():
        with torch.no_grad():
            policy.eval()
            old = logps(policy)
            ref = logps(reference)
            policy.train()
        return old, ref

    def update():
        old, ref = passes()
        opt.zero_grad(set_to_none=True)
        new = logps(policy)
        ratio = torch.exp(new - old)
        pg = torch.maximum(-adv * ratio, -adv * ratio.clamp(0.9, 1.1))
        log_r = ref - new
        kl = torch.exp(log_r) - log_r - 1
        per_row = ((pg + 0.04 * kl) * mask).sum(1) / mask.sum(1).clamp(min=1)
        per_row[mask.sum(1) > 0].mean().backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        opt.step()

    update()
    pass_s = median_time(passes, reps) if time_passes else float("nan")
    return {"pass_s": pass_s, "update_s": median_time(update, reps)}


def run(args) -> None:
    import torch

    if args.quick:
        args.batch_cases, args.generations, args.max_questions, args.max_new_tokens, args.grad_accum = 1, 2, 1, 8, 1

    torch.set_num_threads(2)
    print(f"load average (1, 5, 15 min): {os.getloadavg()}; jax {jax.__version__}, torch {torch.__version__}")
    peak = max(matmul_flops(2048, args.reps))
    print(f"peak assumed for MFU (large fp32 matmul): {peak / 1e9:.1f} GFLOP/s")
    stage = build(args, lora=True)
    n_params = sum(np.size(x) for x in jax.tree.leaves(nnx.state(stage.updater.policy_model(), nnx.Param)))
    first, first_s, rollout = rollout_rate(stage, 0)
    warm, warm_s, _ = rollout_rate(stage, 0)  # the same cases and keys: the shapes compiled by the first
    other, other_s, _ = (float("nan"), float("nan"), None) if args.quick else rollout_rate(stage, 1)
    print(
        f"rollout {args.batch_cases} cases x {args.generations} generations, <= {args.max_questions} questions, "
        f"{args.max_new_tokens} new tokens per turn, {rollout.role_mask.sum()} doctor tokens: {first:.1f} doctor "
        f"tokens/s compiling ({first_s:.1f} s), {warm:.1f} warm ({warm_s:.1f} s), {other:.1f} on other cases "
        f"({other_s:.1f} s: new shape buckets)"
    )
    if args.rollout_only:
        return
    arrays = update_arrays(stage, rollout)
    tokens = float(arrays["valid"].sum())
    print(
        f"update batch: {arrays['tokens'].shape[0]} rows x {arrays['tokens'].shape[1]} padded, {tokens:.0f} real "
        f"tokens, {arrays['weights'].sum()} doctor tokens"
    )
    results = {"torch (full)": theirs(arrays, args.reps, time_passes=not args.quick)}
    print(f"torch (full): {results['torch (full)']}", flush=True)
    results["ours (LoRA)"] = ours(stage, arrays, args.reps, passes=not args.quick)
    print(f"ours (LoRA): {results['ours (LoRA)']}", flush=True)
    del stage
    if not args.quick:
        full = build(args, lora=False)
        results["ours (full)"] = ours(full, arrays, args.reps)
        print(f"ours (full): {results['ours (full)']}", flush=True)
        del full
    print(f"load average now: {os.getloadavg()}")
    print("update | compile s | pass s | pass+step s | tokens/s | MFU | tokens/s vs torch")
    base = tokens / results["torch (full)"]["update_s"]
    for name, r in results.items():
        rate = tokens / r["update_s"]
        flops = (2 * 2 + 6) * n_params * tokens / r["update_s"]
        print(
            f"{name} | {r.get('compile_s', float('nan')):.1f} | {r['pass_s']:.2f} | {r['update_s']:.2f} | "
            f"{rate:.1f} | {flops / peak:.1%} | {rate / base:.2f}x"
        )
    torch_r = results.pop("torch (full)")
    rows = [
        result_row(
            f"GRPO update (pass + step), {name} vs torch full",
            "tok/s",
            tokens / r["update_s"],
            tokens / torch_r["update_s"],
            compile_s=r["compile_s"],
        )
        for name, r in results.items()
    ]
    if not args.quick:
        rows.append(
            result_row(
                "GRPO log-prob pass (old + ref)",
                "s",
                results["ours (LoRA)"]["pass_s"],
                torch_r["pass_s"],
                better="lower",
            )
        )
    rows.append(result_row("GRPO rollout, warm", "doctor tok/s", warm, None, compile_s=first_s - warm_s))
    write_results(args.json, "bench_grpo", rows, reps=args.reps)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="the smoke size (see the module docstring)")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--json", type=pathlib.Path, help="also write the results here (experiments/bench_json.py)")
    p.add_argument("--batch-cases", type=int, default=2)
    p.add_argument("--generations", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--max-questions", type=int, default=2)
    p.add_argument("--grad-accum", type=int, default=4, help="microbatches per optimizer step (ours)")
    p.add_argument("--rollout-only", action="store_true", help="skip the update timings")
    return p


if __name__ == "__main__":
    run(parser().parse_args())
