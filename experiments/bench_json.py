"""The `--json PATH` results of the benchmark scripts, the one schema `experiments/run_benchmarks.py` reads.

    {"script": "bench_sampler", "load": [1 min, 5 min, 15 min], "reps": 5,
     "rows": [{"what": "decode tok/s, batch 1", "unit": "tok/s", "better": "higher", "ours": 37.4,
               "torch": 32.4, "compile_s": 18.0}, ...]}

`torch` is null where the work has no PyTorch counterpart (the MCTS search), and `compile_s` (ours, apart from
every time and rate) is null where it was not measured. The load average is the one at the end of the script.
"""

from __future__ import annotations

import os
from typing import Any

from promed_jax import io

BETTER = ("higher", "lower")


def result_row(
    what: str, unit: str, ours: float, torch: float | None, *, better: str = "higher", compile_s: float | None = None
) -> dict[str, Any]:
    if better not in BETTER:
        raise ValueError(f"better must be one of {BETTER}, got {better!r}")
    return {
        "what": what,
        "unit": unit,
        "better": better,
        "ours": float(ours),
        "torch": None if torch is None else float(torch),
        "compile_s": None if compile_s is None else float(compile_s),
    }


def write_results(path: str | os.PathLike | None, script: str, rows: list[dict[str, Any]], *, reps: int) -> None:
    """Writes the results atomically; `path` None (no `--json`) writes nothing."""
    if path is None:
        return
    io.atomic_write_json(path, {"script": script, "load": list(os.getloadavg()), "reps": reps, "rows": rows})
