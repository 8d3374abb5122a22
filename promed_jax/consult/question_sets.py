"""Hand-written natural question sets (tests/data/natural_questions_*.jsonl) and how a patient scores on them.

A record: `case` (a case id as the loader names it, e.g. `medqa_dev_convo:224`), `question`, `fact` (index
of the one fact it asks for, or null) and `kind`: `targeted` (asks for `fact`), `unanswerable` (no fact
answers it) or `broad` ("Anything else I should know?"; scored apart, no right answer).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from collections.abc import Mapping, Sequence

from promed_jax.consult.patients import Patient, PatientReply, PatientRequest
from promed_jax.data.cases import Case
from promed_jax.errors import DataError

KINDS = ("targeted", "unanswerable", "broad")


@dataclasses.dataclass(frozen=True)
class Question:
    case: str
    question: str
    fact: int | None
    kind: str


def load_questions(path: str | pathlib.Path) -> list[Question]:
    path = pathlib.Path(path)
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        try:
            q = Question(**json.loads(line))
        except (json.JSONDecodeError, TypeError) as err:
            raise DataError(f"{path} line {n}: not a question record ({err})") from None
        if q.kind not in KINDS or (q.fact is None) != (q.kind != "targeted"):
            raise DataError(f"{path} line {n}: field 'kind' {q.kind!r} does not fit field 'fact' {q.fact!r}")
        out.append(q)
    return out


@dataclasses.dataclass(frozen=True)
class QuestionScores:
    """Shares over one question set (each a fraction in [0, 1]).

    Attributes:
      returned: targeted questions whose reply holds the target fact.
      first: targeted questions whose reply starts with the target fact.
      other: targeted and unanswerable replies holding a fact that answers something else (for an
        unanswerable question, any fact).
      cannot_answer: unanswerable questions given the cannot-answer reply.
      broad_answered: broad questions that got at least one fact.
      broad_facts: mean number of facts a broad question got.
      n_targeted, n_unanswerable, n_broad: the counts.
    """

    returned: float
    first: float
    other: float
    cannot_answer: float
    broad_answered: float
    broad_facts: float
    n_targeted: int
    n_unanswerable: int
    n_broad: int


def ask_all(patient: Patient, questions: Sequence[Question], cases: Mapping[str, Case]) -> list[PatientReply]:
    """One batched `reply` call for the whole set."""
    missing = sorted({q.case for q in questions} - set(cases))
    if missing:
        raise DataError(f"question set names case {missing[0]}, which the loaded cases lack")
    return patient.reply([PatientRequest(case=cases[q.case], question=q.question) for q in questions])


def score(questions: Sequence[Question], replies: Sequence[PatientReply]) -> QuestionScores:
    def share(hits: list[bool]) -> float:
        return sum(hits) / len(hits) if hits else float("nan")

    pairs = list(zip(questions, replies, strict=True))
    targeted = [(q, r.facts) for q, r in pairs if q.kind == "targeted"]
    unanswerable = [r.facts for q, r in pairs if q.kind == "unanswerable"]
    broad = [r.facts for q, r in pairs if q.kind == "broad"]
    other = [any(f != q.fact for f in facts) for q, facts in targeted] + [bool(f) for f in unanswerable]
    return QuestionScores(
        returned=share([q.fact in facts for q, facts in targeted]),
        first=share([bool(facts) and facts[0] == q.fact for q, facts in targeted]),
        other=share(other),
        cannot_answer=share([not f for f in unanswerable]),
        broad_answered=share([bool(f) for f in broad]),
        broad_facts=sum(map(len, broad)) / len(broad) if broad else float("nan"),
        n_targeted=len(targeted),
        n_unanswerable=len(unanswerable),
        n_broad=len(broad),
    )
