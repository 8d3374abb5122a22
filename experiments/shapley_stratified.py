"""Wall time and peak RSS of the shapley stage with SmolLM2 on a stratified sample of MedQA dev cases.

Draws `--per-bucket` cases (seeded) from each fact-count bucket (n <= 5, 6-8, 9-10, 11-15, 16-20, > 20) and
runs each as the shapley stage does (`configs/shapley.py:smollm`: its game, its estimator chooser and
budget), round-robin over the buckets so that a run cut short still covers every bucket. One JSON line per
case is appended as it goes (resumable: ids already in `--out` are skipped) with n, estimator, coalitions,
wall time, its JAX compilation part (jax.monitoring events), the groups the memory budget cut calls into,
and the case's peak RSS (VmHWM, reset before each case through /proc/self/clear_refs). Then it prints a
table per bucket and extrapolates the whole file from the buckets' mean warm times (wall - compile),
weighted by the file's n distribution, plus the compilation seen once.

    nice -n 10 python experiments/shapley_stratified.py --out /tmp/strat.jsonl           # the 60 cases
    nice -n 10 python experiments/shapley_stratified.py --out /tmp/big.jsonl --ids medqa_dev_convo:1113  # one case
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import sys
import time

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))  # configs/ is not an installed package (as in experiments/sweep.py)

import numpy as np

from configs import shapley as shapley_config
from experiments.bench_shapley import DATA, CompileClock
from promed_jax.data.cases import Case, load_cases
from promed_jax.shapley import run as run_lib

BUCKETS = ((1, 5), (6, 8), (9, 10), (11, 15), (16, 20), (21, 10**6))


def bucket_of(n: int) -> int:
    return next(i for i, (lo, hi) in enumerate(BUCKETS) if lo <= n <= hi)


def bucket_name(i: int) -> str:
    lo, hi = BUCKETS[i]
    return f"> {lo - 1}" if hi == 10**6 else f"{lo}-{hi}"


def stratified(cases: list[Case], per_bucket: int, seed: int) -> list[Case]:
    """`per_bucket` cases of each bucket (fewer if the bucket is smaller), round-robin over the buckets."""
    rng = np.random.default_rng(seed)
    picked = []
    for i in range(len(BUCKETS)):
        members = [c for c in cases if bucket_of(c.n_facts) == i]
        chosen = sorted(rng.choice(len(members), size=min(per_bucket, len(members)), replace=False))
        picked.append([members[j] for j in chosen])
    return [group[j] for j in range(per_bucket) for group in picked if j < len(group)]


def peak_rss_mb() -> float:
    """This process's peak resident set since the last reset, in MB (VmHWM)."""
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def reset_peak_rss() -> None:
    pathlib.Path("/proc/self/clear_refs").write_text("5")


def run_cases(cases: list[Case], out: pathlib.Path, config) -> None:
    done = {json.loads(line)["id"] for line in out.read_text().splitlines() if line.strip()} if out.exists() else set()
    todo = [c for c in cases if c.id not in done]
    print(f"{len(done)} cases done, {len(todo)} to do -> {out}", flush=True)
    if not todo:
        return
    clock = CompileClock()
    game = run_lib._make_game(config)
    groups = []
    plans = game.plans

    def counted_plans(prompt, coalitions):
        result = plans(prompt, coalitions)
        groups.append(len(result))
        return result

    game.plans = counted_plans
    for case in todo:
        groups.clear()
        reset_peak_rss()
        compiled = clock.seconds
        start = time.perf_counter()
        _phi, n_evals, plan = run_lib.shapley_values(game, case, config.shapley)
        wall = time.perf_counter() - start
        row = {
            "id": case.id,
            "n": case.n_facts,
            "estimator": plan.name,
            "coalitions": n_evals,
            "wall_s": round(wall, 3),
            "compile_s": round(clock.seconds - compiled, 3),
            "calls": len(groups),
            "max_groups": max(groups, default=0),
            "peak_rss_mb": round(peak_rss_mb(), 1),
            "load": round(os.getloadavg()[0], 2),
        }
        with out.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)


def report(out: pathlib.Path, cases: list[Case]) -> None:
    rows = [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
    by_bucket: dict[int, list[dict]] = {}
    for r in rows:
        by_bucket.setdefault(bucket_of(r["n"]), []).append(r)
    in_file = [0] * len(BUCKETS)
    for c in cases:
        in_file[bucket_of(c.n_facts)] += 1
    print(f"\n{len(rows)} cases measured ({out}); the file has {len(cases)} valid cases")
    print("| n | cases | in file | estimator | coalitions (mean) | wall s (mean) | warm s (mean) | compile s (sum) "
          "| s / coalition (warm) | peak RSS MB (max) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    total, compile_total, missing = 0.0, 0.0, []
    for i in range(len(BUCKETS)):
        group = by_bucket.get(i, [])
        if not group:
            missing.append(bucket_name(i))
            continue
        warm = [r["wall_s"] - r["compile_s"] for r in group]
        coalitions = [r["coalitions"] for r in group]
        total += in_file[i] * statistics.mean(warm)
        compile_total += sum(r["compile_s"] for r in group)
        print(
            f"| {bucket_name(i)} | {len(group)} | {in_file[i]} | {'/'.join(sorted({r['estimator'] for r in group}))} "
            f"| {statistics.mean(coalitions):.0f} | {statistics.mean(r['wall_s'] for r in group):.1f} "
            f"| {statistics.mean(warm):.1f} | {sum(r['compile_s'] for r in group):.0f} "
            f"| {sum(warm) / sum(coalitions):.3f} | {max(r['peak_rss_mb'] for r in group):.0f} |"
        )
    print(
        f"whole file: {total / 3600:.1f} h warm (bucket means x the file's cases per bucket) + {compile_total / 60:.0f}"
        " min of compilation seen in this sample (an upper bound on the one-time compilation)"
        + (f"; NOT measured: buckets {', '.join(missing)}" if missing else "")
    )
    print(f"load average now: {os.getloadavg()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=pathlib.Path, required=True)
    parser.add_argument("--data", type=pathlib.Path, default=DATA)
    parser.add_argument("--per-bucket", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ids", default="", help="comma-separated case ids to run instead of the sample")
    parser.add_argument("--max-cache-bytes", type=int, default=0, help="override shapley.max_cache_bytes")
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args()
    config = shapley_config.get_config("smollm")
    if args.max_cache_bytes:
        config.shapley.max_cache_bytes = args.max_cache_bytes
    cases = load_cases(args.data, on_error="skip")
    if args.ids:
        wanted = args.ids.split(",")
        chosen = [c for c in cases if c.id in wanted]
        if len(chosen) != len(wanted):
            sys.exit(f"not all of {wanted} are in {args.data}")
    else:
        chosen = stratified(cases, args.per_bucket, args.seed)
    if not args.report_only:
        run_cases(chosen, args.out, config)
    report(args.out, cases)


if __name__ == "__main__":
    main()
