"""The environment, not a model: on the synthetic clinic with the fact_select patient, a scripted doctor that
reads only the rendered dialogue text and the disease table scores 100%, a random immediate answerer is near
chance, and the protocol's limits (question budget, degenerate turns, modes) hold."""

import random
import re

import pytest

from promed_jax.consult import protocol
from promed_jax.consult.patients import FactSelectPatient
from promed_jax.consult.rollout import consult
from promed_jax.data import synthetic
from promed_jax.text.tokenizer import build_tiny_tokenizer

N_CASES = 300


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def cases():
    return synthetic.make_cases(N_CASES, seed=11)


def finding_question(finding: synthetic.Finding) -> str:
    """Asks about a finding in the words of its fact (the patient's retrieval is lexical)."""
    return f"Is it true that {finding.fact[0].lower()}{finding.fact[1:].rstrip('.')}?"


QUESTION_TO_FINDING = {finding_question(f): name for name, f in synthetic.FINDINGS.items()}
_TURN = re.compile(r"<\|im_start\|>(\w+)\n(.*?)<\|im_end\|>", re.DOTALL)


class ScriptedDoctor:
    """Knows the disease table only. Reads the rendered chat text, asks about the findings that still tell the
    options apart, and answers with the option that the present findings fit once one remains."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.seen_texts = []

    def chat(self, conversations, *, max_tokens=256, temperature=0.0, stop=()):
        return [self._turn(self.tokenizer.apply_chat_template(list(c), tokenize=False)) for c in conversations]

    def _turn(self, text: str) -> str:
        self.seen_texts.append(text)
        turns = _TURN.findall(text)
        options = dict(re.findall(r"^([A-H]): (.+)$", turns[0][1], re.MULTILINE))
        present, absent = set(), set()
        for (_, asked), (_, reply) in zip(turns[1::2], turns[2::2]):
            name = QUESTION_TO_FINDING[asked.removeprefix("question: ")]
            (present if reply == synthetic.FINDINGS[name].fact else absent).add(name)
        alive = [
            letter
            for letter, disease in options.items()
            if synthetic.fits(disease, present) and not (absent & synthetic.DISEASES[disease])
        ]
        if len(alive) == 1:
            return f"answer: the findings {sorted(present)} fit {options[alive[0]]}. 【answer: {alive[0]}】"
        assert alive, f"no option fits {present} without {absent}"
        # The unasked finding that splits the remaining options most evenly.
        counts = {}
        for letter in alive:
            for f in synthetic.DISEASES[options[letter]] - present - absent:
                counts[f] = counts.get(f, 0) + 1
        best = min(sorted(counts), key=lambda f: abs(2 * counts[f] - len(alive)))
        return "question: " + finding_question(synthetic.FINDINGS[best])


class RandomDoctor:
    def __init__(self, seed):
        self.rng = random.Random(seed)

    def chat(self, conversations, *, max_tokens=256, temperature=0.0, stop=()):
        out = []
        for conv in conversations:
            letters = re.findall(r"^([A-H]): ", conv[0]["content"], re.MULTILINE)
            out.append(f"answer: 【answer: {self.rng.choice(letters)}】")
        return out


class ScriptDoctor:
    """Plays a fixed list of turns (the same for every dialogue), repeating the last one."""

    def __init__(self, turns):
        self.turns = turns
        self.batch_sizes = []

    def chat(self, conversations, *, max_tokens=256, temperature=0.0, stop=()):
        self.batch_sizes.append(len(conversations))
        return [self.turns[min(sum(m["role"] == "assistant" for m in c), len(self.turns) - 1)] for c in conversations]


def test_scripted_doctor_scores_100_percent(cases, tokenizer):
    doctor = ScriptedDoctor(tokenizer)
    dialogues = consult(cases, doctor, FactSelectPatient(), mode="proactive", max_questions=10)
    assert [d.end for d in dialogues] == [protocol.END_ANSWER] * N_CASES
    assert all(d.correct for d in dialogues)
    questions = [d.n_questions for d in dialogues]
    assert max(questions) <= 10 and sum(questions) / N_CASES >= 1.0
    # which facts were revealed when: every revealed fact is a gold finding, recorded at its turn
    for d in dialogues:
        for k, facts in enumerate(d.revealed, start=1):
            for i in facts:
                assert d.revealed_turn[i] == k and d.case.facts[i] in d.messages[2 * k]["content"]
    # the doctor read rendered chat-template text (it is never given the Case)
    assert all("<|im_start|>" in t for t in doctor.seen_texts)


def test_random_immediate_answers_are_near_chance(cases):
    dialogues = consult(cases, RandomDoctor(seed=0), FactSelectPatient(), mode="proactive")
    acc = sum(d.correct for d in dialogues) / N_CASES
    assert all(d.n_questions == 0 and d.answered for d in dialogues)
    assert 0.15 <= acc <= 0.35, acc  # chance is 1/4; 300 cases put 3.5 sigma at +-0.09


def test_question_budget_and_no_answer(cases):
    doctor = ScriptDoctor(["question: Is it true that the patient has a fever?"])
    (d,) = consult(cases[:1], doctor, FactSelectPatient(), max_questions=10)
    assert d.n_questions == 10 and len(d.doctor_turns) == 11
    assert d.end == protocol.END_QUESTION_LIMIT and d.letters == () and not d.correct
    assert len(d.messages) == 1 + 2 * 10 + 1


def test_degenerate_turns_end_without_answer(cases):
    (d,) = consult(cases[:1], ScriptDoctor(["I think it is pneumonia."]), FactSelectPatient())
    assert (d.end, d.letters, d.correct, d.n_questions) == (protocol.END_NO_MARKER, (), False, 0)
    loop = ScriptDoctor(["question: " + "is it is it " * 20])
    (d,) = consult(cases[:1], loop, FactSelectPatient())
    assert d.end == protocol.END_RUNAWAY and d.n_questions == 0


@pytest.mark.parametrize("mode", ["reactive", "full"])
def test_answer_at_once_modes_allow_no_question(cases, mode):
    (d,) = consult(cases[:1], ScriptDoctor(["question: any fever?"]), FactSelectPatient(), mode=mode)
    assert d.end == protocol.END_QUESTION_LIMIT and d.n_questions == 0
    first = d.messages[0]["content"]
    assert ("The patient has" in first or "The patient is" in first or "The patient's" in first) == (mode == "full")


def test_finished_dialogues_drop_out_and_samples_are_grouped(cases):
    # every dialogue asks twice then answers; the batch shrinks to nothing as they finish
    turns = ["question: Is it true that the patient has a cough?"] * 2 + ["answer: 【answer: A】"]
    doctor = ScriptDoctor(turns)
    dialogues = consult(cases[:3], doctor, FactSelectPatient(), samples=4)
    assert doctor.batch_sizes == [12, 12, 12]
    assert [(d.case.id, d.sample) for d in dialogues] == [(c.id, g) for c in cases[:3] for g in range(4)]
    assert all(d.n_questions == 2 and d.letters == ("A",) for d in dialogues)

    early = ScriptDoctor(["answer: 【answer: B】"])
    mixed = [cases[0], cases[1]]
    dialogues = consult(mixed, early, FactSelectPatient(), samples=2)
    assert early.batch_sizes == [4]


def test_token_budget_ends_long_dialogues(cases, tokenizer):
    def count(messages):
        return sum(len(m["content"]) for m in messages)  # a stand-in length: characters

    doctor = ScriptDoctor(["question: Is it true that the patient has a cough?"])
    first = len(protocol.doctor_first_message(cases[0]))
    (d,) = consult(cases[:1], doctor, FactSelectPatient(), max_new_tokens=10, max_dialogue_tokens=first + 150, count_tokens=count)
    assert d.end == protocol.END_LENGTH and 0 < d.n_questions < 10
