"""Collects the pipeline results of a sweep's points into one markdown table.

    python experiments/sweep.py configs/rl.py --workdir=runs/ablations | bash
    python experiments/ablations.py runs/ablations [--config configs/rl.py] [--out FILE.md]

Every point folder of the sweep (`<workdir>/<point name>/`, experiments/sweep.py's `point_name`) is one row:
ProMed's accuracy with its 95% interval and n, Stage 1's accuracy, and ProMed's questions asked, SIG per
question and no-answer share, read from `<point>/pipeline/results.json`. With `--config`, the points the
config's `sweep` lists are rows too, named by their full overrides, whether their folder exists or not. A point
without results is one "not run" line under the table; a malformed results.json is one line naming the file and
the field (also written to stderr as `error: ...`, and the exit code is 1).
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import sys
from collections.abc import Mapping, Sequence
from typing import Any

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))  # experiments/ is not an installed package

from experiments import sweep
from promed_jax import io, pipeline
from promed_jax.errors import CacheError

RESULTS = pathlib.Path("pipeline") / "results.json"
DOCTORS = tuple(d.name for d in pipeline.DOCTORS)
MODES = ("reactive", "proactive", "full")
NUMBER = (int, float)


def _field(obj: Mapping, key: str, kinds: tuple[type, ...], where: str, *, nullable: bool = False) -> Any:
    if key not in obj:
        raise CacheError(f"{where}: field {key!r} is missing")
    value = obj[key]
    if value is None and nullable:
        return None
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise CacheError(f"{where}: field {key!r} must be {' or '.join(k.__name__ for k in kinds)}, got {value!r}")
    return value


def _row(row: Any, where: str) -> dict[str, Any]:
    if not isinstance(row, dict):
        raise CacheError(f"{where}: must be an object, got {row!r}")
    doctor = _field(row, "doctor", (str,), where)
    if doctor not in DOCTORS:
        raise CacheError(f"{where}: field 'doctor' must be one of {', '.join(DOCTORS)}, got {doctor!r}")
    if _field(row, "mode", (str,), where) not in MODES:
        raise CacheError(f"{where}: field 'mode' must be one of {', '.join(MODES)}, got {row['mode']!r}")
    _field(row, "label", (str,), where)
    n = _field(row, "n", (int,), where)
    correct = _field(row, "correct", (int,), where)
    if not 0 <= correct <= n:
        raise CacheError(f"{where}: field 'correct' must be within 0..n = {n}, got {correct}")
    for key in ("accuracy", "no_answer"):
        if not 0.0 <= _field(row, key, NUMBER, where) <= 1.0:
            raise CacheError(f"{where}: field {key!r} must be within [0, 1], got {row[key]!r}")
    _field(row, "mean_questions", NUMBER, where)
    _field(row, "sig_per_question", NUMBER, where, nullable=True)
    ci = _field(row, "ci95", (list,), where)
    if len(ci) != 2 or not all(isinstance(x, NUMBER) and not isinstance(x, bool) for x in ci) or ci[0] > ci[1]:
        raise CacheError(f"{where}: field 'ci95' must be [lo, hi] with lo <= hi, got {ci!r}")
    return row


def read_results(path: pathlib.Path) -> dict[str, Any]:
    """The pipeline's results.json, checked field by field (CacheError names the file and the field)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CacheError(f"{path}: not readable as JSON ({err})") from None
    if not isinstance(data, dict):
        raise CacheError(f"{path}: must hold a JSON object")
    rows = _field(data, "rows", (list,), str(path))
    checked = [_row(row, f"{path}: rows[{i}]") for i, row in enumerate(rows)]
    doctors = [row["doctor"] for row in checked]
    if len(set(doctors)) != len(doctors):
        raise CacheError(f"{path}: field 'rows': a doctor appears twice ({doctors})")
    _field(data, "wall_s", NUMBER, str(path))
    return {**data, "rows": checked}


def _percent(x: float) -> str:
    return f"{100 * x:.1f}%"


def _number(x: float | None) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.2f}"


def point_label(name: str) -> str:
    """A point folder's name without its index, its overrides spaced: `02_weighting=uniform` -> `weighting=uniform`."""
    index, _, rest = name.partition("_")
    return (rest if index.isdigit() else name).replace(",", ", ") or "(the paper's settings)"


HEADER = (
    "| point | ProMed accuracy [95% CI] | n | Stage 1 accuracy | questions asked | SIG per question | no answer | wall s |",
    "|---|---:|---:|---:|---:|---:|---:|---:|",
)


def table_line(label: str, results: Mapping[str, Any]) -> str:
    by_doctor = {row["doctor"]: row for row in results["rows"]}
    promed, stage1 = by_doctor.get("promed"), by_doctor.get("stage1")
    cells = [label]
    if promed is None:
        cells += ["—", "—"]
    else:
        lo, hi = promed["ci95"]
        cells += [f"{_percent(promed['accuracy'])} [{100 * lo:.1f}, {100 * hi:.1f}]", str(promed["n"])]
    cells.append("—" if stage1 is None else _percent(stage1["accuracy"]))
    if promed is None:
        cells += ["—", "—", "—"]
    else:
        cells += [_number(promed["mean_questions"]), _number(promed["sig_per_question"]), _percent(promed["no_answer"])]
    cells.append(f"{results['wall_s']:.0f}")
    return "| " + " | ".join(cells) + " |"


def expected_points(config_arg: str) -> dict[str, str]:
    """Point folder name -> its full overrides, from the config's `sweep` (experiments/sweep.py's names)."""
    path, _, _preset = config_arg.partition(":")
    points = sweep.sweep_points(sweep.load_config_module(path))
    return {
        sweep.point_name(i, point): ", ".join(f"{k}={sweep.flag_value(v)}" for k, v in point.items())
        or "(the paper's settings)"
        for i, point in enumerate(points)
    }


def collect(workdir: pathlib.Path, expected: Mapping[str, str] | None = None) -> tuple[str, list[str]]:
    """(the markdown report, the error lines of malformed results)."""
    labels = dict(expected or {})
    if workdir.is_dir():
        for folder in sorted(p for p in workdir.iterdir() if p.is_dir() and p.name != sweep.SHARED):
            labels.setdefault(folder.name, point_label(folder.name))
    lines, missing, errors = list(HEADER), [], []
    for name in sorted(labels):
        path = workdir / name / RESULTS
        if not path.is_file():
            missing.append(f"- {labels[name]}: not run (no {path})")
            continue
        try:
            lines.append(table_line(labels[name], read_results(path)))
        except CacheError as err:
            errors.append(str(err))
            missing.append(f"- {labels[name]}: malformed: {err}")
    report = "\n".join(lines) + "\n"
    if missing:
        report += "\n" + "\n".join(missing) + "\n"
    return report, errors


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdir", type=pathlib.Path, help="the sweep's --workdir (one folder per point)")
    parser.add_argument("--config", help="also list the points this config's sweep expects (configs/rl.py[:preset])")
    parser.add_argument("--out", type=pathlib.Path, help="also write the table to this markdown file")
    args = parser.parse_args(argv)
    if not args.workdir.is_dir() and not args.config:
        print(f"error: {args.workdir}: no such sweep folder", file=sys.stderr)
        return 1
    try:
        expected = expected_points(args.config) if args.config else None
    except (OSError, AttributeError, ValueError) as err:
        print(f"error: --config {args.config}: {err}", file=sys.stderr)
        return 1
    report, errors = collect(args.workdir, expected)
    print(report, end="")
    if args.out:
        io.atomic_write_text(args.out, report)
    for line in errors:
        print(f"error: {line}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
