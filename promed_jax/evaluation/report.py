"""Evaluation summaries: metrics per mode, source and option count; a markdown table and a plot.

Metrics (promed.md §1): accuracy (no answer counts as wrong), mean number of questions asked, and the share
of episodes that never answered. Each accuracy carries its 95% Wilson score interval (`wilson_interval`).
"""

from __future__ import annotations

import dataclasses
import math
import os
import pathlib
from collections.abc import Iterable, Mapping, Sequence

from promed_jax import io


@dataclasses.dataclass(frozen=True)
class Summary:
    """Metrics of one slice of the results.

    Attributes:
      mode: `reactive`, `proactive` or `full`.
      slice: `all`, `source=<name>` or `options=<k>`.
      n: cases in the slice.
      accuracy: share answered right.
      mean_questions: questions asked per case.
      never_answered: share of cases that ended without an answer.
      ci95: the accuracy's 95% Wilson score interval (low, high).
    """

    mode: str
    slice: str
    n: int
    accuracy: float
    mean_questions: float
    never_answered: float
    ci95: tuple[float, float]


Z95 = 1.959963984540054  # the standard normal's 97.5% quantile


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a binomial share (Wilson 1927): unlike p ± z·sqrt(p(1-p)/n) it stays
    inside [0, 1] and is not empty at 0 or n successes, which small evaluations hit."""
    if n <= 0 or not 0 <= successes <= n:
        raise ValueError(f"wilson_interval: need 0 <= successes <= n and n > 0, got {successes} of {n}")
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    low = 0.0 if successes == 0 else max(0.0, centre - half)  # exact at the ends (rounding leaves ~1e-17)
    high = 1.0 if successes == n else min(1.0, centre + half)
    return low, high


def summarize_slice(mode: str, name: str, records: Sequence[Mapping]) -> Summary:
    n = len(records)
    if n == 0:
        raise ValueError(f"mode {mode}, slice {name}: no records to summarize")
    correct = sum(bool(r["correct"]) for r in records)
    return Summary(
        mode=mode,
        slice=name,
        n=n,
        accuracy=correct / n,
        mean_questions=sum(int(r["n_questions"]) for r in records) / n,
        never_answered=sum(not r["answered"] for r in records) / n,
        ci95=wilson_interval(correct, n),
    )


def summarize(mode: str, records: Sequence[Mapping]) -> list[Summary]:
    """`all`, then one row per source, then one per option count (only where there is more than one)."""
    rows = [summarize_slice(mode, "all", records)]
    for key, label in (("source", "source"), ("n_options", "options")):
        values = sorted({r[key] for r in records})
        if len(values) > 1:
            rows += [summarize_slice(mode, f"{label}={v}", [r for r in records if r[key] == v]) for v in values]
    return rows


def sig_per_question(records: Sequence[Mapping], weights: Mapping[str, Sequence[float]]) -> float | None:
    """SIG collected per question asked: over the records whose case has fact weights w (a Shapley cache),
    the weight of the facts the questions revealed (`revealed_turn` k >= 1; facts known at the start, 0, are
    not the doctor's doing) divided by the questions asked, both summed over the cases (a ratio of sums, so
    a case with more questions counts more). None when no record has weights or none asked anything."""
    collected, asked = 0.0, 0
    for r in records:
        w = weights.get(r["id"])
        if w is None:
            continue
        turns = r["revealed_turn"]
        if len(turns) != len(w):
            raise ValueError(f"case {r['id']}: {len(turns)} facts in the result line, {len(w)} weights")
        collected += sum(wi for wi, t in zip(w, turns, strict=True) if t >= 1)
        asked += int(r["n_questions"])
    return collected / asked if asked else None


def markdown_table(rows: Iterable[Summary]) -> str:
    lines = [
        "| mode | slice | cases | accuracy | 95% interval | mean questions | never answered |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r.mode} | {r.slice} | {r.n} | {r.accuracy:.1%} | {r.ci95[0]:.1%}–{r.ci95[1]:.1%} "
        f"| {r.mean_questions:.2f} | {r.never_answered:.1%} |"
        for r in rows
    ]
    return "\n".join(lines) + "\n"


def plot_accuracy_vs_questions(rows: Sequence[Summary], path: str | os.PathLike, *, title: str = "") -> None:
    """One point per mode (slice `all`): accuracy, with its 95% interval, against mean questions asked."""
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state

    overall = [r for r in rows if r.slice == "all"]
    fig = Figure(figsize=(5, 4))
    ax = fig.subplots()
    for r in overall:
        low, high = 100 * r.ci95[0], 100 * r.ci95[1]
        ax.errorbar(
            r.mean_questions, 100 * r.accuracy, yerr=[[100 * r.accuracy - low], [high - 100 * r.accuracy]], fmt="o",
            capsize=3, markersize=7,
        )
        ax.annotate(r.mode, (r.mean_questions, 100 * r.accuracy), textcoords="offset points", xytext=(6, 4))
    ax.set_xlabel("mean questions asked")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_xlim(-0.5, max([10.5] + [r.mean_questions + 0.5 for r in overall]))
    ax.grid(alpha=0.3)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    with io.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)


def write_report(out_dir: str | os.PathLike, rows: Sequence[Summary], *, title: str = "") -> pathlib.Path:
    """Writes `summary.md`, `summary.json` and `accuracy_vs_questions.png` into `out_dir`; returns the table's path."""
    out = pathlib.Path(out_dir)
    table = markdown_table(rows)
    io.atomic_write_text(out / "summary.md", (f"# {title}\n\n" if title else "") + table)
    io.atomic_write_json(out / "summary.json", [dataclasses.asdict(r) for r in rows])
    plot_accuracy_vs_questions(rows, out / "accuracy_vs_questions.png", title=title)
    return out / "summary.md"
