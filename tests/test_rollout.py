"""Batched multi-turn rollouts through the real jitted sampler (tiny random model, tiny tokenizer)."""

import numpy as np
import pytest
from flax import nnx

from promed_jax.backends import make_backend
from promed_jax.backends.local import LocalBackend
from promed_jax.consult import protocol
from promed_jax.consult.patients import FactSelectPatient
from promed_jax.consult.rollout import rollout
from promed_jax.data import synthetic
from promed_jax.models import ModelConfig, Transformer
from promed_jax.text.dialogue import render_dialogue
from promed_jax.text.tokenizer import build_tiny_tokenizer

MAX_NEW = 16


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def backend(tokenizer):
    model = Transformer(ModelConfig.tiny(vocab_size=len(tokenizer)), rngs=nnx.Rngs(0))
    backend = make_backend("local", {"max_batch": 8, "seed": 0}, model=model, tokenizer=tokenizer)
    assert isinstance(backend, LocalBackend)
    return backend


class MarkedDoctor:
    """The real sampler writes every turn; a fixed marker in front makes the random model follow the protocol:
    case i's samples ask `i + 1` questions (about a fact of the case, so the patient answers) and then answer."""

    def __init__(self, backend, cases):
        self.backend = backend
        self.plan = {c.id: i + 1 for i, c in enumerate(cases)}
        self.fact_of = {c.id: c.facts[0] for c in cases}
        self.batch_sizes = []

    def chat(self, conversations, *, max_tokens=256, temperature=0.0, stop=()):
        self.batch_sizes.append(len(conversations))
        texts = self.backend.chat(conversations, max_tokens=max_tokens, temperature=temperature, stop=stop)
        out = []
        for conv, text in zip(conversations, texts):
            case_id = next(cid for cid in self.plan if _case_marker(cid) in conv[0]["content"])
            asked = sum(m["role"] == "assistant" for m in conv)
            if asked < self.plan[case_id]:
                fact = self.fact_of[case_id]
                out.append(f"question: Is it true that {fact[0].lower()}{fact[1:-1]}?\n" + text)
            else:
                out.append("answer: 【answer: A】 " + text)
        return out


def _case_marker(case_id):
    return f"(case {case_id})"


@pytest.fixture(scope="module")
def cases():
    # tag each case's initial information so the test double can tell them apart (the doctor sees only text)
    import dataclasses

    return [
        dataclasses.replace(c, initial_info=f"{c.initial_info} {_case_marker(c.id)}")
        for c in synthetic.make_cases(2, seed=5)
    ]


@pytest.fixture(scope="module")
def result(backend, tokenizer, cases):
    doctor = MarkedDoctor(backend, cases)
    out = rollout(cases, doctor, FactSelectPatient(), tokenizer, samples=2, max_new_tokens=MAX_NEW, temperature=0.7)
    return out, doctor


def test_turn_by_turn_batches_shrink(result, cases):
    out, doctor = result
    # 4 dialogues; case i answers at doctor turn i + 2, so the live batch shrinks 4, 4, 2
    assert doctor.batch_sizes == [4, 4, 2]
    assert [d.n_questions for d in out.dialogues] == [1, 1, 2, 2]
    assert all(d.end == protocol.END_ANSWER and d.letters == ("A",) for d in out.dialogues)
    np.testing.assert_array_equal(out.n_questions, [1, 1, 2, 2])
    np.testing.assert_array_equal(out.group, [0, 0, 1, 1])
    np.testing.assert_array_equal(out.correct, [d.case.answer == ("A",) for d in out.dialogues])


def test_samples_differ_at_temperature(result):
    out, _ = result
    texts = [d.doctor_turns[0] for d in out.dialogues]
    assert texts[0] != texts[1]  # two samples of the same case


def test_revealed_facts_per_turn(result):
    out, _ = result
    for d in out.dialogues:
        assert d.revealed[: d.n_questions] == ((0,),) * d.n_questions  # the question names fact 0
        assert d.revealed[-1] == ()  # the answer turn gets no reply
        assert d.revealed_turn[0] == 1 and all(t == -1 for t in d.revealed_turn[1:])
        assert d.messages[2]["content"] == d.case.facts[0]


