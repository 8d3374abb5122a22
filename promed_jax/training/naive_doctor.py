"""The scripted naive doctor of the synthetic clinic: the warm start that teaches a fresh model the protocol.

It reads only the dialogue text and the disease table (`data.synthetic`: DISEASES, FINDINGS), never the
case. It asks about the table's findings other than the complaint in one fixed order, the findings'
alphabetical order (relevant to this patient or not: "question: Is it true that the patient has a fever?",
which the fact_select patient answers verbatim), until the patient confirms one or it has asked
`max_questions`. Then it answers by the table: an option whose disease explains every finding heard
(denials are not used), drawn among those with the seed and the case's first message; the marker holds the
option's text (`answer_text`; `【answer: Pneumonia】`, which `protocol.extract_answer` maps to its letter). So
it speaks the protocol but asks without looking at the case: 0.75 accuracy with 6.9 questions on 512
synthetic cases at max_questions = 10 (0.66 with 4.8 at 6) (the SFT stage's log reports it).

Why this doctor (measured with `experiments/warm_start_probe.py` on a 4-layer, 128-wide model, README "The
embedded default"). A tiny model must learn when to answer and what to ask from the dialogue it sees, and
the evaluation decodes greedily:
- A question count drawn per case from a hash of the first message (the first version) left nothing to
  read: the trained model asked 9.9 questions and answered 3.1% of held-out cases. "Answer once a finding
  is confirmed" is in the last reply; the limit, where only a count tells, is a fixed question here.
- A random question order per case taught the greedy model the commonest finding: it asked about a fever
  over and over (proactive accuracy 19-31%). A fixed order is a sequence it can replay (43.8%).
- The letter in the marker: the model named the gold option's disease in 100% of full-information answers
  but wrote its letter at chance (the lookup from a name to its letter in a shuffled list); the text is read.
`RandomDoctor` keeps the per-case random order (`fixed_order`), and `ask_differential` restricts the
questions to the options' diseases' findings (a stronger scripted doctor; not the default).
`write_dialogues` writes its consultations in the dialogue export schema.
"""

from __future__ import annotations

import hashlib
import pathlib
import re
from collections.abc import Sequence

import numpy as np

from promed_jax.backends.base import Message
from promed_jax.consult.patients import Patient
from promed_jax.consult.rollout import Dialogue, consult
from promed_jax.data import synthetic
from promed_jax.data.cases import Case
from promed_jax.io import JsonlWriter, atomic_path

KIND = "naive"
_OPTION = re.compile(r"^([A-H]): (.+)$", re.MULTILINE)


def finding_question(finding: synthetic.Finding) -> str:
    """A question in the words of the finding's fact (the fact_select patient's retrieval is lexical)."""
    return f"Is it true that {finding.fact[0].lower()}{finding.fact[1:].rstrip('.')}?"


_QUESTION_TO_FINDING = {f"question: {finding_question(f)}": name for name, f in synthetic.FINDINGS.items()}


class ScriptedDoctor:
    """A `ChatBackend` whose reply to a conversation is `_turn(messages)`, a function of the dialogue so far
    (sampling settings are ignored): the naive doctor here and the topic doctor of `topic_doctor`."""

    def chat(
        self,
        conversations: Sequence[Sequence[Message]],
        *,
        max_tokens: int = 256,
        temperature: float = 0.0,
        stop: Sequence[str] = (),
    ) -> list[str]:
        return [self._turn(list(c)) for c in conversations]

    def _turn(self, messages: list[Message]) -> str:
        raise NotImplementedError


def answer_text(options: dict[str, str], present: set[str], letter: str) -> str:
    """A scripted answer: the findings heard and the chosen option's text, also in the marker
    ("answer: a cough, a fever fit Pneumonia. 【answer: Pneumonia】")."""
    heard = ", ".join(synthetic.FINDINGS[f].complaint for f in sorted(present))
    return f"answer: {heard} fit {options[letter]}. 【answer: {options[letter]}】"


