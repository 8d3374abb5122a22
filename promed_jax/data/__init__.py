"""promed_jax.data: the `Case` type, loaders with validation, the synthetic clinic and data statistics."""

from promed_jax.data.cases import (
    FORMATS,
    INITIAL_INFO_POLICIES,
    Case,
    CaseError,
    LoadResult,
    detect_format,
    from_dataset,
    load_cases,
    read_cases,
    to_dataset,
)
from promed_jax.data.sources import DataConfigError, cases_from_config, load_from_config, resolve_path

__all__ = [
    "FORMATS",
    "INITIAL_INFO_POLICIES",
    "Case",
    "CaseError",
    "DataConfigError",
    "LoadResult",
    "cases_from_config",
    "detect_format",
    "from_dataset",
    "load_cases",
    "load_from_config",
    "read_cases",
    "resolve_path",
    "to_dataset",
]