def test_arrays_match_the_rendered_dialogues(result, tokenizer):
    out, _ = result
    n, t = out.tokens.shape
    assert n == 4 and t % 64 == 0 and t >= out.lengths.max()
    for row, d in enumerate(out.dialogues):
        r = render_dialogue(tokenizer, d.messages)
        length = out.lengths[row]
        np.testing.assert_array_equal(out.tokens[row, :length], r.ids)
        np.testing.assert_array_equal(out.role_mask[row, :length], r.role_mask)
        np.testing.assert_array_equal(out.turn_ids[row, :length], r.turn_ids)
        assert not out.role_mask[row, length:].any()
        assert out.turn_ids[row, :length].max() == d.n_questions + 1  # doctor turns 1..K
        # the doctor-masked tokens are exactly the doctor's turns (plus their end-of-turn tokens)
        doctor_text = tokenizer.decode(out.tokens[row][out.role_mask[row]], skip_special_tokens=True)
        assert doctor_text.replace(" ", "") == "".join(d.doctor_turns).replace(" ", "")


def test_token_budget(backend, tokenizer, cases):
    doctor = MarkedDoctor(backend, cases)
    out = rollout(cases[1:], doctor, FactSelectPatient(), tokenizer, samples=1, max_new_tokens=MAX_NEW, max_dialogue_tokens=1)
    (d,) = out.dialogues
    assert d.end == protocol.END_LENGTH and len(d.messages) == 1 and not d.correct


class ScriptedDoctor:
    """Replies with fixed texts, in order, whatever the conversation (no model)."""

    def __init__(self, text):
        self.text = text

    def chat(self, conversations, *, max_tokens=256, temperature=0.0, stop=()):
        return [self.text for _ in conversations]


@pytest.mark.parametrize("mode", ["reactive", "full"])
def test_markerless_turn_is_the_answer_when_no_question_is_allowed(mode):
    from promed_jax.consult.rollout import consult

    case = synthetic.make_cases(1, seed=3)[0]
    gold = case.answer[0]
    reply = f"Given the findings, the correct answer is {gold}: {case.options[gold]}."
    (d,) = consult([case], ScriptedDoctor(reply), FactSelectPatient(), mode=mode)
    assert d.letters == (gold,) and d.correct and d.end == protocol.END_ANSWER


def test_markerless_turn_is_no_answer_when_asking_is_allowed():
    from promed_jax.consult.rollout import consult

    case = synthetic.make_cases(1, seed=3)[0]
    gold = case.answer[0]
    (d,) = consult([case], ScriptedDoctor(f"the correct answer is {gold}"), FactSelectPatient(), mode="proactive")
    assert d.letters == () and not d.correct and d.end == protocol.END_NO_MARKER


@pytest.mark.parametrize("mode", ["proactive", "reactive"])
def test_answer_turn_without_a_letter_is_unanswered(mode):
    from promed_jax.consult.rollout import consult

    case = synthetic.make_cases(1, seed=3)[0]
    (d,) = consult([case], ScriptedDoctor("answer: I cannot decide."), FactSelectPatient(), mode=mode)
    assert d.letters == () and not d.correct and not d.answered and d.end == protocol.END_NO_LETTER


def test_patient_sees_the_earlier_questions_and_replies():
    from promed_jax.consult.patients import PatientReply
    from promed_jax.consult.rollout import consult

    class RecordingPatient:
        def __init__(self):
            self.requests = []

        def reply(self, requests):
            self.requests += requests
            return [PatientReply(text=f"reply {len(r.history)}", facts=None) for r in requests]

    case = synthetic.make_cases(1, seed=3)[0]
    patient = RecordingPatient()
    (d,) = consult([case], ScriptedDoctor("question: Any fever?\nand more"), patient, max_questions=3)
    assert [r.history for r in patient.requests] == [
        (),
        (("Any fever?", "reply 0"),),
        (("Any fever?", "reply 0"), ("Any fever?", "reply 1")),
    ]
    assert d.n_questions == 3 and d.end == protocol.END_QUESTION_LIMIT
