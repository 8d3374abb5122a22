"""The `Case` type: one consultation problem. Loaders and validation for every on-disk format follow."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import re
from collections.abc import Mapping, Sequence
from typing import Any

from absl import logging

from promed_jax.errors import DataError
from promed_jax.fields import FieldError, require, string_list, text
from promed_jax.io import unencodable_field


@dataclasses.dataclass(frozen=True)
class Case:
    """One multiple-choice consultation problem.

    Attributes:
      id: `<source>:<original id>` (original ids collide across files).
      source: the file the case came from: its stem (e.g. `medqa_dev_convo`) unless the config names it
        (`data.sources`); `synthetic` for the synthetic clinic.
      language: `en` or `zh`.
      initial_info: what the doctor is told at the start (text).
      question: the atomic question (the inquiry without the patient's details).
      options: letter -> option text, letters in order; 4, 5 or more options.
      answer: the gold letters, sorted (several for CMB multi-answer items).
      facts: the atomic facts [n] held by the patient; every fact is a Shapley player.
      known: indices of the facts the doctor knows at the start (sorted).
    """

    id: str
    source: str
    language: str
    initial_info: str
    question: str
    options: Mapping[str, str]
    answer: tuple[str, ...]
    facts: tuple[str, ...]
    known: tuple[int, ...] = ()

    @property
    def n_facts(self) -> int:
        return len(self.facts)

    @property
    def gold_text(self) -> str:
        """The gold option text(s): several are joined with "，" in letter order (promed.md §2)."""
        return "，".join(self.options[letter] for letter in self.answer)

    @property
    def multi_answer(self) -> bool:
        return len(self.answer) > 1

    @property
    def fingerprint(self) -> str:
        """16 hex digits of SHA-256 over the facts, question, options and answer: what a stored result of this
        case depends on, so a record of another case with the same id is recognised (promed.md §6)."""
        content = json.dumps([self.facts, self.question, list(self.options.items()), self.answer])
        return hashlib.sha256(content.encode("ascii")).hexdigest()[:16]


# --- Loaders and validation ---------------------------------------------------------------------------

FORMATS = ("mediq", "promed_medqa", "cmb")
INITIAL_INFO_POLICIES = ("first_sentence", "half_facts")
DEFAULT_INITIAL_INFO = {"mediq": "first_sentence", "promed_medqa": "first_sentence", "cmb": "half_facts"}
LANGUAGE = {"mediq": "en", "promed_medqa": "en", "cmb": "zh"}
_NUMBERING = re.compile(r"^\s*\d+\s*[.)]\s+")  # MediQ facts are numbered "1. ..."
_CONTINUATION = re.compile(r"^\s*[-•*]\s+")  # an indented "- ..." line continues the fact above it
_SENTENCE_END = ("。", ".", "!", "?", "！", "？")


class CaseError(DataError):
    """A malformed record or file; the message names the file, the line or record and the field path."""


@dataclasses.dataclass(frozen=True)
class LoadResult:
    """What one file gave.

    Attributes:
      path: the file read.
      fmt: its record format (one of FORMATS).
      cases: the valid cases, in file order.
      errors: one message per skipped record (empty with on_error='raise').
      dropped_options: empty padding options dropped (CMB pads options to a fixed count with "").
      records_with_dropped_options: how many records had padding options dropped.
      dropped_facts: trailing empty facts dropped.
    """

    path: pathlib.Path
    fmt: str
    cases: tuple[Case, ...]
    errors: tuple[str, ...] = ()
    dropped_options: int = 0
    records_with_dropped_options: int = 0
    dropped_facts: int = 0


@dataclasses.dataclass(frozen=True)
class _Record:
    """A raw record and where it came from (`where` is e.g. "line 225" or "record #17").

    `error` is set instead of `data` for a JSON line that could not be read at all.
    """

    data: Any
    where: str
    error: str = ""


def _options(record: Mapping[str, Any], field: str, *, drop_padding: bool) -> tuple[dict[str, str], int]:
    """Letter -> text, letters in order; returns the options and how many empty padding options were dropped.

    Padding is a run of empty options at the end (CMB); any other empty option is an error.
    """
    raw = require(record, field, dict)
    if not raw:
        raise FieldError(field, "no options")
    options: dict[str, str] = {}
    for letter in sorted(raw):
        if not (isinstance(letter, str) and len(letter) == 1 and "A" <= letter <= "Z"):
            raise FieldError(f"{field}.{letter}", "option keys must be single letters A-Z")
        text = raw[letter]
        if not isinstance(text, str):
            raise FieldError(f"{field}.{letter}", f"expected str, got {type(text).__name__}")
        options[letter] = text.strip()
    n_padding = 0
    if drop_padding:
        while options and not options[next(reversed(options))]:
            options.pop(next(reversed(options)))
            n_padding += 1
    for letter, text in options.items():
        if not text:
            raise FieldError(f"{field}.{letter}", "empty option text")
    if len(options) < 2:
        raise FieldError(field, f"{len(options)} non-empty option(s); at least 2 are needed")
    return options, n_padding


def _answer(
    record: Mapping[str, Any], field: str, raw_options: Mapping[str, Any], options: Mapping[str, str]
) -> tuple[str, ...]:
    """The gold letters, sorted; each must name a non-empty option (multi-letter answers are CMB's)."""
    letters = text(record, field).upper()
    if not letters.isalpha():
        raise FieldError(field, f"{letters!r} is not option letters")
    for letter in letters:
        if letter not in raw_options:
            raise FieldError(field, f"letter {letter} is not among the options {''.join(raw_options)}")
        if letter not in options:
            raise FieldError(field, f"gold option {letter} has empty text")
    if len(set(letters)) != len(letters):
        raise FieldError(field, f"{letters!r} repeats a letter")
    return tuple(sorted(letters))


def _mediq_facts(lines: list[str], field: str) -> tuple[str, ...]:
    """Strips "1. " numbering; an indented "- " line continues the fact above it (MediQ record 698)."""
    facts: list[str] = []
    for i, line in enumerate(lines):
        if _CONTINUATION.match(line) and facts:
            item = _CONTINUATION.sub("", line).strip()
            head = facts[-1]
            facts[-1] = f"{head} {item}" if head.endswith(":") else f"{head}, {item}"
            continue
        fact = _CONTINUATION.sub("", _NUMBERING.sub("", line)).strip()
        if not fact:
            raise FieldError(f"{field}[{i}]", "empty fact")
        facts.append(fact)
    return tuple(facts)


def _plain_facts(lines: list[str], field: str) -> tuple[tuple[str, ...], int]:
    """Stripped facts and how many trailing empty ones were dropped (two CMB records end with "")."""
    facts = [line.strip() for line in lines]
    n_padding = 0
    while facts and not facts[-1]:
        facts.pop()
        n_padding += 1
    for i, fact in enumerate(facts):
        if not fact:
            raise FieldError(f"{field}[{i}]", "empty fact")
    return tuple(facts), n_padding


def _sentence(text: str, language: str) -> str:
    text = text.strip()
    if not text or text.endswith(_SENTENCE_END):
        return text
    return text + ("。" if language == "zh" else ".")


def _initial_info(
    record: Mapping[str, Any], facts: tuple[str, ...], policy: str, language: str
) -> tuple[str, tuple[int, ...]]:
    """promed.md §1: `first_sentence` = context[0], no fact known; `half_facts` = the first ⌊n/2⌋ facts, known."""
    if policy == "first_sentence":
        context = string_list(record, "context")
        if not context or not context[0].strip():
            raise FieldError("context[0]", "no first sentence for the initial information")
        return _sentence(context[0], language), ()
    half = len(facts) // 2
    if language == "zh":  # the reference code: facts joined with "，", ended with "。"
        text = "，".join(fact.rstrip("。，") for fact in facts[:half])
    else:
        text = " ".join(_sentence(fact, language) for fact in facts[:half])
    return _sentence(text, language), tuple(range(half))


def _record_id(record: Any) -> str:
    if not isinstance(record, dict):
        raise FieldError("<record>", f"expected a JSON object, got {type(record).__name__}")
    raw = require(record, "id", (int, str))
    if isinstance(raw, str) and not raw.strip():
        raise FieldError("id", "empty text")
    return str(raw).strip()


def _parse_record(record: dict, fmt: str, policy: str, source: str) -> tuple[Case, int, int]:
    """One validated Case and the numbers of empty padding options and facts dropped; raises FieldError."""
    bad_text = unencodable_field(record)
    if bad_text:  # a JSON escape such as "\\ud800" decodes to a lone surrogate, which no output file can store
        raise FieldError(bad_text, "holds a lone surrogate (a broken \\u escape); UTF-8 cannot store it")
    original_id = _record_id(record)
    language = LANGUAGE[fmt]
    options_field, answer_field = ("option", "answer") if fmt == "cmb" else ("options", "answer_idx")
    options, n_padding = _options(record, options_field, drop_padding=fmt == "cmb")
    answer = _answer(record, answer_field, record[options_field], options)
    question = text(record, "question" if fmt == "mediq" else "atomic_question")
    if fmt == "mediq":
        facts_field = "atomic_facts" if "atomic_facts" in record else "facts"
        facts, facts_padding = _mediq_facts(string_list(record, facts_field), facts_field), 0
    else:
        facts_field = "facts"
        facts, facts_padding = _plain_facts(string_list(record, "facts"), "facts")
    if not facts:
        raise FieldError(facts_field, "no facts")
    initial_info, known = _initial_info(record, facts, policy, language)
    case = Case(
        id=f"{source}:{original_id}",
        source=source,
        language=language,
        initial_info=initial_info,
        question=question,
        options=options,
        answer=answer,
        facts=facts,
        known=known,
    )
    return case, n_padding, facts_padding


def detect_format(record: Any) -> str:
    """The record format from a record's fields: CMB has `option`, ProMed MedQA `atomic_question`, MediQ neither."""
    if not isinstance(record, dict):
        raise TypeError(f"expected a JSON object, got {type(record).__name__}")
    if "option" in record:
        return "cmb"
    if "atomic_question" in record:
        return "promed_medqa"
    if "atomic_facts" in record or ("context" in record and "facts" in record):
        return "mediq"
    raise ValueError(f"unknown record layout with fields {sorted(record)}")


def _decode(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CaseError(f"{where}: not UTF-8 (byte 0x{raw[e.start]:02x} at offset {e.start})") from None


def _read_records(path: pathlib.Path) -> list[_Record]:
    """Records of a JSON array file or a JSON-lines file (the container is detected by content).

    In a JSON-lines file a bad line (broken JSON, a torn last line, non-UTF-8 bytes) is one record's error;
    in a JSON array file it breaks the whole file.
    """
    name = path.name
    data = path.read_bytes()
    head = data.lstrip()[:1]
    if head == b"[":
        text = _decode(data, name)
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise CaseError(f"{name}: broken JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
        except RecursionError:
            raise CaseError(f"{name}: JSON nested too deep to read") from None
        return [_Record(item, f"record #{i + 1}") for i, item in enumerate(items)]
    if head not in (b"{", b""):
        raise CaseError(f"{name}: neither a JSON array nor JSON lines (starts with {head!r})")
    records = []
    lines = data.split(b"\n")
    for lineno, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        where = f"{name} line {lineno}"
        try:
            text = _decode(raw, where)
        except CaseError as e:
            records.append(_Record(None, f"line {lineno}", str(e)))
            continue
        try:
            records.append(_Record(json.loads(text), f"line {lineno}"))
        except json.JSONDecodeError as e:
            torn = " (torn last line)" if lineno == len(lines) else ""
            records.append(_Record(None, f"line {lineno}", f"{where}: broken JSON{torn}: {e.msg} at column {e.colno}"))
        except RecursionError:
            records.append(_Record(None, f"line {lineno}", f"{where}: JSON nested too deep to read"))
    return records


def read_cases(
    path: str | os.PathLike,
    *,
    fmt: str | None = None,
    initial_info: str | None = None,
    on_error: str = "raise",
    source: str | None = None,
    limit: int = 0,
) -> LoadResult:
    """Loads and validates one file of cases.

    Args:
      path: a MediQ/ALFA jsonl, a ProMed MedQA jsonl or a CMB json (array) file.
      fmt: one of FORMATS; None detects it from the first record's fields.
      initial_info: 'first_sentence' | 'half_facts'; None = the format's default (promed.md §1).
      on_error: 'raise' stops at the first malformed record; 'skip' skips it and records its message.
      source: the case source name (prefix of ids); None = the file's stem.
      limit: keep the first `limit` valid cases; 0 keeps all.
    """
    path = pathlib.Path(path)
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    if fmt is not None and fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; known: {', '.join(FORMATS)}")
    if initial_info is not None and initial_info not in INITIAL_INFO_POLICIES:
        raise ValueError(f"unknown initial_info policy {initial_info!r}; known: {', '.join(INITIAL_INFO_POLICIES)}")
    if not path.is_file():
        raise FileNotFoundError(f"case file not found: {path}")
    errors: list[str] = []
    records = _read_records(path)
    if fmt is None:
        readable = [record for record in records if not record.error]
        if not readable:
            first_error = f" ({records[0].error})" if records else ""
            raise CaseError(f"{path.name}: no readable records, cannot detect the format{first_error}")
        try:
            fmt = detect_format(readable[0].data)
        except (TypeError, ValueError) as e:
            raise CaseError(f"{path.name} {readable[0].where}: {e}") from None
    policy = initial_info or DEFAULT_INITIAL_INFO[fmt]
    source = source or path.stem
    cases: list[Case] = []
    first_seen: dict[str, str] = {}
    dropped = records_dropped = dropped_facts = 0
    for record in records:
        if record.error:
            if on_error == "raise":
                raise CaseError(record.error)
            errors.append(record.error)
            continue
        shown_id = record.data.get("id") if isinstance(record.data, dict) else None
        label = f"{path.name} {record.where}" + (f" (id {shown_id})" if shown_id is not None else "")
        try:
            case, n_padding, facts_padding = _parse_record(record.data, fmt, policy, source)
            if case.id in first_seen:
                raise FieldError("id", f"duplicate of {first_seen[case.id]}")
        except FieldError as e:
            if on_error == "raise":
                raise CaseError(f"{label}: {e}") from None
            errors.append(f"{label}: {e}")
            continue
        first_seen[case.id] = record.where
        dropped += n_padding
        records_dropped += n_padding > 0
        dropped_facts += facts_padding
        cases.append(case)
        if limit and len(cases) == limit:
            break
    if errors:
        logging.warning("%s: skipped %d malformed record(s); first: %s", path.name, len(errors), errors[0])
    if dropped:
        logging.warning("%s: dropped %d empty padding option(s) in %d record(s)", path.name, dropped, records_dropped)
    if dropped_facts:
        logging.warning("%s: dropped %d trailing empty fact(s)", path.name, dropped_facts)
    return LoadResult(path, fmt, tuple(cases), tuple(errors), dropped, records_dropped, dropped_facts)


def load_cases(
    path: str | os.PathLike,
    *,
    fmt: str | None = None,
    initial_info: str | None = None,
    on_error: str = "raise",
    source: str | None = None,
    limit: int = 0,
) -> list[Case]:
    """The valid cases of one file (see `read_cases`, which also returns the counts)."""
    result = read_cases(path, fmt=fmt, initial_info=initial_info, on_error=on_error, source=source, limit=limit)
    return list(result.cases)


# --- datasets.Dataset ------------------------------------------------------------------------------------


def case_to_row(case: Case) -> dict[str, Any]:
    """A flat row: options become parallel letter/text lists because their letter sets differ across cases."""
    return {
        "id": case.id,
        "source": case.source,
        "language": case.language,
        "initial_info": case.initial_info,
        "question": case.question,
        "option_letters": list(case.options),
        "option_texts": list(case.options.values()),
        "answer": list(case.answer),
        "facts": list(case.facts),
        "known": list(case.known),
    }


def case_from_row(row: Mapping[str, Any]) -> Case:
    return Case(
        id=row["id"],
        source=row["source"],
        language=row["language"],
        initial_info=row["initial_info"],
        question=row["question"],
        options=dict(zip(row["option_letters"], row["option_texts"], strict=True)),
        answer=tuple(row["answer"]),
        facts=tuple(row["facts"]),
        known=tuple(row["known"]),
    )


def to_dataset(cases: Sequence[Case]):
    """The cases as a `datasets.Dataset` (one row per case, see `case_to_row`)."""
    import datasets  # heavy; only needed here

    rows = [case_to_row(case) for case in cases]
    features = datasets.Features(
        {
            **{k: datasets.Value("string") for k in ("id", "source", "language", "initial_info", "question")},
            **{k: datasets.Sequence(datasets.Value("string")) for k in ("option_letters", "option_texts")},
            "answer": datasets.Sequence(datasets.Value("string")),
            "facts": datasets.Sequence(datasets.Value("string")),
            "known": datasets.Sequence(datasets.Value("int32")),
        }
    )
    return datasets.Dataset.from_list(rows, features=features)


def from_dataset(dataset) -> list[Case]:
    return [case_from_row(row) for row in dataset]
