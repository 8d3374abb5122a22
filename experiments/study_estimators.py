"""Which Shapley estimator, at which budget: every estimator against exact enumeration on MedQA games.

Step 1 (slow, resumable case by case): the value of every coalition of some MedQA cases, by our batched game,
saved to an .npz table per case id. `--model smollm2` scores with SmolLM2-135M: about 0.1 s of CPU per
coalition (about 20 min on 2 cores for the default 36 cases with 5-10 facts, 17 min for 3 cases with 11 facts
and one with 12; peak RSS 7.2 GB at the default --chunk 128). `--model tiny` scores with the random-weight
tiny model of `configs/base.py` (model.kind='tiny') on the same real prompts: a random-weight game, cheap
enough for 2^15 coalitions (6 min of CPU for 13 cases with 11-15 facts). `--per-n 11:3,12:1` picks the first
cases with each number of facts. A table is built in chunks of `--chunk` coalitions that share their leading
facts, so that the game's prefix tree still shares them while memory stays bounded.
Step 2 (seconds): each estimator run on those tables by lookup, over many seeds, its L1 error against exact
φ, and its cost: distinct coalitions, and for the paper's truncated Monte-Carlo also the forwards the
reference code pays (it re-evaluates a coalition each time a permutation reaches it).

    python experiments/study_estimators.py --tables /tmp/shapley_tables.npz
    python experiments/study_estimators.py --per-n 11:3,12:1 --tables /tmp/smollm2_11_12.npz
    python experiments/study_estimators.py --model tiny --per-n 11:3,12:3,13:3,14:2,15:2 --tables /tmp/tiny.npz
"""

from __future__ import annotations

import argparse
import math
import os
import pathlib
import statistics
import sys
import time

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np

from promed_jax.data.cases import load_cases
from promed_jax.shapley import estimators as est

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))  # configs/ is not an installed package (as in experiments/sweep.py)
DATA = REPO_ROOT.parent / "shared" / "data" / "medqa_dev_convo.jsonl"
PER_N = {5: 8, 6: 6, 7: 8, 8: 7, 9: 4, 10: 3}  # cases per number of facts (the default: SmolLM2, n = 5-10)


def parse_per_n(text: str) -> dict[int, int]:
    """'11:3,12:1' -> {11: 3, 12: 1}."""
    return {int(n): int(count) for n, count in (item.split(":") for item in text.split(","))}


def load_game(model_kind: str):
    """The batched coalition game of SmolLM2-135M or of the random tiny model of configs/base.py."""
    from configs.base import model_config
    from promed_jax.models.loader import load_model
    from promed_jax.shapley.game import CoalitionGame

    section = model_config()
    if model_kind == "smollm2":
        section.kind = "gguf"
    model, tokenizer = load_model(section)
    model.materialize_head()
    return CoalitionGame(model, tokenizer)


def table_chunks(n: int, chunk: int) -> list[np.ndarray]:
    """The bitmasks 0..2^n-1 in chunks of about `chunk` that fix the membership of the leading facts (low bits)
    and vary the last ones, so the coalitions of a chunk share their fact prefixes."""
    varied = min(n, max(0, int(math.log2(chunk))))
    fixed = n - varied
    tails = np.arange(2**varied, dtype=np.int64) << fixed
    return [head | tails for head in range(2**fixed)]


def case_table(game, case, chunk: int) -> np.ndarray:
    """float64[2^n]: v of every coalition of the case, indexed by bitmask."""
    prompt = game.prompt(case)
    n = case.n_facts
    table = np.empty(2**n)
    for masks in table_chunks(n, chunk):
        coalitions = ((masks[:, None] >> np.arange(n)[None, :]) & 1).astype(bool)
        table[masks] = game.values(prompt, coalitions)
    return table


