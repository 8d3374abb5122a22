"""Checks of a JSON record's fields, shared by the case loaders and the readers of stage outputs.

Each check raises `FieldError`, whose message is `field '<name>': <problem>`; the caller prefixes the file and
the line or record, so that every such error is one line naming the file, the record and the field.
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection, Mapping
from typing import Any


class FieldError(Exception):
    """One field of one record is missing or wrong (the caller adds the file and the record)."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"field '{field}': {problem}")


def require(record: Mapping[str, Any], field: str, kind: type | tuple[type, ...]) -> Any:
    """`record[field]`, which must be of `kind` (a bool is never an int or a float here)."""
    if field not in record:
        raise FieldError(field, "missing")
    value = record[field]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        names = " or ".join(k.__name__ for k in kinds)
        raise FieldError(field, f"expected {names}, got {type(value).__name__}")
    return value


def text(record: Mapping[str, Any], field: str) -> str:
    """A string that is not blank, stripped."""
    value = require(record, field, str).strip()
    if not value:
        raise FieldError(field, "empty text")
    return value


def matching(record: Mapping[str, Any], field: str, pattern: re.Pattern, what: str) -> str:
    """A string that `pattern` matches whole (`what` describes it in the error)."""
    value = require(record, field, str)
    if not pattern.fullmatch(value):
        raise FieldError(field, f"{value!r} is not {what}")
    return value


def exact_fields(record: Any, fields: Collection[str]) -> Mapping[str, Any]:
    """The record, which must be a JSON object with exactly these fields."""
    if not isinstance(record, dict):
        raise FieldError("<record>", f"expected a JSON object, got {type(record).__name__}")
    missing = [f for f in fields if f not in record]
    if missing:
        raise FieldError(missing[0], "missing")
    extra = sorted(set(record) - set(fields))
    if extra:
        raise FieldError(extra[0], "unexpected field")
    return record


def finite_numbers(record: Mapping[str, Any], field: str, n: int) -> tuple[float, ...]:
    """A list of `n` finite numbers, as floats."""
    values = require(record, field, list)
    if len(values) != n:
        raise FieldError(field, f"{len(values)} values, expected n = {n}")
    for i, value in enumerate(values):
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise FieldError(f"{field}[{i}]", f"expected a number, got {type(value).__name__}")
        if not math.isfinite(value):
            raise FieldError(f"{field}[{i}]", f"{value} is not finite")
    return tuple(float(v) for v in values)


def count(record: Mapping[str, Any], field: str, *, minimum: int = 0) -> int:
    """An integer of at least `minimum`."""
    value = require(record, field, int)
    if value < minimum:
        raise FieldError(field, f"{value} is below {minimum}")
    return value


def string_list(record: Mapping[str, Any], field: str) -> list[str]:
    values = require(record, field, list)
    for i, value in enumerate(values):
        if not isinstance(value, str):
            raise FieldError(f"{field}[{i}]", f"expected str, got {type(value).__name__}")
    return values
