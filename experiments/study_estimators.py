"""Which Shapley estimator, at which budget: every estimator against exact enumeration on real MedQA games.

Step 1 (slow, resumable): the value of every coalition of some real MedQA cases under SmolLM2-135M, by our
batched game, saved to an .npz table per case id (about 20 min on 2 cores for the default 36 cases).
Step 2 (seconds): each estimator run on those tables by lookup, over many seeds, its L1 error against exact
φ, and its cost: distinct coalitions, and for the paper's truncated Monte-Carlo also the forwards the
reference code pays (it re-evaluates a coalition each time a permutation reaches it).

    python experiments/study_estimators.py --tables /tmp/shapley_tables.npz
"""

from __future__ import annotations

import argparse
import math
import os
import pathlib
import statistics
import time

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np

from promed_jax import assets
from promed_jax.data.cases import load_cases
from promed_jax.shapley import estimators as est

DATA = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "medqa_dev_convo.jsonl"
PER_N = {5: 8, 6: 6, 7: 8, 8: 7, 9: 4, 10: 3}  # cases per number of facts


def build_tables(path: pathlib.Path, data: pathlib.Path) -> dict[str, np.ndarray]:
    """v over all 2^n coalitions (indexed by bitmask) of the first cases with each n in PER_N; resumes."""
    tables = dict(np.load(path)) if path.exists() else {}
    want = dict(PER_N)
    for table in tables.values():
        want[int(math.log2(table.size))] -= 1
    if all(v <= 0 for v in want.values()):
        return tables
    from promed_jax.models.checkpoints import load_gguf
    from promed_jax.shapley.game import CoalitionGame
    from promed_jax.text.tokenizer import load_tokenizer

    gguf = assets.smollm2_gguf_path()
    model = load_gguf(gguf)
    model.materialize_head()
    game = CoalitionGame(model, load_tokenizer(gguf))
    for case in load_cases(data, on_error="skip"):
        key = case.id.replace(":", "_")
        if want.get(case.n_facts, 0) <= 0 or key in tables:
            continue
        start = time.perf_counter()
        tables[key] = game.values(game.prompt(case), est.all_coalitions(case.n_facts))
        want[case.n_facts] -= 1
        np.savez(path.with_suffix(".tmp.npz"), **tables)
        os.replace(path.with_suffix(".tmp.npz"), path)  # atomic: an interrupted run resumes
        print(f"{case.id}: n={case.n_facts}, {time.perf_counter() - start:.1f} s", flush=True)
    return tables


class Counting(est.MemoValue):
    """A memo that also counts every coalition asked for (the reference code's forwards)."""

    def __init__(self, fn, n):
        super().__init__(fn, n)
        self.asked = 0

    def __call__(self, coalitions):
        self.asked += len(coalitions)
        return super().__call__(coalitions)


def lookup(table: np.ndarray, n: int):
    bits = 1 << np.arange(n)
    return lambda coalitions: table[np.asarray(coalitions, dtype=np.int64) @ bits]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tables", type=pathlib.Path, default=pathlib.Path("shapley_tables.npz"))
    parser.add_argument("--data", type=pathlib.Path, default=DATA)
    parser.add_argument("--seeds", type=int, default=20)
    args = parser.parse_args()
    tables = build_tables(args.tables, args.data)

    methods = {"paper tmc": (est.tmc, None, {"batch_permutations": 1})}
    for per_fact in (2, 3, 4, 8):
        methods[f"kernel_shap {per_fact}(n+1)"] = (est.kernel_shap, per_fact, {})
        methods[f"kernel_shap sampled only {per_fact}(n+1)"] = (est.kernel_shap, per_fact, {"enumerate_strata": False})
        methods[f"antithetic {per_fact}(n+1)"] = (est.antithetic, per_fact, {})
    results: dict[str, list[tuple[float, float, float]]] = {name: [] for name in methods}
    ns = [int(math.log2(t.size)) for t in tables.values()]
    for table in tables.values():
        n = int(math.log2(table.size))
        exact = est.exact_from_table(table, n)
        for name, (fn, per_fact, options) in methods.items():
            runs = []
            for seed in range(args.seeds):
                memo = Counting(lookup(table, n), n)
                budget = {} if per_fact is None else {"budget": per_fact * (n + 1)}
                phi, n_evals = fn(memo, n, key=seed, **budget, **options)
                runs.append((float(np.abs(phi - exact).sum()), n_evals, memo.asked))
            results[name].append(tuple(np.mean(runs, axis=0)))

    paper = results["paper tmc"]
    print(f"{len(tables)} MedQA cases, n = {sorted(ns)}; {args.seeds} seeds each; L1 error against exact phi")
    print("| method | median error | mean error | cases with error <= paper's | distinct coalitions | asked |")
    print("|---|---|---|---|---|---|")
    for name, rows in results.items():
        errors = [r[0] for r in rows]
        wins = sum(r[0] <= p[0] for r, p in zip(rows, paper, strict=True))
        print(
            f"| {name} | {statistics.median(errors):.3f} | {np.mean(errors):.3f} | {wins}/{len(rows)} | "
            f"{statistics.median(r[1] for r in rows):.1f} | {statistics.median(r[2] for r in rows):.1f} |"
        )
    # The default estimator runs above exact_max_n, so how the errors move with n matters.
    shown = ["paper tmc", "kernel_shap 4(n+1)", "kernel_shap 8(n+1)", "antithetic 8(n+1)"]
    print("\nmedian error by n: " + " | ".join(shown))
    for n in sorted(set(ns)):
        rows = {name: [r[0] for r, m in zip(results[name], ns, strict=True) if m == n] for name in shown}
        print(
            f"n={n} ({len(rows[shown[0]])} cases): " + " | ".join(f"{statistics.median(v):.3f}" for v in rows.values())
        )


if __name__ == "__main__":
    main()
