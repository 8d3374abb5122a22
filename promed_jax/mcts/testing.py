"""Test and benchmark helpers: a scripted doctor with a fixed set of candidate turns per dialogue state on the
synthetic clinic, and the exhaustive enumeration of its whole candidate tree (the search's oracle)."""

from __future__ import annotations

import re

import jax
import numpy as np

from promed_jax.consult import protocol
from promed_jax.consult.patients import PatientRequest
from promed_jax.data import synthetic


def finding_question(name: str) -> str:
    """The doctor's question about a finding, in the words the fact_select patient retrieves by."""
    return "question: " + synthetic.FINDINGS[name].question


_OPTION = re.compile(r"^([A-H]): (.+)$", re.MULTILINE)


class CandidateDoctor:
    """A fixed list of candidate turns per dialogue state: questions about the first `width` findings of the
    options' diseases not asked yet (alphabetical), then the answer that fits what is known (the first option
    whose disease holds every finding the patient confirmed).

    `pick='key'` gives a row the candidate its key names (so keys decide, as they do for a model);
    `pick='cycle'` gives the n-th request for a state its n-th candidate (mod their number), so that a node's
    slots cover all its candidates and the search can reach every leaf of the candidate tree. It refuses a
    conversation that already ended (no calls below terminals) and counts its calls and turns."""

    def __init__(self, width: int = 2, pick: str = "key"):
        if pick not in ("key", "cycle"):
            raise ValueError(f"pick must be 'key' or 'cycle', got {pick!r}")
        self.width, self.pick = width, pick
        self.turns = 0
        self.calls = 0
        self.requests: dict[tuple[str, ...], int] = {}

    def candidates(self, conversation) -> list[str]:
        first = conversation[0]["content"]
        options = dict(_OPTION.findall(first))
        asked, present = set(), set()
        for doctor, reply in zip(conversation[1::2], conversation[2::2]):
            if not doctor["content"].startswith("question: "):
                raise AssertionError(f"a call below a terminal node: {doctor['content']!r}")
            name = next(n for n in synthetic.FINDINGS if finding_question(n) == doctor["content"])
            asked.add(name)
            if reply["content"] == synthetic.FINDINGS[name].fact:
                present.add(name)
        if len(conversation) % 2 == 0:
            raise AssertionError("the doctor was asked to speak after itself")
        pool = sorted(set().union(*(synthetic.DISEASES[d] for d in options.values())) - asked)
        letter = next((k for k, d in options.items() if synthetic.fits(d, present)), "A")
        return [finding_question(n) for n in pool[: self.width]] + [f"answer: 【answer: {letter}】"]

    def chat(self, conversations, *, max_tokens=256, temperature=0.0, stop=(), keys=None) -> list[str]:
        if keys is None or keys.shape != (len(conversations),):
            raise ValueError("the search must pass one key per conversation")
        self.calls += 1
        self.turns += len(conversations)
        data = np.asarray(jax.random.key_data(keys))
        out = []
        for conversation, word in zip(conversations, data, strict=True):
            options = self.candidates(conversation)
            if self.pick == "key":
                out.append(options[int(word[-1]) % len(options)])
                continue
            state = tuple(m["content"] for m in conversation)
            n = self.requests.get(state, 0)
            self.requests[state] = n + 1
            out.append(options[n % len(options)])
        return out


def exhaustive_best(
    case, w, doctor, patient, max_questions: int, *, bonus: float = 2.0, decay: float = 0.9
) -> tuple[float, float]:
    """(the most total SIG, the best discounted return) over every leaf of the scripted doctor's whole candidate
    tree, with the environment's rewards: a question's SIG, a right answer's bonus, 0 for any other end."""
    first = [{"role": "user", "content": protocol.doctor_first_message(case, max_questions=max_questions)}]
    best_sig, best_return = 0.0, -np.inf

    def walk(conversation, revealed, history, asked, ret, scale):
        nonlocal best_sig, best_return
        for text in doctor.candidates(conversation):
            turn = protocol.parse_doctor_turn(text, case.options)
            if turn.kind == protocol.ANSWER or asked >= max_questions:
                right = turn.kind == protocol.ANSWER and protocol.is_correct(turn.letters, case.answer)
                best_sig = max(best_sig, float(w @ revealed))
                best_return = max(best_return, ret + scale * (bonus if right else 0.0))
                continue
            (reply,) = patient.reply([PatientRequest(case=case, question=turn.question, history=history)])
            now = revealed.copy()
            now[list(reply.facts)] = True
            walk(
                [*conversation, {"role": "assistant", "content": text}, {"role": "user", "content": reply.text}],
                now,
                (*history, (turn.question, reply.text)),
                asked + 1,
                ret + scale * float(w @ (now & ~revealed)),
                scale * decay,
            )

    walk(first, np.zeros(case.n_facts, bool), (), 0, 0.0, 1.0)
    return best_sig, best_return
