"""The cases a config names: the synthetic clinic or files, then the selection (ids, fact counts, split).

Sources. A case's id is `<source>:<original id>`; a file's source is its stem (`medqa_dev_convo.jsonl` gives
`medqa_dev_convo:224`) unless `data.sources`, a tuple parallel to `data.paths`, names it ('' keeps the stem).
Ids must be unique across all configured files (two files with one stem need distinct sources). The synthetic
clinic's source is `synthetic`.

Selection, in this order: `data.split`, `data.ids` (exact ids; each must exist and survive the split and the
fact range), `data.min_facts` / `data.max_facts` (0 = no bound), then `data.limit` (the first `limit` selected
cases of each file, in file order).

Split. A case is in `train`, `dev` or `test` by a hash of its id alone (`split_of`), with `data.split_fractions`,
so its split does not depend on which other cases are loaded or their order. `data.split=''` takes the stage's
default (`STAGE_SPLITS`): the training stages (shapley, mcts, sft, rl) read `train`, evaluation reads `test`, the
statistics (mode 'data') read `all`. The shapley stage computes the train split because training is what reads
fact weights. The synthetic clinic is a smoke-test generator, so there '' means `all`; an explicit split still
applies to it. `dev` is for model selection; no stage reads it by default.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import pathlib
import re
from collections.abc import Mapping, Sequence
from typing import Any

from promed_jax.data import synthetic
from promed_jax.data.cases import FORMATS, INITIAL_INFO_POLICIES, Case, LoadResult, read_cases
from promed_jax.errors import ConfigError, DataError

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
SPLITS = ("train", "dev", "test")
STAGE_SPLITS = {
    "data": "all",
    "warm_start": "train",
    "shapley": "train",
    "mcts": "train",
    "sft": "train",
    "rl": "train",
    "eval": "test",
}
# A source names a cache file and prefixes ids: a word, no path separators, no leading dot.
_SOURCE_NAME = re.compile(r"^\w[\w.-]*$")
_FRACTION_TOL = 1e-6


def resolve_path(path: str) -> pathlib.Path:
    """An absolute path as is; a relative one against the repository root (configs use ../shared/data/...)."""
    p = pathlib.Path(path).expanduser()
    return p if p.is_absolute() else (REPO_ROOT / p).resolve()


class DataConfigError(ConfigError):
    """A bad value in the config's `data` section (named as `data.<field>`)."""


def _choice(data: Mapping[str, Any], field: str, allowed: tuple[str, ...]) -> None:
    if data[field] not in allowed:
        shown = ", ".join(repr(a) for a in allowed)
        raise DataConfigError(f"config data.{field} must be one of {shown}, got {data[field]!r}")


def _paths(data: Mapping[str, Any]) -> tuple[str, ...]:
    return (data["paths"],) if isinstance(data["paths"], str) else tuple(data["paths"])


def check_data_config(data: Mapping[str, Any]) -> None:
    """Validates the `data` section before anything is read."""
    _choice(data, "kind", ("synthetic", "files"))
    _choice(data, "on_error", ("raise", "skip"))
    _choice(data, "format", ("", *FORMATS))
    _choice(data, "initial_info", ("", *INITIAL_INFO_POLICIES))
    _choice(data, "split", ("", *SPLITS, "all"))
    for field in ("limit", "synthetic_n", "min_facts", "max_facts"):
        if data[field] < 0:
            raise DataConfigError(f"config data.{field} must be >= 0, got {data[field]}")
    if data["max_facts"] and data["max_facts"] < data["min_facts"]:
        raise DataConfigError(
            f"config data.max_facts={data['max_facts']} is below data.min_facts={data['min_facts']} (0 = no bound)"
        )
    fractions = tuple(data["split_fractions"])
    if len(fractions) != len(SPLITS) or any(not f >= 0 for f in fractions) or abs(sum(fractions) - 1) > _FRACTION_TOL:
        raise DataConfigError(
            f"config data.split_fractions must be {len(SPLITS)} fractions >= 0 (train, dev, test) summing to 1, "
            f"got {fractions}"
        )
    if len(set(data["ids"])) != len(data["ids"]):
        raise DataConfigError("config data.ids repeats an id")
    paths, sources = _paths(data), tuple(data["sources"])
    if data["kind"] == "synthetic":
        for field, value in (("paths", paths), ("sources", sources)):
            if value:
                raise DataConfigError(
                    f"config data.{field} is set but data.kind='synthetic' reads no files; "
                    "set data.kind='files' or leave it empty"
                )
        return
    if not paths:
        raise DataConfigError("config data.kind='files' but data.paths is empty")
    if sources and len(sources) != len(paths):
        raise DataConfigError(
            f"config data.sources has {len(sources)} names for {len(paths)} data.paths (one per path, '' = the stem)"
        )
    for path, source in zip(paths, file_sources(data), strict=True):
        if not _SOURCE_NAME.match(source):
            raise DataConfigError(
                f"config data.sources: source {source!r} of {path} must be letters, digits, '_', '.' or '-' "
                "(not starting with '.'); name it in data.sources"
            )