def build_tables(path: pathlib.Path, data: pathlib.Path, per_n: dict[int, int], model_kind: str, chunk: int):
    """v over all 2^n coalitions of the first cases with each n in `per_n`; resumes from `path`."""
    tables = dict(np.load(path)) if path.exists() else {}
    want = dict(per_n)
    for table in tables.values():
        n = int(math.log2(table.size))
        want[n] = want.get(n, 0) - 1
    if all(v <= 0 for v in want.values()):
        return tables
    game = load_game(model_kind)
    for case in load_cases(data, on_error="skip"):
        key = case.id.replace(":", "_")
        if want.get(case.n_facts, 0) <= 0 or key in tables:
            continue
        start = time.perf_counter()
        tables[key] = case_table(game, case, chunk)
        want[case.n_facts] -= 1
        np.savez(path.with_suffix(".tmp.npz"), **tables)
        os.replace(path.with_suffix(".tmp.npz"), path)  # atomic: an interrupted run resumes
        print(f"{case.id}: n={case.n_facts}, {time.perf_counter() - start:.1f} s", flush=True)
    return tables


def lookup(table: np.ndarray, n: int):
    bits = 1 << np.arange(n)
    return lambda coalitions: table[np.asarray(coalitions, dtype=np.int64) @ bits]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tables", type=pathlib.Path, help="the .npz of tables (default: shapley_tables_<model>.npz)")
    parser.add_argument("--data", type=pathlib.Path, default=DATA)
    parser.add_argument("--model", choices=("smollm2", "tiny"), default="smollm2")
    parser.add_argument("--per-n", type=parse_per_n, default=PER_N, help="cases per number of facts, e.g. 11:3,12:1")
    parser.add_argument("--chunk", type=int, default=128, help="coalitions per game call while building a table")
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--no-build", action="store_true", help="compare on the tables built so far")
    args = parser.parse_args()
    args.tables = args.tables or pathlib.Path(f"shapley_tables_{args.model}.npz")
    if args.no_build:
        tables = dict(np.load(args.tables))
    else:
        tables = build_tables(args.tables, args.data, args.per_n, args.model, args.chunk)
    tables = {k: t for k, t in tables.items() if int(math.log2(t.size)) in args.per_n}

    methods = {"paper tmc": (est.tmc, None, {"batch_permutations": 1})}
    for per_fact in (2, 3, 4, 8):
        methods[f"kernel_shap {per_fact}(n+1)"] = (est.kernel_shap, per_fact, {})
        methods[f"kernel_shap sampled only {per_fact}(n+1)"] = (est.kernel_shap, per_fact, {"enumerate_strata": False})
        methods[f"antithetic {per_fact}(n+1)"] = (est.antithetic, per_fact, {})
    results: dict[str, list[tuple[float, float, float]]] = {name: [] for name in methods}
    ns = [int(math.log2(t.size)) for t in tables.values()]
    norms = []
    for table in tables.values():
        n = int(math.log2(table.size))
        exact = est.exact_from_table(table, n)
        norms.append(float(np.abs(exact).sum()))
        for name, (fn, per_fact, options) in methods.items():
            runs = []
            for seed in range(args.seeds):
                memo = est.MemoValue(lookup(table, n), n)  # memo.asked: the reference code's forwards
                budget = {} if per_fact is None else {"budget": per_fact * (n + 1)}
                phi, n_evals = fn(memo, n, key=seed, **budget, **options)
                runs.append((float(np.abs(phi - exact).sum()), n_evals, memo.asked))
            results[name].append(tuple(np.mean(runs, axis=0)))

    paper = results["paper tmc"]
    print(
        f"{len(tables)} MedQA cases ({args.model}), n = {sorted(ns)}; {args.seeds} seeds each; L1 error against exact "
        f"phi (median |exact phi|_1 = {statistics.median(norms):.3f})"
    )
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
    print("\n| n | cases | " + " | ".join(f"{name} median / mean" for name in shown) + " |")
    print("|---|---|" + "---|" * len(shown))
    for n in sorted(set(ns)):
        rows = {name: [r[0] for r, m in zip(results[name], ns, strict=True) if m == n] for name in shown}
        cells = " | ".join(f"{statistics.median(v):.3f} / {np.mean(v):.3f}" for v in rows.values())
        print(f"| {n} | {len(rows[shown[0]])} | {cells} |")


if __name__ == "__main__":
    main()
