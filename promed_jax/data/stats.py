"""Per-source statistics of the configured cases (`config.mode='data'`): printed and written as markdown."""

from __future__ import annotations

import collections
import dataclasses
import pathlib
from collections.abc import Sequence

import numpy as np

from promed_jax import io
from promed_jax.data.cases import Case, LoadResult
from promed_jax.data.sources import load_from_config


@dataclasses.dataclass(frozen=True)
class SourceStats:
    """Statistics of one source's cases (files of the same source are pooled)."""

    source: str
    language: str
    cases: int
    options: dict[int, int]  # option count -> number of cases
    facts_mean: float
    facts_min: int
    facts_max: int
    known_mean: float
    multi_answer_share: float
    skipped: int
    dropped_options: int
    dropped_facts: int


def source_stats(source: str, cases: Sequence[Case], results: Sequence[LoadResult]) -> SourceStats:
    n_facts = np.array([case.n_facts for case in cases]) if cases else np.zeros(1, int)
    return SourceStats(
        source=source,
        language=",".join(sorted({case.language for case in cases})),
        cases=len(cases),
        options=dict(sorted(collections.Counter(len(case.options) for case in cases).items())),
        facts_mean=float(n_facts.mean()),
        facts_min=int(n_facts.min()),
        facts_max=int(n_facts.max()),
        known_mean=float(np.mean([len(case.known) for case in cases])) if cases else 0.0,
        multi_answer_share=float(np.mean([case.multi_answer for case in cases])) if cases else 0.0,
        skipped=sum(len(r.errors) for r in results),
        dropped_options=sum(r.dropped_options for r in results),
        dropped_facts=sum(r.dropped_facts for r in results),
    )


def collect(results: Sequence[LoadResult]) -> list[SourceStats]:
    by_source: dict[str, list[Case]] = collections.defaultdict(list)
    results_of: dict[str, list[LoadResult]] = collections.defaultdict(list)
    for result in results:
        sources = {case.source for case in result.cases} or {result.path.name}
        for case in result.cases:
            by_source[case.source].append(case)
        for source in sources:
            results_of[source].append(result)
    return [source_stats(source, by_source[source], results_of[source]) for source in results_of]


def markdown_table(stats: Sequence[SourceStats]) -> str:
    header = (
        "| source | lang | cases | options (count: cases) | facts/case mean [min-max] | known at start | "
        "multi-answer | skipped | dropped empty options | dropped empty facts |"
    )
    rows = [header, "|" + "---|" * 10]
    for s in stats:
        options = ", ".join(f"{k}: {v}" for k, v in s.options.items())
        rows.append(
            f"| {s.source} | {s.language} | {s.cases} | {options} | {s.facts_mean:.2f} [{s.facts_min}-{s.facts_max}] | "
            f"{s.known_mean:.2f} | {s.multi_answer_share:.1%} | {s.skipped} | {s.dropped_options} | {s.dropped_facts} |"
        )
    return "\n".join(rows) + "\n"


def run(config, workdir: str) -> list[SourceStats]:
    """Loads the configured data, prints the table and writes `{workdir}/data/stats.md`."""
    results = load_from_config(config.data, stage="data")
    stats = collect(results)
    table = markdown_table(stats)
    print(table, end="")
    io.atomic_write_text(pathlib.Path(workdir) / "data" / "stats.md", table)
    return stats