def file_sources(data: Mapping[str, Any]) -> tuple[str, ...]:
    """The source of each configured path: its entry in `data.sources`, or the file's stem."""
    sources = tuple(data["sources"]) or ("",) * len(_paths(data))
    return tuple(source or pathlib.Path(path).stem for path, source in zip(_paths(data), sources, strict=True))


def split_of(case_id: str, fractions: Sequence[float]) -> str:
    """'train', 'dev' or 'test' for a case id: a uniform number from SHA-256 of the id cut at the fractions."""
    digest = hashlib.sha256(case_id.encode("utf-8", "surrogatepass")).digest()
    u = int.from_bytes(digest[:8], "big") / 2.0**64
    bounds = [math.fsum(fractions[: i + 1]) for i in range(len(SPLITS) - 1)]
    return next((split for split, bound in zip(SPLITS, bounds, strict=False) if u < bound), SPLITS[-1])


def resolve_split(data: Mapping[str, Any], stage: str) -> str:
    """The split a stage reads: `data.split`, or the stage's default (`all` for the synthetic clinic)."""
    if data["split"]:
        return data["split"]
    return STAGE_SPLITS[stage] if data["kind"] == "files" else "all"


def _in_facts_range(case: Case, data: Mapping[str, Any]) -> bool:
    return case.n_facts >= data["min_facts"] and (not data["max_facts"] or case.n_facts <= data["max_facts"])


def _check_unique(results: Sequence[LoadResult], paths: Sequence[str]) -> None:
    first_file: dict[str, str] = {}
    for result, path in zip(results, paths, strict=True):
        for case in result.cases:
            if case.id in first_file:
                raise DataError(
                    f"case id {case.id} is in both {first_file[case.id]} and {path}; give them distinct data.sources"
                )
            first_file[case.id] = path


def _check_listed_ids(results: Sequence[LoadResult], data: Mapping[str, Any], split: str) -> None:
    """Every id of `data.ids` names a loaded case that the split and the fact range keep."""
    by_id = {case.id: case for result in results for case in result.cases}
    for case_id in data["ids"]:
        case = by_id.get(case_id)
        if case is None:
            raise DataConfigError(f"config data.ids: no configured case has id {case_id!r}")
        case_split = split_of(case.id, data["split_fractions"])
        if split != "all" and case_split != split:
            raise DataConfigError(
                f"config data.ids: case {case_id} is in the {case_split} split, this stage reads {split} (data.split)"
            )
        if not _in_facts_range(case, data):
            raise DataConfigError(
                f"config data.ids: case {case_id} has {case.n_facts} facts, outside data.min_facts="
                f"{data['min_facts']} .. data.max_facts={data['max_facts']}"
            )


def _select(cases: Sequence[Case], data: Mapping[str, Any], split: str) -> tuple[Case, ...]:
    ids = set(data["ids"])
    selected = [
        case
        for case in cases
        if (split == "all" or split_of(case.id, data["split_fractions"]) == split)
        and (not ids or case.id in ids)
        and _in_facts_range(case, data)
    ]
    return tuple(selected[: data["limit"]] if data["limit"] else selected)


def load_from_config(data: Mapping[str, Any], *, stage: str) -> list[LoadResult]:
    """One LoadResult per configured file (or the synthetic clinic), its cases selected for `stage`."""
    check_data_config(data)
    if data["kind"] == "synthetic":
        paths = ("<synthetic clinic>",)
        cases = tuple(synthetic.make_cases(data["synthetic_n"], data["synthetic_seed"]))
        results = [LoadResult(pathlib.Path(paths[0]), "synthetic", cases)]
    else:
        paths = _paths(data)
        results = [
            read_cases(
                resolve_path(path),
                fmt=data["format"] or None,
                initial_info=data["initial_info"] or None,
                on_error=data["on_error"],
                source=source,
            )
            for path, source in zip(paths, file_sources(data), strict=True)
        ]
        _check_unique(results, paths)
    split = resolve_split(data, stage)
    _check_listed_ids(results, data, split)
    return [dataclasses.replace(result, cases=_select(result.cases, data, split)) for result in results]


def cases_from_config(data: Mapping[str, Any], *, stage: str) -> list[Case]:
    """The cases `stage` reads, in file order; ids are unique across files. Selecting none is a ConfigError."""
    results = load_from_config(data, stage=stage)
    cases = [case for result in results for case in result.cases]
    if not cases:
        files = ", ".join(result.path.name for result in results)
        raise DataConfigError(
            f"config data: no case selected from {files} (split {resolve_split(data, stage)}, "
            f"ids {tuple(data['ids'])}, facts {data['min_facts']}..{data['max_facts'] or 'any'})"
        )
    return cases
