"""The consultation protocol (promed.md §1): the doctor's first message, turn kinds and answer extraction.

A doctor turn is a `question:` (sent to the patient), an `answer:` (ends the episode) or neither (ends the
episode with no answer); the first marker in the turn decides. `extract_answer` reads an answer in §1's
order: the letters of the last bracketed marker (`【answer: X】`, `【答案：X】`, `【正确答案是X】`), else option
letters standing alone right after the last `answer` marker, else the options whose full text the turn names.
A multi-answer item is right only when the whole set of letters matches. An answer turn from which no letter
can be read ends the episode unanswered (`END_NO_LETTER`), counted as such, not as a wrong answer.

What this module adds to §1's order, and why (checked against the hand-labelled doctor turns of
`tests/data/answer_turns.jsonl`: SmolLM2 evaluation turns in all three modes and hand-written turns in the
styles of large models, English and Chinese):
- `A` followed by a space and a lower-case word or a number is the article, not option A:
  `answer: A 45-year-old man ... most likely has pulmonary embolism` is option text, not A.
- Where no letter follows the marker, letters named mid-sentence count (`the most likely diagnosis is D`,
  `option (C)`, `(D).`, `故选D`, `答案为E`), the last such first; §1's "right after the marker" read these
  turns as no answer.
- A letter contradicted by the option text right after it names two options and commits to neither:
  `B: Ceftriaxone` where Ceftriaxone is C, or `A: B: ...`, is no answer. The untrained SmolLM2 starts nearly
  every turn with `A:` whatever option text follows, so neither its letter nor its text is its choice there.
- For a single-answer item, an echoed option list (consecutive `A: ...` / `B: ...` lines and any letter line
  after them, or `A: x, B: y` on one line) is removed before steps 2 and 3: read by option text it came out
  as `ABCD`, and SmolLM2 often starts the list again until the token limit cuts it (a last line `A: 病因治`).
- A turn with no answer marker reads its letters from its start (`D. Pulmonary embolism`).
- Step 3 takes every option named for a multi-answer item; for a single-answer item one: the first named
  after the last `most likely` / `diagnosis is` / `考虑` when there is one, else the first named. Option texts
  match whole words, in any case and spacing, with either apostrophe.
- An empty bracket reads the letters after it (`【答案】E`).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import re
from collections.abc import Mapping, Sequence

from promed_jax.data.cases import Case
from promed_jax.text import prompts

QUESTION = "question"
ANSWER = "answer"
INVALID = "invalid"

# Why an episode ended (recorded per dialogue).
END_ANSWER = "answer"
END_NO_LETTER = "no_letter"  # an answer turn from which no option letter could be read: unanswered
END_NO_MARKER = "no_marker"
END_RUNAWAY = "runaway"
END_QUESTION_LIMIT = "question_limit"
END_LENGTH = "length"

# A turn marker: `question:` / `answer:` in any case, ASCII or full-width colon. The Chinese prompt keeps the
# English markers (as the paper's does); a Chinese doctor's 答案： also marks an answer, but 问题： does not mark
# a question, because it is the Chinese prompt's label of the problem, which a doctor may echo.
_MARKER = re.compile(r"(?<![A-Za-z])(?P<q>question\s*[:：])|(?<![A-Za-z])(?P<a>answer\s*[:：]|答案\s*[:：])", re.IGNORECASE)
_BRACKETED = re.compile(r"【\s*(?:answer\s*[:：]|答案\s*[:：]?|正确答案(?:是|\s*[:：])?)(?P<body>[^【】]*)】", re.IGNORECASE)
# The `answer` marker of the second extraction step: where a bare answer's letters follow.
_ANSWER_WORD = re.compile(
    r"(?:(?<![A-Za-z])answer(?![A-Za-z])(?:\s+is)?\s*[:：]?|正确答案是|正确答案\s*[:：]?|正确选项是?\s*[:：]?|答案是?\s*[:：]?)",
    re.IGNORECASE,
)
# Words after which a doctor names its letters mid-sentence (`the diagnosis is D`, `option (C)`, `故选D`).
_COMMIT = re.compile(
    r"(?<![A-Za-z])(?:options?|choices?|is|are|be|choose|select|pick)(?![A-Za-z])\s*[:：]?|[(（\[]|选项?|选择|为|是",
    re.IGNORECASE,
)
# Phrases after which a doctor names its diagnosis in words; the option text mentioned first after the last of
# them is a single-answer turn's choice when the turn mentions several.
_TEXT_ANCHOR = re.compile(r"(?<![A-Za-z])(?:answer\s+is|diagnosis\s+is|most\s+likely)(?![A-Za-z])|考虑|诊断[为是]|最可能", re.IGNORECASE)
# Separators between letters: spaces, commas (also Chinese), `and`, slashes, brackets around a letter, bold.
_LETTER_SEP = re.compile(r"(?:[\s,，、;；/&+()（）\[\]*]|and\b|or\b|以及|和)+", re.IGNORECASE)
_LETTER_RUN = re.compile(r"[A-Za-z]+")
# What may stand between a letter and the option text it names: `C: `, `C. `, `(C) `, `C - `, `**C.`.
_LETTER_TO_TEXT = re.compile(r"[\s:：.．)）\]】*\-–—,，、(（]*")
# A letter that opens an option entry: `B: ...`, `B. ...`, `B) ...` (an echoed option list, or `A: B: ...`).
_ENTRY = re.compile(r"(?<![A-Za-z0-9])(?P<letter>[A-Z])[ \t]*[:：.．)）]")
# The same entry opening a line, after any list, quote or bold marks (matched at the line's start).
_ENTRY_LINE = re.compile(r"[ \t*#>-]*(?P<letter>[A-Z])[ \t]*[:：.．)）]")
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


def _is_cjk(ch: str) -> bool:
    return "\u4e00" <= ch <= "\u9fff"


@functools.lru_cache(maxsize=4096)
def _option_pattern(option: str) -> re.Pattern[str]:
    """An option's full text, case- and spacing-insensitive, straight or curly apostrophe, as a whole word."""
    body = r"\s+".join(re.escape(w).replace("'", "['’]").replace("’", "['’]") for w in option.split())
    head = r"(?<![A-Za-z])" if option[:1].isascii() and option[:1].isalnum() else ""
    tail = r"(?![A-Za-z])" if option[-1:].isascii() and option[-1:].isalnum() else ""
    return re.compile(head + body + tail, re.IGNORECASE)