class NaiveDoctor(ScriptedDoctor):
    """A `ChatBackend` that plays the naive doctor (see the module doc)."""

    stop_at_finding = True  # answer once the patient confirms a finding (the module doc)
    ask_differential = False  # True: ask about findings of the options' diseases only
    fixed_order = True  # the table's (alphabetical) order; False: an order drawn per case

    def __init__(self, *, seed: int, max_questions: int):
        self.seed = seed
        self.max_questions = max_questions

    def _rng(self, first_message: str) -> np.random.Generator:
        digest = int.from_bytes(hashlib.sha256(first_message.encode()).digest()[:8], "big")
        return np.random.default_rng([self.seed, digest])

    def _turn(self, messages: list[Message]) -> str:
        first = messages[0]["content"]
        options = dict(_OPTION.findall(first))
        complaint = next(name for name, f in synthetic.FINDINGS.items() if f"because of {f.complaint}." in first)
        rng = self._rng(first)
        pool = set(synthetic.FINDINGS)
        if self.ask_differential:
            pool = set().union(*(synthetic.DISEASES[d] for d in options.values()))
        others = sorted(pool - {complaint})
        order = others if self.fixed_order else [others[i] for i in rng.permutation(len(others))]
        present, absent = {complaint}, set()
        for question, reply in zip(messages[1::2], messages[2::2], strict=False):
            name = _QUESTION_TO_FINDING[question["content"]]
            (present if synthetic.FINDINGS[name].fact in reply["content"] else absent).add(name)
        asked = sum(m["role"] == "assistant" for m in messages)
        if asked < self.max_questions and not (self.stop_at_finding and len(present) > 1):
            return "question: " + finding_question(synthetic.FINDINGS[order[asked]])
        alive = self._candidates(options, present, absent)
        return answer_text(options, present, alive[int(rng.integers(len(alive)))])

    @staticmethod
    def _candidates(options: dict[str, str], present: set[str], absent: set[str]) -> list[str]:
        """The letters whose disease explains every finding heard (all, if none does); denials are not used."""
        return [letter for letter, disease in sorted(options.items()) if synthetic.fits(disease, present)] or sorted(
            options
        )


class RandomDoctor(NaiveDoctor):
    """The random-N doctor of the evaluation (issue 14's random-10, N = the protocol's question limit): it
    always asks exactly `max_questions` findings of the table in a random order (the naive doctor's draw; it
    does not stop at a confirmed finding), then answers with the option they fit best: most findings heard explained, fewest denied ones claimed
    (score |heard ∩ D| - |heard - D| - |denied ∩ D|), a tie drawn at random. A baseline for how much asking
    well beats asking much."""

    stop_at_finding = False
    fixed_order = False  # a random order per case

    @staticmethod
    def _candidates(options: dict[str, str], present: set[str], absent: set[str]) -> list[str]:
        def score(disease: str) -> int:
            d = synthetic.DISEASES[disease]
            return len(present & d) - len(present - d) - len(absent & d)

        best = max(score(disease) for disease in options.values())
        return [letter for letter, disease in sorted(options.items()) if score(disease) == best]


def dialogue_record(d: Dialogue, *, policy: dict) -> dict:
    """One line of the dialogue export schema, for a scripted doctor described by `policy`."""
    return {
        "case_id": d.case.id,
        "fingerprint": d.case.fingerprint,
        "messages": [dict(m) for m in d.messages],
        "letters": list(d.letters),
        "correct": d.correct,
        "end": d.end,
        "policy": policy,
        "search": {"kind": "none"},
        "llm_calls": {"doctor_turns": 0, "patient_replies": d.n_questions},
    }


def write_dialogues(
    cases: Sequence[Case],
    patient: Patient,
    path: str | pathlib.Path,
    *,
    seed: int,
    max_questions: int,
    protocol_max_questions: int,
) -> list[dict]:
    """Consults every case with the naive doctor and writes the file whole (atomically); returns its records."""
    doctor = NaiveDoctor(seed=seed, max_questions=min(max_questions, protocol_max_questions))
    dialogues = consult(cases, doctor, patient, mode="proactive", max_questions=protocol_max_questions)
    policy = {"kind": KIND, "seed": seed, "max_questions": max_questions}
    records = [dialogue_record(d, policy=policy) for d in dialogues]
    write_records(path, records)
    return records


def write_records(path: str | pathlib.Path, records: Sequence[dict]) -> None:
    """Writes dialogue records as one file, whole and atomically."""
    with atomic_path(path) as tmp, JsonlWriter(tmp) as writer:
        for record in records:
            writer.write(record)
