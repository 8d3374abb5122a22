"""Shapley values on real MedQA cases with SmolLM2-135M: the paper's way against ours.

(a) The paper's way: transformers in torch, one forward per coalition at batch 1, the reference code's
    truncated Monte-Carlo permutation estimator (3..50 permutations, truncation and convergence at 0.01).
(b) Ours: the batched jitted JAX game, each estimator on a fresh memo, at the same number of distinct
    coalition evaluations as (a) used on that case; exact enumeration is the ground truth (n ≤ 10).

Both compute the same v (promed.md §2: per-piece token ids, facts in original order), so the error columns
measure only the estimators. Medians over cases; JAX compilation time (from jax.monitoring events) is
subtracted from our times and reported apart; the load average is printed because the machine may be shared.

    python experiments/bench_shapley.py --cases 6         # the real run (about 15-20 min on 2 idle cores)
    python experiments/bench_shapley.py --quick           # 2 five-fact cases, a smoke test
"""

from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import sys
import time

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax
import numpy as np

from promed_jax import assets, registry
from promed_jax.data.cases import Case, load_cases
from promed_jax.models.checkpoints import load_gguf
from promed_jax.shapley import estimators as est
from promed_jax.shapley.game import CoalitionGame, ValuePrompt, coalition_ids
from promed_jax.text.tokenizer import load_tokenizer

DATA = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "medqa_dev_convo.jsonl"
OURS = ("exact", "tmc", "kernel_shap", "antithetic", "permutation")
PAPER_TMC = {"min_permutations": 3, "max_permutations": 50, "truncation_tol": 0.01, "convergence_tol": 0.01}


def torch_value_fn(model, prompt: ValuePrompt):
    """The paper's way: one torch forward per coalition at batch 1 (same token ids as ours)."""
    import torch

    def value_fn(coalitions: np.ndarray) -> np.ndarray:
        out = []
        for coalition in coalitions:
            ids, start = coalition_ids(prompt, coalition)
            with torch.no_grad():
                logits = model(torch.from_numpy(ids[None].astype(np.int64))).logits[0].float()
            logp = torch.log_softmax(logits[start - 1 : -1], dim=-1)
            out.append(logp[torch.arange(ids.size - start), torch.from_numpy(ids[start:].astype(np.int64))].mean())
        return np.array([float(v) for v in out], np.float32)

    return value_fn


def load_torch_smollm2():
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(os.cpu_count() or 1)
    path = assets.smollm2_gguf_path()
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    return model.eval()


def pick_cases(path: pathlib.Path, count: int, min_facts: int, max_facts: int) -> list[Case]:
    cases = [c for c in load_cases(path, on_error="skip") if min_facts <= c.n_facts <= max_facts]
    if len(cases) < count:
        sys.exit(f"only {len(cases)} cases in {path} have {min_facts}..{max_facts} facts")
    return cases[:count]


class CompileClock:
    """Seconds JAX spent tracing, lowering and compiling, from its monitoring events."""

    def __init__(self):
        self.seconds = 0.0
        jax.monitoring.register_event_duration_secs_listener(self._on_event)

    def _on_event(self, event: str, duration: float, **_) -> None:
        if event.startswith("/jax/core/compile/"):
            self.seconds += duration


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - start


