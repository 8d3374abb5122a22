"""Wall time and peak RSS of the shapley stage with SmolLM2 on a stratified sample of MedQA dev cases.

Draws `--per-bucket` cases (seeded) from each fact-count bucket (n <= 5, 6-8, 9-10, 11-15, 16-20, > 20) and
runs each as the shapley stage does (`configs/shapley.py:smollm`: its game, its estimator chooser and
budget), round-robin over the buckets so that a run cut short still covers every bucket. One JSON line per
case is appended as it goes (resumable: ids already in `--out` are skipped) with n, estimator, coalitions,
wall time, its JAX compilation part (jax.monitoring events), the groups the memory budget cut calls into,
the case's process CPU time (user + sys), the 1-minute load average at its start (`load_start`) and end
(`load`), the case's peak RSS (VmHWM, reset before each case through /proc/self/clear_refs) and, after it,
the resident set, the compiled executables held and glibc's heap (in use / freed but kept: where the RSS
goes). Then it prints a table per bucket (wall and CPU seconds side by side) and extrapolates the whole file
twice, weighted by the file's n distribution: from the buckets' mean warm wall times (wall - compile), plus
the compilation seen once, and from CPU time divided by the CPU-per-wall ratio of the least loaded cases (on
a shared machine the wall times are inflated by the other jobs; see `cpu_per_wall`).

`--first IDS` runs those cases before the sample and `--made-up-48` first of all a 48-fact case made of real
facts (the file's largest case has 35): the facts of medqa_dev_convo:1113 (35) and the first 13 of
medqa_dev_convo:1209 (35), with 1113's question, options and answer. They are reported apart from the sample.

    nice -n 10 python experiments/shapley_stratified.py --out /tmp/strat.jsonl           # the 60 cases
    nice -n 10 python experiments/shapley_stratified.py --out /tmp/big.jsonl --ids medqa_dev_convo:1113  # one case
    nice -n 5 python experiments/shapley_stratified.py --out /tmp/all.jsonl --made-up-48 --first medqa_dev_convo:1113
"""

from __future__ import annotations

import argparse
import dataclasses
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
from promed_jax.shapley import memory
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


def made_up_48(cases: list[Case]) -> Case:
    """48 real facts: medqa_dev_convo:1113's 35 and the first 13 of medqa_dev_convo:1209, with 1113's question."""
    by_id = {c.id: c for c in cases}
    base, other = by_id["medqa_dev_convo:1113"], by_id["medqa_dev_convo:1209"]
    facts = base.facts + tuple(f for f in other.facts if f not in base.facts)[:13]
    assert len(facts) == 48
    return dataclasses.replace(base, id="made_up:48", source="made_up", facts=facts, known=())


def run_cases(cases: list[Case], out: pathlib.Path, config, extra: frozenset[str] = frozenset()) -> None:
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
        memory.reset_peak_rss()
        compiled = clock.seconds
        load_start = os.getloadavg()[0]
        cpu_start, start = time.process_time(), time.perf_counter()
        _phi, n_evals, plan = run_lib.shapley_values(game, case, config.shapley)
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
        row = {
            "id": case.id,
            "n": case.n_facts,
            "estimator": plan.name,
            "coalitions": n_evals,
            "wall_s": round(wall, 3),
            "cpu_s": round(cpu, 3),
            "compile_s": round(clock.seconds - compiled, 3),
            "calls": len(groups),
            "max_groups": max(groups, default=0),
            "peak_rss_mb": round(memory.peak_rss_mb(), 1),
            "rss_after_mb": round(memory.rss_mb(), 1),
            "executables": game.executables,
            "load_start": round(load_start, 2),
            "load": round(os.getloadavg()[0], 2),
        }
        heap = memory.heap_stats()
        if heap is not None:
            row.update(heap_in_use_mb=round(heap.in_use), heap_free_mb=round(heap.free))
        if case.id in extra:
            row["extra"] = True
        with out.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)


def loads_of(row: dict) -> list[float]:
    """The 1-minute load averages seen at a case's start and end (older rows have only the end's)."""
    return [row[k] for k in ("load_start", "load") if k in row]


