"""The Shapley cache: `{workdir}/shapley/<source>.jsonl`, one line per case (promed.md §6).

Each line is `{id, fingerprint, n, phi, w, estimator, n_evals, model, prompt_version}`, appended whole and
flushed as the stage goes; on resume a torn last line is dropped and finished cases are skipped. Every field is
validated on read, and a record is used only for the case whose fingerprint it carries (`check_cases`): an id
of another file or an edited case is refused. `{workdir}/shapley/run.json` holds the folder's provenance
(`promed_jax.provenance`). Later stages read fact weights from here with `load_weights`.
"""

from __future__ import annotations

import dataclasses
import math
import os
import pathlib
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from promed_jax import registry
from promed_jax.data.cases import Case
from promed_jax.errors import CacheError
from promed_jax.fields import FieldError, count, exact_fields, finite_numbers, matching, text
from promed_jax.io import resume_jsonl
from promed_jax.provenance import FINGERPRINT, check_fingerprint
from promed_jax.shapley.estimators import KIND as ESTIMATOR_KIND

FIELDS = ("id", "fingerprint", "n", "phi", "w", "estimator", "n_evals", "model", "prompt_version")
W_SUM_TOL = 1e-6  # w = softmax(φ/τ) sums to 1 up to rounding


@dataclasses.dataclass(frozen=True)
class ShapleyRecord:
    """One case's Shapley values and fact weights.

    Attributes:
      id: the case id.
      fingerprint: the case's `Case.fingerprint` when the values were computed.
      n: number of facts.
      phi: float[n] Shapley values.
      w: float[n] fact weights, softmax(φ/τ), summing to 1.
      estimator: the estimator that produced φ (`exact` up to exact_max_n facts).
      n_evals: distinct coalitions evaluated.
      model: which model θ gave the values (`provenance.model_label`: name and weights hash).
      prompt_version: the value prompt's version (`prompts.SHAPLEY_PROMPT_VERSION`).
    """

    id: str
    fingerprint: str
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
    def from_json(cls, record: object, where: str) -> ShapleyRecord:
        """A validated record; `where` (file and line) starts the one-line CacheError of a bad field."""
        try:
            return cls._parse(record)
        except FieldError as e:
            raise CacheError(f"{where}: {e}") from None

    @classmethod
    def _parse(cls, record: object) -> ShapleyRecord:
        record = exact_fields(record, FIELDS)
        texts = {field: text(record, field) for field in ("id", "estimator", "model", "prompt_version")}
        if texts["estimator"] not in registry.names(ESTIMATOR_KIND):
            raise FieldError("estimator", f"unknown estimator {texts['estimator']!r}")
        n = count(record, "n", minimum=1)
        phi = finite_numbers(record, "phi", n)
        w = finite_numbers(record, "w", n)
        negative = next((i for i, x in enumerate(w) if x < 0), None)
        if negative is not None:
            raise FieldError(f"w[{negative}]", f"{w[negative]} is negative")
        if abs(math.fsum(w) - 1.0) > W_SUM_TOL:
            raise FieldError("w", f"sums to {math.fsum(w)!r}, not 1")
        return cls(
            id=texts["id"],
            fingerprint=matching(record, "fingerprint", FINGERPRINT, "16 hex digits"),
            n=n,
            phi=phi,
            w=w,
            estimator=texts["estimator"],
            n_evals=count(record, "n_evals", minimum=1),
            model=texts["model"],
            prompt_version=texts["prompt_version"],
        )


def cache_path(workdir: str | os.PathLike, source: str) -> pathlib.Path:
    return pathlib.Path(workdir) / "shapley" / f"{source}.jsonl"


def read_cache(path: str | os.PathLike) -> dict[str, ShapleyRecord]:
    """The finished records of a cache file by case id (a torn last line is dropped from the file)."""
    records: dict[str, ShapleyRecord] = {}
    for line, raw in enumerate(resume_jsonl(path), start=1):
        record = ShapleyRecord.from_json(raw, f"{path} line {line}")
        if record.id in records:
            raise CacheError(f"{path} line {line}: field 'id': case {record.id} appears twice")
        records[record.id] = record
    return records


def check_cases(records: Mapping[str, ShapleyRecord], cases: Iterable[Case], *, path) -> None:
    """Refuses a record whose case differs from the configured case of that id (fingerprint and n)."""
    for case in cases:
        record = records.get(case.id)
        if record is None:
            continue
        check_fingerprint(path, case, record.fingerprint, hint="use another workdir")
        if record.n != case.n_facts:
            raise CacheError(f"{path}: case {case.id}: field 'n' is {record.n}, the case has {case.n_facts} facts")


def check_compatible(records: Iterable[ShapleyRecord], *, model: str, prompt_version: str, path) -> None:
    """Refuses to mix values from another model or prompt version into one cache."""
    for record in records:
        if (record.model, record.prompt_version) != (model, prompt_version):
            raise CacheError(
                f"{path}: case {record.id} was computed with model {record.model!r} and prompt "
                f"{record.prompt_version!r}, this run uses {model!r} and {prompt_version!r}; use another workdir"
            )


def load_weights(
    workdir: str | os.PathLike,
    cases: Sequence[Case],
    *,
    prompt_version: str | None = None,
    weighting: str = "shapley",
) -> dict[str, np.ndarray]:
    """Fact weights w (float64[n]) of the given cases by id; a case missing from its source's cache, or whose
    record has another fingerprint, is a CacheError.

    `weighting='uniform'` gives 1/n per fact instead (the paper's "no Shapley weighting" ablation), still
    requiring the cache so that both arms run on the same cases.
    """
    if weighting not in ("shapley", "uniform"):
        raise ValueError(f"weighting must be 'shapley' or 'uniform', got {weighting!r}")
    out = {}
    for source in dict.fromkeys(case.source for case in cases):
        path = cache_path(workdir, source)
        records = read_cache(path)
        group = [case for case in cases if case.source == source]
        check_cases(records, group, path=path)
        for case in group:
            if case.id not in records:
                raise CacheError(f"{path}: no Shapley record for case {case.id}; run the shapley stage first")
            record = records[case.id]
            if prompt_version is not None and record.prompt_version != prompt_version:
                raise CacheError(
                    f"{path}: case {case.id} has prompt version {record.prompt_version}, want {prompt_version}"
                )
            out[case.id] = np.full(record.n, 1.0 / record.n) if weighting == "uniform" else np.asarray(record.w)
    return out