def run_ours(game: CoalitionGame, prompt: ValuePrompt, name: str, budget: int, seed: int, clock: CompileClock):
    """(φ, n_evals, seconds without compilation) of one estimator on a fresh memo (nothing shared)."""
    memo = est.MemoValue(lambda c: game.values(prompt, c), prompt.n)
    options = dict(PAPER_TMC) if name == "tmc" else {"budget": budget}
    compiled_before = clock.seconds
    (phi, n_evals), seconds = timed(registry.get(est.KIND, name), memo, prompt.n, key=seed, **options)
    return phi, n_evals, seconds - (clock.seconds - compiled_before)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=6)
    parser.add_argument("--quick", action="store_true", help="2 five-fact cases: a smoke test")
    parser.add_argument("--data", type=pathlib.Path, default=DATA)
    parser.add_argument("--min-facts", type=int, default=5)
    parser.add_argument("--max-facts", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.quick:
        args.cases, args.min_facts, args.max_facts = 2, 5, 5
    if args.max_facts > 10:
        sys.exit("error against exact enumeration is measured for n <= 10 only")
    if not assets.smollm2_available():
        sys.exit(f"SmolLM2 not installed: {assets.SMOLLM2_INSTALL}")

    print(f"load average at start: {os.getloadavg()}")
    cases = pick_cases(args.data, args.cases, args.min_facts, args.max_facts)
    model, tokenizer = load_gguf(assets.smollm2_gguf_path()), load_tokenizer(assets.smollm2_gguf_path())
    model.materialize_head()
    game = CoalitionGame(model, tokenizer, batch_size=args.batch_size)
    torch_model = load_torch_smollm2()

    clock = CompileClock()

    rows = []
    for index, case in enumerate(cases):
        prompt = game.prompt(case)
        exact_phi, exact_evals, exact_s = run_ours(game, prompt, "exact", 0, args.seed, clock)
        norm = float(np.abs(exact_phi).sum())
        memo = est.MemoValue(torch_value_fn(torch_model, prompt), prompt.n)
        (paper_phi, paper_evals), paper_s = timed(
            est.tmc, memo, prompt.n, key=args.seed, batch_permutations=1, **PAPER_TMC
        )
        ends = np.stack([np.zeros(prompt.n, bool), np.ones(prompt.n, bool)])
        agree = float(np.abs(memo(ends) - game.values(prompt, ends)).max())
        row = {
            "case": case.id,
            "n": case.n_facts,
            "tokens": int(sum(f.size for f in prompt.facts)),
            "norm": norm,
            "paper": (paper_s, paper_evals, float(np.abs(paper_phi - exact_phi).sum())),
            "exact": (exact_s, exact_evals, 0.0),
        }
        for name in OURS[1:]:
            phi, n_evals, seconds = run_ours(game, prompt, name, paper_evals, args.seed, clock)
            row[name] = (seconds, n_evals, float(np.abs(phi - exact_phi).sum()))
        rows.append(row)
        print(
            f"[{index + 1}/{len(cases)}] {case.id} n={case.n_facts} |phi|_1={norm:.3f} torch-vs-jax |dv|={agree:.1e} "
            + " ".join(f"{k}={row[k][0]:.2f}s/{row[k][1]}ev/err{row[k][2]:.3f}" for k in ("paper", *OURS))
        )

    report(rows)
    print(f"JAX compilation, all cases and estimators together (not in the times above): {clock.seconds:.1f} s")
    print(f"load average at end: {os.getloadavg()}")


def report(rows: list[dict]) -> None:
    def med(key: str, i: int) -> float:
        return statistics.median(r[key][i] for r in rows)

    paper_s = med("paper", 0)
    print(
        "\nmedians over cases (error = L1 distance to exact phi; median |exact phi|_1 = "
        f"{statistics.median(r['norm'] for r in rows):.3f}; budgets = the paper estimator's evaluations)"
    )
    print("| method | s / case | evaluations | L1 error | speed-up vs paper |")
    print("|---|---|---|---|---|")
    print(
        f"| (a) paper: torch, batch 1, truncated MC | {paper_s:.2f} | {med('paper', 1):.0f} | {med('paper', 2):.3f} | 1.0x |"
    )
    for name in OURS:
        label = "exact enumeration (default for n <= 10)" if name == "exact" else name
        print(
            f"| (b) ours: {label} | {med(name, 0):.2f} | {med(name, 1):.0f} | {med(name, 2):.3f} | "
            f"{paper_s / med(name, 0):.1f}x |"
        )
    # Exact enumeration costs ~2^n coalitions; the paper's estimate costs what (a) measured. Per-coalition
    # cost of ours from the measured exact runs, scaled by the typical fact tokens of these cases.
    per_coalition = statistics.median(r["exact"][0] / r["exact"][1] for r in rows)
    crossover = max((n for n in range(1, 21) if per_coalition * 2**n < paper_s), default=0)
    print(
        f"\nours: {per_coalition * 1000:.1f} ms per coalition (median over exact runs); exact enumeration "
        f"(2^n coalitions) is faster than the paper's estimate ({paper_s:.1f} s) up to n = {crossover}"
    )
    by_n: dict[int, list[dict]] = {}
    for r in rows:
        by_n.setdefault(r["n"], []).append(r)
    for n, group in sorted(by_n.items()):
        print(
            f"  n={n}: {len(group)} cases, paper {statistics.median(r['paper'][0] for r in group):.1f} s, "
            f"exact {statistics.median(r['exact'][0] for r in group):.1f} s"
        )


if __name__ == "__main__":
    main()