def cpu_per_wall(rows: list[dict]) -> tuple[float | None, int]:
    """The median CPU s / wall s of the least loaded quarter of the rows (at least 3), and how many that is.

    On a machine shared with other jobs a case's wall time is inflated by the others' load but its CPU time
    much less, so CPU time divided by the ratio seen when the machine was calmest estimates the wall time an
    unshared machine would take. None when fewer than 3 rows carry CPU time.
    """
    timed = [r for r in rows if "cpu_s" in r and r["wall_s"] > 0]
    if len(timed) < 3:
        return None, 0
    calm = sorted(timed, key=lambda r: statistics.mean(loads_of(r)))[: max(3, len(timed) // 4)]
    return statistics.median(r["cpu_s"] / r["wall_s"] for r in calm), len(calm)


def unloaded_warm(row: dict, ratio: float) -> float:
    """A case's warm seconds on an unshared machine: CPU s / ratio, less the wall share spent compiling."""
    return row["cpu_s"] / ratio * (1 - row["compile_s"] / row["wall_s"])


def report(out: pathlib.Path, cases: list[Case]) -> None:
    rows = [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
    for r in rows:
        if r.get("extra"):
            print(
                f"apart from the sample: {r['id']} n={r['n']} {r['estimator']} {r['coalitions']} coalitions, "
                f"{r['wall_s']:.0f} s ({r['compile_s']:.0f} s compiling), peak RSS {r['peak_rss_mb']:.0f} MB, "
                f"load {r['load']}"
            )
    rows = [r for r in rows if not r.get("extra")]
    if not rows:
        return
    by_bucket: dict[int, list[dict]] = {}
    for r in rows:
        by_bucket.setdefault(bucket_of(r["n"]), []).append(r)
    in_file = [0] * len(BUCKETS)
    for c in cases:
        in_file[bucket_of(c.n_facts)] += 1
    ratio, calm = cpu_per_wall(rows)
    print(f"\n{len(rows)} cases measured ({out}); the file has {len(cases)} valid cases")
    print(
        "| n | cases | in file | estimator | coalitions (mean) | wall s (median / max) | CPU s (median / max) "
        "| warm wall s (mean) | compile s (sum) | peak RSS MB (max) | load (min-max) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    wall_total, cpu_total, compile_total, missing = 0.0, 0.0, 0.0, []
    for i in range(len(BUCKETS)):
        group = by_bucket.get(i, [])
        if not group:
            missing.append(bucket_name(i))
            continue
        warm = [r["wall_s"] - r["compile_s"] for r in group]
        wall_total += in_file[i] * statistics.mean(warm)
        if ratio is not None and all("cpu_s" in r for r in group):
            cpu_total += in_file[i] * statistics.mean(unloaded_warm(r, ratio) for r in group)
        compile_total += sum(r["compile_s"] for r in group)
        walls, cpus = [r["wall_s"] for r in group], [r.get("cpu_s", float("nan")) for r in group]
        loads = [x for r in group for x in loads_of(r)]
        print(
            f"| {bucket_name(i)} | {len(group)} | {in_file[i]} | {'/'.join(sorted({r['estimator'] for r in group}))} "
            f"| {statistics.mean(r['coalitions'] for r in group):.0f} "
            f"| {statistics.median(walls):.1f} / {max(walls):.1f} | {statistics.median(cpus):.1f} / {max(cpus):.1f} "
            f"| {statistics.mean(warm):.1f} | {sum(r['compile_s'] for r in group):.0f} "
            f"| {max(r['peak_rss_mb'] for r in group):.0f} | {min(loads):.1f}-{max(loads):.1f} |"
        )
    not_measured = f"; NOT measured: buckets {', '.join(missing)}" if missing else ""
    print(
        f"whole file from wall times: {wall_total / 3600:.1f} h warm (bucket means of wall - compile x the file's "
        f"cases per bucket) + {compile_total / 60:.0f} min of compilation seen in this sample (an upper bound on the "
        f"one-time compilation){not_measured}"
    )
    if ratio is not None:
        print(
            f"whole file from CPU time: {cpu_total / 3600:.1f} h warm (each case's CPU s / {ratio:.2f}, the median "
            f"CPU-per-wall ratio of the {calm} least loaded cases, less its compile share; same weighting)"
            f"{not_measured}"
        )
    print(f"load average now: {os.getloadavg()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=pathlib.Path, required=True)
    parser.add_argument("--data", type=pathlib.Path, default=DATA)
    parser.add_argument("--per-bucket", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ids", default="", help="comma-separated case ids to run instead of the sample")
    parser.add_argument("--first", default="", help="comma-separated case ids to run before the sample")
    parser.add_argument("--made-up-48", action="store_true", help="first of all, a 48-fact case of real facts")
    parser.add_argument("--max-cache-bytes", type=int, default=0, help="override shapley.max_cache_bytes")
    parser.add_argument("--max-executables", type=int, default=-1, help="override shapley.max_executables")
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args()
    config = shapley_config.get_config("smollm")
    if args.max_cache_bytes:
        config.shapley.max_cache_bytes = args.max_cache_bytes
    if args.max_executables >= 0:
        config.shapley.max_executables = args.max_executables
    cases = load_cases(args.data, on_error="skip")
    if args.ids:
        wanted = args.ids.split(",")
        chosen = [c for c in cases if c.id in wanted]
        if len(chosen) != len(wanted):
            sys.exit(f"not all of {wanted} are in {args.data}")
    else:
        chosen = stratified(cases, args.per_bucket, args.seed)
    by_id = {c.id: c for c in cases}
    first = [by_id[i] for i in args.first.split(",") if i and i in by_id and by_id[i] not in chosen]
    if args.first and len(first) != len([i for i in args.first.split(",") if by_id.get(i) not in chosen]):
        sys.exit(f"not all of {args.first} are in {args.data}")
    first = ([made_up_48(cases)] if args.made_up_48 else []) + first
    if not args.report_only:
        run_cases(first + chosen, args.out, config, extra=frozenset(c.id for c in first))
    report(args.out, cases)


if __name__ == "__main__":
    main()
