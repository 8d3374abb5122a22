"""The consultation protocol (promed.md §1): the doctor's first message, turn kinds and answer extraction.

A doctor turn is a `question:` (sent to the patient), an `answer:` (ends the episode) or neither (ends the
episode with no answer); the first marker in the turn decides. Answers are read, in this order, from the
last bracketed marker (`【answer: X】`, `【答案：X】`, `【正确答案是X】`), else from option letters standing alone
right after the last `answer` marker, else from the option texts that appear in the turn. A multi-answer
item is right only when the whole set of letters matches.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence

from promed_jax.data.cases import Case
from promed_jax.text import prompts

QUESTION = "question"
ANSWER = "answer"
INVALID = "invalid"

# Why an episode ended (recorded per dialogue).
END_ANSWER = "answer"
END_NO_MARKER = "no_marker"
END_RUNAWAY = "runaway"
END_QUESTION_LIMIT = "question_limit"
END_LENGTH = "length"

# A turn marker: `question:` / `answer:` in any case, ASCII or full-width colon. The Chinese prompt keeps the
# English markers (as the paper's does); a Chinese doctor's 答案： also marks an answer, but 问题： does not mark
# a question, because it is the Chinese prompt's label of the problem, which a doctor may echo.
_MARKER = re.compile(r"(?<![A-Za-z])(?P<q>question\s*[:：])|(?<![A-Za-z])(?P<a>answer\s*[:：]|答案\s*[:：])", re.IGNORECASE)
_BRACKETED = re.compile(r"【\s*(?:answer\s*[:：]|答案\s*[:：]?|正确答案是|正确答案\s*[:：])(?P<body>[^【】]*)】", re.IGNORECASE)
# The `answer` marker of the second extraction step: where a bare answer's letters follow.
_ANSWER_WORD = re.compile(
    r"(?:(?<![A-Za-z])answer(?:\s+is)?\s*[:：]?|正确答案是|正确答案\s*[:：]?|正确选项是?\s*[:：]?|答案是?\s*[:：]?)",
    re.IGNORECASE,
)
# Separators between letters: spaces, commas (also Chinese), `and`, slashes, brackets around a letter.
_LETTER_SEP = re.compile(r"(?:[\s,，、;；/&+()（）\[\]]|and\b|or\b|以及|和)+", re.IGNORECASE)
_LETTER_RUN = re.compile(r"[A-Za-z]+")
_RUNAWAY = re.compile(r"(.{2,200}?)\1{3,}$", re.DOTALL)
_RUNAWAY_MIN_CHARS = 40


@dataclasses.dataclass(frozen=True)
class DoctorTurn:
    """One parsed doctor turn.

    Attributes:
      kind: `question`, `answer` or `invalid` (neither marker, or runaway repetition).
      question: the question sent to the patient (question turns; may be empty).
      letters: the extracted answer letters, sorted (answer turns; empty when none could be read).
      reason: for invalid turns, `no_marker` or `runaway`.
    """

    kind: str
    question: str = ""
    letters: tuple[str, ...] = ()
    reason: str = ""


def is_runaway(text: str) -> bool:
    """True when the turn ends in the same span repeated at least four times (a degenerate loop)."""
    norm = " ".join(text.split())
    m = _RUNAWAY.search(norm[-2000:])
    return bool(m) and len(m.group(0)) >= _RUNAWAY_MIN_CHARS


def turn_kind(text: str) -> str:
    """The kind of a turn as decided by its first marker: `question`, `answer` or `invalid`."""
    m = _MARKER.search(text)
    if m is None:
        return INVALID
    return QUESTION if m.group("q") else ANSWER


def format_score(text: str) -> float:
    """Format reward of a doctor turn (promed.md §4): 1 if it starts with a marker, 0.5 if it only contains one."""
    m = _MARKER.search(text)
    if m is None:
        return 0.0
    return 1.0 if not text[: m.start()].strip() else 0.5


def _leading_letters(tail: str, letters: set[str], *, loose: bool) -> tuple[str, ...]:
    """Option letters standing alone at the start of `tail` (`C`, `A, C`, `(B)`, `ACD`, `a and c`).

    `loose` (inside brackets) accepts lower case and concatenated letters anywhere; outside brackets they are
    accepted only when nothing word-like follows them, so that `answer: a patient` or `ACE inhibitors` is no
    answer while `answer: c.` and `答案：ACD。` are.
    """
    found: list[str] = []
    strict_run = True  # every run so far was single upper-case letters
    pos = 0
    while True:
        sep = _LETTER_SEP.match(tail, pos)
        if sep:
            pos = sep.end()
        run = _LETTER_RUN.match(tail, pos)
        if run is None:
            break
        word = run.group(0)
        nxt = tail[run.end() : run.end() + 1]
        if nxt.isalnum() and not ("\u4e00" <= nxt <= "\u9fff"):  # part of a longer word (`C3`, `Bx`)
            break
        if not all(ch.upper() in letters for ch in word) or len(set(word.upper())) != len(word):
            break
        found.extend(word.upper())
        strict_run = strict_run and len(word) == 1 and word.isupper()
        pos = run.end()
    if not found:
        return ()
    if not loose:
        rest = tail[pos:].lstrip(" \t,，、")
        word_follows = bool(rest) and rest[0].isalpha() and not ("\u4e00" <= rest[0] <= "\u9fff")
        # `A` before a lower-case word is the English article (`answer: A patient with ...`), not option A.
        article = tail[:pos].rstrip().endswith("A") and found[-1] == "A" and word_follows and rest[0].islower()
        if word_follows and (not strict_run or article):
            return ()
    return tuple(sorted(set(found)))


def _option_texts_in(text: str, options: Mapping[str, str]) -> tuple[str, ...]:
    """Letters of the options whose full text appears in `text`; an option contained in another found one is
    dropped (`Gastroenteritis` inside `Viral gastroenteritis`)."""
    low = text.lower()
    hits = {k: v.strip().lower() for k, v in options.items() if v.strip() and v.strip().lower() in low}
    keep = [k for k, v in hits.items() if not any(v != w and v in w for w in hits.values())]
    return tuple(sorted(keep))


def extract_answer(text: str, options: Mapping[str, str]) -> tuple[str, ...]:
    """The answer letters of a turn, sorted and de-duplicated, in promed.md §1's order; () when none."""
    letters = {k.upper() for k in options}
    bracketed = list(_BRACKETED.finditer(text))
    if bracketed:
        found = _leading_letters(bracketed[-1].group("body"), letters, loose=True)
        if found:
            return found
    markers = list(_ANSWER_WORD.finditer(text))
    if markers:
        found = _leading_letters(text[markers[-1].end() :], letters, loose=False)
        if found:
            return found
    return _option_texts_in(text, options)


