"""SFT data: dialogue files of the export schema -> rendered examples -> length-bucketed batches.

A dialogue file has one JSON object per line (MCTS exports, the scripted naive doctor): `case_id` and
`messages` are required (alternating user/assistant messages, starting with the user instruction, at least
one assistant turn); the other fields are optional and type-checked when present. A bad line is one
`DataError` naming the file, the line and the field.

Each dialogue is rendered with the model's chat template (`text.dialogue.render_dialogue`): the loss falls on
the doctor's tokens (the role mask) only. Position t predicts token t + 1, so `targets` and `weights` are
the ids and the role mask shifted left by one. Sequences are padded to the smallest of a few bucket lengths
that holds them (one compiled shape per bucket, not per length); longer ones are dropped and counted.
The batch order of an epoch is a function of (seed, epoch) alone, so a resumed run continues where it was.
Whole cases (all their dialogues) go to the held-out split by a hash of the case id.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from promed_jax.errors import DataError
from promed_jax.text.dialogue import render_dialogue

REQUIRED = ("case_id", "messages")
_OPTIONAL_TYPES: dict[str, tuple[type, ...]] = {
    "fingerprint": (str,),
    "turn_sig": (list,),
    "total_sig": (int, float),
    "reward": (int, float),
    "letters": (list,),
    "correct": (bool,),
    "end": (str,),
    "policy": (dict,),
    "search": (dict,),
    "llm_calls": (dict,),
    "tree": (int,),
    "path": (list,),
}


def _fail(where: str, field: str, problem: str) -> DataError:
    return DataError(f"{where}: field '{field}': {problem}")


def validate_record(record: Any, where: str) -> dict:
    """One dialogue record of the export schema, or a DataError naming `where` (file and line) and the field."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    for field in REQUIRED:
        if field not in record:
            raise _fail(where, field, "missing")
    if not isinstance(record["case_id"], str) or not record["case_id"]:
        raise _fail(where, "case_id", f"must be a non-empty string, got {record['case_id']!r}")
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
        raise _fail(where, "messages", "must be a non-empty list")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or set(m) != {"role", "content"}:
            raise _fail(where, f"messages[{i}]", "must be an object with exactly 'role' and 'content'")
        if not isinstance(m["content"], str):
            raise _fail(where, f"messages[{i}].content", "must be a string")
        expected = "user" if i % 2 == 0 else "assistant"
        if m["role"] != expected:
            raise _fail(
                where, f"messages[{i}].role", f"must be {expected!r} (alternating, the user first), got {m['role']!r}"
            )
    if len(messages) < 2:
        raise _fail(where, "messages", "needs at least one assistant turn")
    for field, types in _OPTIONAL_TYPES.items():
        value = record.get(field)
        if value is None:
            continue
        if not isinstance(value, types) or (bool not in types and isinstance(value, bool)):
            names = " or ".join(t.__name__ for t in types)
            raise _fail(where, field, f"must be {names}, got {type(value).__name__}")
    for field, item in (("turn_sig", (int, float)), ("letters", (str,)), ("path", (int,))):
        for value in record.get(field) or ():
            if not isinstance(value, item) or isinstance(value, bool) and bool not in item:
                raise _fail(where, field, f"holds {value!r}, not {' or '.join(t.__name__ for t in item)}")
    return record


