"""Runs every benchmark script at its smoke size and prints one table of ratios against the PyTorch way.

    nice -n 5 python experiments/run_benchmarks.py [--only bench_sampler,bench_mcts] [--out FILE.md] [--logs DIR]

Each script runs as a subprocess with `--quick --reps 5 --json <file>` (medians of 5; bench_shapley's median is
over its 2 five-fact cases) under its own timeout (about 1.2x what it took on 2 idle cores; the GRPO step
takes the most); the timeouts add up to 15 minutes, what the whole run is sized for on 2 CPU cores. torch runs
as each script runs it (inference mode where it does not train, 2 threads, the KV cache on). A script's printed
output goes to `<logs>/<name>.log`. The table has one row per measurement (`experiments/bench_json.py`): ours,
torch, the ratio (ours' speed-up: ours / torch for a rate, torch / ours for a time, so above 1 is ours faster),
our compile time apart, and the load average when the script ended. A script that fails or runs out of time is
one row saying so.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence

HERE = pathlib.Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:
    sys.path.insert(0, str(HERE.parent))  # experiments/ is not an installed package

from promed_jax import io


@dataclasses.dataclass(frozen=True)
class Bench:
    """One benchmark run: `experiments/<script>.py <args> --json <file>` within `timeout_s`."""

    name: str
    script: str
    args: tuple[str, ...]
    timeout_s: int


BENCHES = (
    Bench("bench_sampler", "bench_sampler", ("--quick", "--reps", "5"), 125),
    Bench("bench_shapley", "bench_shapley", ("--quick", "--methods", "exact,ks8"), 185),
    Bench("bench_mcts", "bench_mcts", ("--quick", "--reps", "5"), 45),
    Bench("bench_train", "bench_train", ("--quick", "--reps", "5"), 125),
    Bench("bench_train --grpo", "bench_train", ("--grpo", "--quick", "--reps", "5"), 420),
)


@dataclasses.dataclass(frozen=True)
class Outcome:
    """How a script ended: its exit code (None: killed at the timeout) and the last line it wrote."""

    returncode: int | None
    last_line: str = ""


Runner = Callable[[Bench, pathlib.Path, pathlib.Path], Outcome]


def run_script(bench: Bench, json_path: pathlib.Path, log_path: pathlib.Path) -> Outcome:
    argv = [sys.executable, str(HERE / f"{bench.script}.py"), *bench.args, "--json", str(json_path)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE.parent), os.environ.get("PYTHONPATH")]))}
    with open(log_path, "w") as log:
        try:
            code = subprocess.run(
                argv, check=False, stdout=log, stderr=subprocess.STDOUT, timeout=bench.timeout_s, env=env
            ).returncode
        except subprocess.TimeoutExpired:
            code = None
    lines = [line.strip() for line in log_path.read_text(errors="replace").splitlines() if line.strip()]
    return Outcome(code, lines[-1] if lines else "")


def speedup(row: dict) -> float | None:
    """Ours' speed-up over torch: above 1 is ours faster, whichever way the unit points."""
    if row["torch"] is None or not row["ours"] or not row["torch"]:
        return None
    return row["ours"] / row["torch"] if row["better"] == "higher" else row["torch"] / row["ours"]


def table_rows(bench: Bench, json_path: pathlib.Path, outcome: Outcome) -> list[list[str]]:
    """The table's rows for one script: its measurements, or one row saying why there are none."""
    if outcome.returncode is None:
        return [[bench.name, f"timed out after {bench.timeout_s} s", "", "", "", "", ""]]
    if outcome.returncode != 0:
        return [[bench.name, f"failed (exit {outcome.returncode}): {outcome.last_line}"[:200], "", "", "", "", ""]]
    try:
        results = json.loads(json_path.read_text())
        load = f"{results['load'][0]:.1f}"
        out = []
        for row in results["rows"]:
            ratio = speedup(row)
            compile_s = row.get("compile_s")
            out.append(
                [
                    bench.name,
                    row["what"],
                    f"{row['ours']:.4g} {row['unit']}",
                    "n/a" if row["torch"] is None else f"{row['torch']:.4g} {row['unit']}",
                    "n/a" if ratio is None else f"{ratio:.2f}x",
                    "" if compile_s is None else f"{compile_s:.1f}",
                    load,
                ]
            )
    except (OSError, ValueError, KeyError, TypeError, IndexError) as err:
        return [[bench.name, f"no readable results in {json_path.name} ({type(err).__name__}: {err})", *[""] * 5]]
    return out or [[bench.name, "no measurements written", "", "", "", "", load]]


HEADER = ["script", "what", "ours", "torch", "ratio (ours faster > 1)", "compile s (ours)", "load (1 min)"]


def markdown(rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(cell.replace("|", "/") for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def run_all(benches: Sequence[Bench], logs: pathlib.Path, runner: Runner = run_script) -> list[list[str]]:
    logs.mkdir(parents=True, exist_ok=True)
    rows = []
    for bench in benches:
        stem = bench.name.replace(" --", "_").replace(" ", "_")
        json_path = logs / f"{stem}.json"
        json_path.unlink(missing_ok=True)
        print(f"{bench.name}: running (timeout {bench.timeout_s} s, load {os.getloadavg()[0]:.1f})", flush=True)
        outcome = runner(bench, json_path, logs / f"{stem}.log")
        rows += table_rows(bench, json_path, outcome)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="comma-separated names among: " + ", ".join(b.name for b in BENCHES))
    parser.add_argument("--out", type=pathlib.Path, help="also write the table to this markdown file")
    parser.add_argument("--logs", type=pathlib.Path, help="each script's output and JSON (default: a temporary folder)")
    args = parser.parse_args(argv)
    wanted = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = sorted(set(wanted) - {b.name for b in BENCHES})
    if unknown:
        print(
            f"error: unknown benchmark {', '.join(unknown)}; known: {', '.join(b.name for b in BENCHES)}",
            file=sys.stderr,
        )
        return 1
    benches = [b for b in BENCHES if not wanted or b.name in wanted]
    logs = args.logs or pathlib.Path(tempfile.mkdtemp(prefix="promed_bench_"))
    start = os.getloadavg()
    rows = run_all(benches, logs)
    table = markdown(rows)
    footer = f"\nload average (1, 5, 15 min) at the start {start}, at the end {os.getloadavg()}; logs in {logs}\n"
    print("\n" + table + footer, end="")
    if args.out:
        io.atomic_write_text(args.out, table + footer)
    return 0


if __name__ == "__main__":
    sys.exit(main())