def _option_at(text: str, pos: int, options: Mapping[str, str]) -> str | None:
    """The letter of the longest option text that starts at `pos`; None when none does."""
    hits = [(m.end(), k) for k, v in options.items() if (m := _option_pattern(v).match(text, pos))]
    return max(hits)[1] if hits else None


def _contradicted(text: str, end: int, letter: str, options: Mapping[str, str]) -> bool:
    """True when the letter that ends at `end` is followed by another option's text (`B: Ceftriaxone` where
    Ceftriaxone is C) or by another option's letter entry (`A: B: ...`): the turn names two options."""
    pos = _LETTER_TO_TEXT.match(text, end).end()
    named = _option_at(text, pos, options)
    if named is not None:
        return named != letter
    entry = _ENTRY.match(text, pos)
    return entry is not None and entry.group("letter") != letter and entry.group("letter") in options


def _letters_at(text: str, pos: int, options: Mapping[str, str], *, loose: bool) -> tuple[str, ...] | None:
    """Option letters standing alone at `pos` (`C`, `A, C`, `(B)`, `**D.`, `ACD`, `a and c`).

    None when there are none; () when the single letter read is contradicted by the option text after it
    (`_contradicted`), which ends the search: the turn commits to neither option. `loose` (inside brackets)
    accepts lower case and concatenated letters before words; outside brackets they are accepted only when
    nothing word-like follows them, so that `answer: a patient` or `ACE inhibitors` is no answer while
    `answer: c.` and `答案：ACD。` are. A capital `A` followed by a space and a lower-case word or a number is
    the English article (`answer: A 45-year-old man ...`, `A patient ...`), not option A.
    """
    found: list[str] = []
    strict_run = True  # every run so far was a single upper-case letter
    end = pos
    while True:
        sep = _LETTER_SEP.match(text, end)
        run = _LETTER_RUN.match(text, sep.end() if sep else end)
        if run is None:
            break
        word, nxt = run.group(0), text[run.end() : run.end() + 2]
        glued = nxt[:1].isalnum() and not _is_cjk(nxt[:1])  # `C3`, `Bx`
        glued = glued or (nxt[:1] in "-'’" and nxt[1:2].isalnum())  # `B-cell`, `A's`
        if glued or not all(ch.upper() in options for ch in word) or len(set(word.upper())) != len(word):
            break
        found.extend(word.upper())
        strict_run = strict_run and len(word) == 1 and word.isupper()
        end = run.end()
    if not found:
        return None
    after = text[end:]
    following = after.lstrip(" \t")
    article = found == ["A"] and after[:1] in (" ", "\t") and following[:1].isascii()
    if article and (following[:1].islower() or following[:1].isdigit()):
        return None
    if not loose:
        rest = after.lstrip(" \t,，、")
        if rest[:1].isascii() and rest[:1].isalpha() and not strict_run:
            return None
    if len(found) == 1 and _contradicted(text, end, found[0], options):
        return ()
    return tuple(sorted(set(found)))