def read_dialogues(path: str | pathlib.Path) -> list[dict]:
    """Every record of a dialogue file, validated (see the module doc)."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such dialogue file")
    records = []
    for lineno, raw in enumerate(path.read_bytes().split(b"\n"), start=1):
        if not raw.strip():
            continue
        where = f"{path}: line {lineno}"
        try:
            record = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            raise DataError(f"{where}: not valid JSON ({e})") from None
        records.append(validate_record(record, where))
    return records


@dataclasses.dataclass(frozen=True)
class Example:
    """One rendered dialogue, unpadded.

    Attributes:
      case_id: its case.
      tokens: int32 [L] the ids.
      targets: int32 [L] the next token at each position (the last one: pad).
      weights: bool [L] whether position t's target is a doctor token (role mask shifted left).
    """

    case_id: str
    tokens: np.ndarray
    targets: np.ndarray
    weights: np.ndarray

    @property
    def length(self) -> int:
        return int(self.tokens.shape[0])


def render_example(tokenizer, record: Mapping[str, Any], pad_id: int) -> Example:
    rendered = render_dialogue(tokenizer, record["messages"])
    ids = rendered.ids.astype(np.int32)
    targets = np.concatenate([ids[1:], [pad_id]]).astype(np.int32)
    weights = np.concatenate([rendered.role_mask[1:], [False]])
    return Example(case_id=record["case_id"], tokens=ids, targets=targets, weights=weights)


def is_heldout(case_id: str, fraction: float) -> bool:
    """Whether a case's dialogues are held out: SHA-256 of the id read as a number in [0, 1)."""
    digest = hashlib.sha256(f"sft-heldout:{case_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def bucket_lengths(buckets: Sequence[int], max_tokens: int) -> tuple[int, ...]:
    """The configured bucket lengths up to `max_tokens`, and `max_tokens` itself as the last."""
    return tuple(sorted({b for b in buckets if b < max_tokens} | {max_tokens}))


def bucket_of(length: int, lengths: Sequence[int]) -> int | None:
    """The smallest bucket length that holds `length` tokens; None when none does."""
    return next((b for b in lengths if length <= b), None)


@dataclasses.dataclass(frozen=True)
class BatchPlan:
    """An epoch's batches: each is (bucket length, example indices), at most `batch_size` indices."""

    batches: tuple[tuple[int, tuple[int, ...]], ...]

    def __len__(self) -> int:
        return len(self.batches)


def epoch_plan(
    examples: Sequence[Example], lengths: Sequence[int], batch_size: int, *, seed: int, epoch: int
) -> BatchPlan:
    """Shuffle within each bucket, cut into batches, shuffle the batches: a function of (seed, epoch)."""
    rng = np.random.default_rng([seed, epoch])
    by_bucket: dict[int, list[int]] = {}
    for i, ex in enumerate(examples):
        by_bucket.setdefault(bucket_of(ex.length, lengths), []).append(i)
    batches = []
    for bucket in sorted(by_bucket):
        order = [by_bucket[bucket][j] for j in rng.permutation(len(by_bucket[bucket]))]
        batches += [(bucket, tuple(order[s : s + batch_size])) for s in range(0, len(order), batch_size)]
    return BatchPlan(tuple(batches[j] for j in rng.permutation(len(batches))))


def batches_per_epoch(examples: Sequence[Example], lengths: Sequence[int], batch_size: int) -> int:
    counts: dict[int, int] = {}
    for ex in examples:
        b = bucket_of(ex.length, lengths)
        counts[b] = counts.get(b, 0) + 1
    return sum(math.ceil(n / batch_size) for n in counts.values())


def collate(examples: Sequence[Example], length: int, rows: int, microbatches: int, pad_id: int) -> dict:
    """`rows` rows of `length` tokens (missing rows are padding with zero weight), as [A, rows / A, length]:
    tokens, targets (int32), weights, valid (bool)."""
    if rows % microbatches:
        raise ValueError(f"rows {rows} is not a multiple of microbatches {microbatches}")
    tokens = np.full((rows, length), pad_id, np.int32)
    targets = np.full((rows, length), pad_id, np.int32)
    weights = np.zeros((rows, length), bool)
    valid = np.zeros((rows, length), bool)
    for r, ex in enumerate(examples):
        n = ex.length
        tokens[r, :n], targets[r, :n], weights[r, :n], valid[r, :n] = ex.tokens, ex.targets, ex.weights, True
    shape = (microbatches, rows // microbatches, length)
    return {
        "tokens": tokens.reshape(shape),
        "targets": targets.reshape(shape),
        "weights": weights.reshape(shape),
        "valid": valid.reshape(shape),
    }
