"""The Shapley cache: `{workdir}/shapley/<source>.jsonl`, one line per case (promed.md §6).

Each line is `{id, n, phi, w, estimator, n_evals, model, prompt_version}`, appended whole and flushed as the
stage goes; on resume a torn last line is dropped and finished cases are skipped. Later stages read fact
weights from here with `load_weights`.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from collections.abc import Iterable, Mapping

import numpy as np

from promed_jax.io import resume_jsonl

FIELDS = ("id", "n", "phi", "w", "estimator", "n_evals", "model", "prompt_version")


@dataclasses.dataclass(frozen=True)
class ShapleyRecord:
    """One case's Shapley values and fact weights.

    Attributes:
      id: the case id.
      n: number of facts.
      phi: float[n] Shapley values.
      w: float[n] fact weights, softmax(φ/τ), summing to 1.
      estimator: the estimator that produced φ (`exact` up to exact_max_n facts).
      n_evals: distinct coalitions evaluated.
      model: which model θ gave the values.
      prompt_version: the value prompt's version (`prompts.SHAPLEY_PROMPT_VERSION`).
    """

    id: str
    n: int
    phi: tuple[float, ...]
    w: tuple[float, ...]
    estimator: str
    n_evals: int
    model: str
    prompt_version: str

    def to_json(self) -> dict:
        return {f: list(v) if isinstance(v, tuple) else v for f, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_json(cls, record: Mapping, where: str) -> ShapleyRecord:
        missing = [f for f in FIELDS if f not in record]
        if missing:
            raise ValueError(f"{where}: record {record.get('id', '?')}: missing field(s) {', '.join(missing)}")
        n = record["n"]
        for field in ("phi", "w"):
            if not isinstance(record[field], list) or len(record[field]) != n:
                raise ValueError(f"{where}: record {record['id']}: field {field} must be a list of {n} numbers")
        return cls(
            id=record["id"],
            n=n,
            phi=tuple(float(x) for x in record["phi"]),
            w=tuple(float(x) for x in record["w"]),
            estimator=record["estimator"],
            n_evals=int(record["n_evals"]),
            model=record["model"],
            prompt_version=record["prompt_version"],
        )


def cache_path(workdir: str | os.PathLike, source: str) -> pathlib.Path:
    return pathlib.Path(workdir) / "shapley" / f"{source}.jsonl"


def read_cache(path: str | os.PathLike) -> dict[str, ShapleyRecord]:
    """The finished records of a cache file by case id (a torn last line is dropped from the file)."""
    records: dict[str, ShapleyRecord] = {}
    for line, raw in enumerate(resume_jsonl(path), start=1):
        record = ShapleyRecord.from_json(raw, f"{path}: line {line}")
        if record.id in records:
            raise ValueError(f"{path}: line {line}: case {record.id} appears twice")
        records[record.id] = record
    return records


def check_compatible(records: Iterable[ShapleyRecord], *, model: str, prompt_version: str, path) -> None:
    """Refuses to mix values from another model or prompt version into one cache."""
    for record in records:
        if (record.model, record.prompt_version) != (model, prompt_version):
            raise ValueError(
                f"{path}: case {record.id} was computed with model {record.model!r} and prompt "
                f"{record.prompt_version!r}, this run uses {model!r} and {prompt_version!r}; use another workdir"
            )


def load_weights(
    workdir: str | os.PathLike,
    source: str,
    ids: Iterable[str],
    *,
    prompt_version: str | None = None,
    weighting: str = "shapley",
) -> dict[str, np.ndarray]:
    """Fact weights w (float64[n]) of the given cases; a case missing from the cache is an error.

    `weighting='uniform'` gives 1/n per fact instead (the paper's "no Shapley weighting" ablation), still
    requiring the cache so that both arms run on the same cases.
    """
    if weighting not in ("shapley", "uniform"):
        raise ValueError(f"weighting must be 'shapley' or 'uniform', got {weighting!r}")
    path = cache_path(workdir, source)
    records = read_cache(path)
    out = {}
    for case_id in ids:
        if case_id not in records:
            raise KeyError(f"{path}: no Shapley record for case {case_id}; run the shapley stage first")
        record = records[case_id]
        if prompt_version is not None and record.prompt_version != prompt_version:
            raise ValueError(
                f"{path}: case {case_id} has prompt version {record.prompt_version}, want {prompt_version}"
            )
        out[case_id] = np.full(record.n, 1.0 / record.n) if weighting == "uniform" else np.asarray(record.w)
    return out