def _without_option_list(text: str, options: Mapping[str, str]) -> str:
    """The turn without an echoed option list: a block of consecutive lines that open with two or more
    different letters (`A: ...` / `B: ...`) and any such line after it (the list started again, cut short), or
    a line with two or more entries each followed by its own option text (`The options are A: Gentamicin,
    B: Ciprofloxacin, ...`). A single-answer doctor that lists options has not chosen one by listing them."""
    kept: list[str] = []
    listed = False
    for is_entry, block in itertools.groupby(text.split("\n"), key=lambda line: bool(_ENTRY_LINE.match(line))):
        lines = list(block)
        listed = listed or (is_entry and len({_ENTRY_LINE.match(line).group("letter") for line in lines}) >= 2)
        if not (is_entry and listed):
            kept += [_without_inline_entries(line, options) for line in lines]
    return "\n".join(kept)


def _without_inline_entries(line: str, options: Mapping[str, str]) -> str:
    entries = []
    for m in _ENTRY.finditer(line):
        own = options.get(m.group("letter"))
        named = own and _option_pattern(own).match(line, _LETTER_TO_TEXT.match(line, m.end()).end())
        if named:
            entries.append((m.start(), named.end(), m.group("letter")))
    if len({letter for *_, letter in entries}) < 2:
        return line
    for start, stop, _ in reversed(entries):
        line = line[:start] + line[stop:]
    return line


def _option_mentions(text: str, options: Mapping[str, str]) -> list[tuple[int, str]]:
    """(position, letter) of each mention of an option's full text, leaving out mentions inside a longer
    option's (`Gastroenteritis` inside `Viral gastroenteritis`), in text order."""
    spans = [(m.start(), m.end(), k) for k, v in options.items() for m in _option_pattern(v).finditer(text)]
    inside = {(s, e) for s, e, _ in spans for s2, e2, _ in spans if s2 <= s and e <= e2 and e2 - s2 > e - s}
    return sorted((s, k) for s, e, k in spans if (s, e) not in inside)


