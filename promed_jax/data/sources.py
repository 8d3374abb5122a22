"""The cases a config names: the synthetic clinic or files, with relative paths resolved against the repo."""

from __future__ import annotations

import pathlib
from collections.abc import Mapping
from typing import Any

from promed_jax.data import synthetic
from promed_jax.data.cases import Case, LoadResult, read_cases

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]


def resolve_path(path: str) -> pathlib.Path:
    """An absolute path as is; a relative one against the repository root (configs use ../shared/data/...)."""
    p = pathlib.Path(path).expanduser()
    return p if p.is_absolute() else (REPO_ROOT / p).resolve()


def load_from_config(data: Mapping[str, Any]) -> list[LoadResult]:
    """One LoadResult per configured file, or one for the synthetic clinic (config section `data`)."""
    if data["kind"] == "synthetic":
        cases = tuple(synthetic.make_cases(data["synthetic_n"], data["synthetic_seed"]))
        if data["limit"]:
            cases = cases[: data["limit"]]
        return [LoadResult(pathlib.Path("<synthetic clinic>"), "synthetic", cases)]
    if data["kind"] != "files":
        raise ValueError(f"config data.kind must be 'synthetic' or 'files', got {data['kind']!r}")
    paths = data["paths"]
    if isinstance(paths, str):
        paths = [paths] if paths else []
    if not paths:
        raise ValueError("config data.kind='files' but data.paths is empty")
    return [
        read_cases(
            resolve_path(path),
            fmt=data["format"] or None,
            initial_info=data["initial_info"] or None,
            on_error=data["on_error"],
            limit=data["limit"],
        )
        for path in paths
    ]


def cases_from_config(data: Mapping[str, Any]) -> list[Case]:
    """All configured cases, in file order; ids are unique across files or this raises."""
    cases = [case for result in load_from_config(data) for case in result.cases]
    seen: set[str] = set()
    for case in cases:
        if case.id in seen:
            raise ValueError(f"case id {case.id} appears in two configured files; give them distinct sources")
        seen.add(case.id)
    return cases