def _question_text(text: str, marker_end: int) -> str:
    """The question after the marker, up to the end of its first non-empty line (a doctor that goes on to
    invent the patient's reply is cut there)."""
    for line in text[marker_end:].split("\n"):
        if line.strip():
            return line.strip()
    return ""


def parse_doctor_turn(text: str, options: Mapping[str, str], *, questions_allowed: bool = True) -> DoctorTurn:
    """Classifies a doctor turn by its first marker and reads its question or answer.

    Where no question is allowed (the reactive and full-information modes) a turn with neither marker can only
    be the answer, so it is read as one: those baselines measure knowledge, not the turn format.
    """
    if is_runaway(text):
        return DoctorTurn(kind=INVALID, reason=END_RUNAWAY)
    m = _MARKER.search(text)
    if m is None:
        if not questions_allowed:
            return DoctorTurn(kind=ANSWER, letters=extract_answer(text, options))
        return DoctorTurn(kind=INVALID, reason=END_NO_MARKER)
    if m.group("q"):
        return DoctorTurn(kind=QUESTION, question=_question_text(text, m.end()))
    return DoctorTurn(kind=ANSWER, letters=extract_answer(text, options))


def is_correct(letters: Sequence[str], gold: Sequence[str]) -> bool:
    """Right only when the whole set of letters matches (multi-answer items included); no answer is wrong."""
    return bool(letters) and set(letters) == set(gold)


def initial_problem(case: Case, mode: str) -> str:
    """The `Problem:` text for a mode: `full` adds every fact not already known at the start."""
    extra: Sequence[str] = ()
    if mode == "full":
        known = set(case.known)
        extra = [f for i, f in enumerate(case.facts) if i not in known]
    elif mode not in ("proactive", "reactive"):
        raise ValueError(f"unknown consultation mode {mode!r} (expected proactive, reactive or full)")
    return prompts.doctor_problem(
        language=case.language, initial_info=case.initial_info, question=case.question, facts=extra
    )


def doctor_first_message(case: Case, *, mode: str = "proactive", max_questions: int = 10) -> str:
    """The doctor's first (user) message for a case in a mode (`proactive`, `reactive` or `full`)."""
    return prompts.doctor_prompt(
        language=case.language,
        problem=initial_problem(case, mode),
        options=case.options,
        multi_answer=case.multi_answer,
        max_questions=max_questions,
        interactive=mode == "proactive",
    )