def _named_options(text: str, anchor: int, options: Mapping[str, str], *, multi_answer: bool) -> tuple[str, ...]:
    """The options a turn names by their text, after the answer marker at `anchor` if any there, else anywhere.

    A multi-answer item takes every option named. A single-answer item takes one: the first named after the
    last phrase that introduces a diagnosis (`most likely`, `diagnosis is`, `考虑`), else the first named.
    """
    base = anchor if _option_mentions(text[anchor:], options) else 0
    mentions = _option_mentions(text[base:], options)
    if not mentions:
        return ()
    if multi_answer:
        return tuple(sorted({k for _, k in mentions}))
    intros = [m.end() - base for m in _TEXT_ANCHOR.finditer(text, base)]
    after = [k for s, k in mentions if intros and s >= intros[-1]]
    return (after[0],) if after else (mentions[0][1],)


def extract_answer(text: str, options: Mapping[str, str], *, multi_answer: bool = False) -> tuple[str, ...]:
    """The answer letters of a turn, sorted and de-duplicated, in promed.md §1's order; () when none.

    `options` maps upper-case letters to non-empty texts, as a `Case` holds them.

    1. The last bracketed marker: the letters inside it (`【answer: C】`), or after it when it is empty (`【答案】E`).
    2. Letters standing alone right after the last `answer` marker; else after a word that names them
       mid-sentence (`the diagnosis is D`, `option (C)`, `故选D`), the last such first; else at the very start of
       the turn (`D. Pulmonary embolism`, SmolLM2's `A: <option text>`). A turn with no marker reads from its
       start. For a single-answer item an echoed option list is removed first (`_without_option_list`).
    3. The options whose full text the turn names (`_named_options`).
    A letter contradicted by the option text right after it (`B: Ceftriaxone` where Ceftriaxone is C) ends the
    search with no answer.
    """
    bracketed = list(_BRACKETED.finditer(text))
    if bracketed:
        last = bracketed[-1]
        if last.group("body").strip():
            found = _letters_at(last.group("body"), 0, options, loose=True)
        else:
            found = _letters_at(text, last.end(), options, loose=False)
        if found is not None:
            return found
    if not multi_answer:
        text = _without_option_list(text, options)
    markers = list(_ANSWER_WORD.finditer(text))
    anchor = markers[-1].end() if markers else 0
    starts = [anchor, *(m.end() for m in reversed(list(_COMMIT.finditer(text, anchor)))), *([0] if anchor else [])]
    for pos in starts:
        found = _letters_at(text, pos, options, loose=False)
        if found is not None:
            return found
    return _named_options(text, anchor, options, multi_answer=multi_answer)


def _question_text(text: str, marker_end: int) -> str:
    """The question after the marker, up to the end of its first non-empty line (a doctor that goes on to
    invent the patient's reply is cut there)."""
    for line in text[marker_end:].split("\n"):
        if line.strip():
            return line.strip()
    return ""


def parse_doctor_turn(
    text: str, options: Mapping[str, str], *, questions_allowed: bool = True, multi_answer: bool = False
) -> DoctorTurn:
    """Classifies a doctor turn by its first marker and reads its question or answer.

    Where no question is allowed (the reactive and full-information modes) a turn with neither marker can only
    be the answer, so it is read as one: those baselines measure knowledge, not the turn format. An answer turn
    whose letters cannot be read has `letters == ()`; the episode then ends unanswered (`END_NO_LETTER`).
    """
    if is_runaway(text):
        return DoctorTurn(kind=INVALID, reason=END_RUNAWAY)
    m = _MARKER.search(text)
    if m is None:
        if not questions_allowed:
            return DoctorTurn(kind=ANSWER, letters=extract_answer(text, options, multi_answer=multi_answer))
        return DoctorTurn(kind=INVALID, reason=END_NO_MARKER)
    if m.group("q"):
        return DoctorTurn(kind=QUESTION, question=_question_text(text, m.end()))
    return DoctorTurn(kind=ANSWER, letters=extract_answer(text, options, multi_answer=multi_answer))


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
