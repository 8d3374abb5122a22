"""The cases a config names: the synthetic clinic or files, with relative paths resolved against the repo."""

from __future__ import annotations

import pathlib
from collections.abc import Mapping
from typing import Any

from promed_jax.data import synthetic
from promed_jax.data.cases import FORMATS, INITIAL_INFO_POLICIES, Case, LoadResult, read_cases
from promed_jax.errors import ConfigError

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]


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


def check_data_config(data: Mapping[str, Any]) -> None:
    """Validates the `data` section before anything is read."""
    _choice(data, "kind", ("synthetic", "files"))
    _choice(data, "on_error", ("raise", "skip"))
    _choice(data, "format", ("", *FORMATS))
    _choice(data, "initial_info", ("", *INITIAL_INFO_POLICIES))
    for field in ("limit", "synthetic_n"):
        if data[field] < 0:
            raise DataConfigError(f"config data.{field} must be >= 0, got {data[field]}")
    if data["kind"] == "files" and not data["paths"]:
        raise DataConfigError("config data.kind='files' but data.paths is empty")


def load_from_config(data: Mapping[str, Any]) -> list[LoadResult]:
    """One LoadResult per configured file, or one for the synthetic clinic (config section `data`)."""
    check_data_config(data)
    if data["kind"] == "synthetic":
        cases = tuple(synthetic.make_cases(data["synthetic_n"], data["synthetic_seed"]))
        if data["limit"]:
            cases = cases[: data["limit"]]
        return [LoadResult(pathlib.Path("<synthetic clinic>"), "synthetic", cases)]
    paths = [data["paths"]] if isinstance(data["paths"], str) else data["paths"]
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
