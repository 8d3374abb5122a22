"""SIG: coverage (exact tracking and the paper's understanding + judge), s_t and SIG_t."""

import re

import numpy as np
import pytest

from promed_jax.backends.base import BackendError
from promed_jax.data.cases import Case
from promed_jax.shapley import sig

FACTS = ("The patient is 54 years old.", "She has had a cough for 3 weeks.", "She smokes 20 cigarettes a day.")


def make_case(language="en", known=()) -> Case:
    return Case(
        id="test:1",
        source="test",
        language=language,
        initial_info="A woman comes with a cough.",
        question="What is the most likely diagnosis?",
        options={"A": "Asthma", "B": "Lung cancer"},
        answer=("B",),
        facts=FACTS,
        known=known,
    )


class FakeBackend:
    """Understanding = the initial information and the patient's replies copied verbatim; the judge says True
    when the fact's text is inside the context. Records every batch it is given."""

    def __init__(self, judge_reply=None):
        self.calls = []
        self.judge_reply = judge_reply

    def chat(self, conversations, *, max_tokens=256, temperature=0.0, stop=()):
        self.calls.append([c[-1]["content"] for c in conversations])
        return [self._reply(c[-1]["content"]) for c in conversations]

    def _reply(self, prompt):
        if prompt.startswith("Context:"):
            context, fact = re.match(r"Context: (.*)\nInput: (.*)\nTrue or False\?", prompt, re.DOTALL).groups()
            if self.judge_reply is not None:
                return self.judge_reply
            return "True." if fact in context else "false, it is not mentioned"
        known = re.search(r"(?:Known at the start|一开始已知)[:：] ?(.*?)\n", prompt).group(1)
        replies = re.findall(r"(?:Patient|患者)[:：](.*)", prompt)
        return "\n".join([known, *[r.strip() for r in replies]])


def test_exact_coverage_accumulates():
    coverage = sig.exact_coverage(3, known=[0], revealed=[[2], [], [1, 2]])
    np.testing.assert_array_equal(coverage, [[1, 0, 0], [1, 0, 1], [1, 0, 1], [1, 1, 1]])
    with pytest.raises(ValueError, match=r"\[3\] out of range for 3 facts \(turn 2\)"):
        sig.exact_coverage(3, known=[], revealed=[[0], [3]])


def test_state_values_and_sig_by_hand():
    w = np.array([0.5, 0.3, 0.2])
    result = sig.exact_sig(w, known=[0], revealed=[[2], [], [1, 2]])
    np.testing.assert_allclose(result.state, [0.5, 0.7, 0.7, 1.0])
    np.testing.assert_allclose(result.per_turn, [0.2, 0.0, 0.3])
    assert result.total == pytest.approx(0.5) == pytest.approx(result.per_turn.sum())
    # No question asked: s_0 only, SIG empty.
    empty = sig.exact_sig(w, known=[1], revealed=[])
    np.testing.assert_allclose(empty.state, [0.3])
    assert empty.per_turn.shape == (0,) and empty.total == 0.0
    with pytest.raises(ValueError, match=r"bool\[T \+ 1, 3\]"):
        sig.sig_from_coverage(w, np.zeros((2, 4), bool))


@pytest.mark.parametrize(
    "reply, verdict",
    [
        ("True", True),
        ("true.", True),
        ("The answer is TRUE", True),
        ("**True**", True),
        ("True, the context says she smokes.", True),
        ("False", False),
        ("false.", False),
        ("False. The context does not mention smoking.", False),
        ("untrue", False),
        # negations right before the verdict word flip it
        ("Not true.", False),
        ("It is not true.", False),
        ("That isn't true", False),
        ("Not entirely true.", False),
        ("not false", True),
        ("It is not stated, so False.", False),  # the negation is in another clause
        ("False, not True.", False),  # the first verdict decides
        # the prompt's question and rule echoed back are not verdicts
        ("True or False? False", False),
        ("True or False? True", True),
        ("True/False: False", False),
        ("Answer True if the context states the input, otherwise False. False", False),
        ("如果上下文明确包含该输入信息，回答 True，否则回答 False。False", False),
        ("True or False?", None),
        # Chinese
        ("正确", True),
        ("对", True),
        ("这是正确的。", True),
        ("错误", False),
        ("错", False),
        ("不正确", False),
        ("不对", False),
        ("并不正确", False),
        ("不是正确的", False),
        ("对于该患者，错误", False),  # 对于 (regarding) is no verdict
        # no verdict: a defined None, counted as not covered and as unparsed
        ("", None),
        ("   ", None),
        ("maybe", None),
        ("I cannot tell", None),
        ("Falsehood", None),
        ("Yes", None),
    ],
)
def test_parse_judgement(reply, verdict):
    assert sig.parse_judgement(reply) is verdict


def test_paper_mode_equals_exact_mode_with_verbatim_patient():
    case = make_case(known=(0,))
    turns = [("How old are you?", FACTS[0]), ("Do you smoke?", FACTS[2]), ("Anything else?", "I don't know.")]
    other = make_case(language="zh")
    other_turns = [("咳嗽多久了？", FACTS[1])]
    backend = FakeBackend()
    got = sig.paper_coverage(backend, [(case, turns), (other, other_turns)])
    # Two batched calls: all understanding texts, then all judgements.
    assert [len(c) for c in backend.calls] == [3 + 1, 3 * 3 + 1 * 3]
    assert "Doctor: Do you smoke?" in backend.calls[0][1] and "医生：咳嗽多久了？" in backend.calls[0][3]
    np.testing.assert_array_equal(got[0].coverage, sig.exact_coverage(3, [0], [[0], [2], []]))
    np.testing.assert_array_equal(got[1].coverage, sig.exact_coverage(3, [], [[1]]))
    assert got[0].unparsed == 0 and len(got[0].understanding) == 3
    w = np.array([0.2, 0.5, 0.3])
    assert sig.sig_from_coverage(w, got[0].coverage).total == pytest.approx(0.3)


def test_paper_mode_counts_unparsed_as_not_covered():
    got = sig.paper_coverage(FakeBackend(judge_reply="I cannot tell"), [(make_case(known=(2,)), [("q?", FACTS[0])])])
    # the fact known at the start stays covered (coverage only grows); the others are not covered
    np.testing.assert_array_equal(got[0].coverage, [[0, 0, 1], [0, 0, 1]])
    assert got[0].unparsed == 3 and got[0].dropped == 1


class ForgetfulBackend(FakeBackend):
    """An understanding model that keeps only the patient's last reply: a fact revealed at turn 1 drops out of
    U_2, and the judge (True when the fact is in the context) says False for it there."""

    def _reply(self, prompt):
        if prompt.startswith("Context:"):
            return super()._reply(prompt)
        return re.findall(r"(?:Patient|患者)[:：](.*)", prompt)[-1].strip()


def test_paper_mode_coverage_only_grows():
    case = make_case()
    turns = [("How old are you?", FACTS[0]), ("Do you smoke?", FACTS[2])]
    (got,) = sig.paper_coverage(ForgetfulBackend(), [(case, turns)])
    assert got.understanding == (FACTS[0], FACTS[2])  # U_2 has lost fact 0
    np.testing.assert_array_equal(got.coverage, [[0, 0, 0], [1, 0, 0], [1, 0, 1]])
    assert got.dropped == 1 and got.unparsed == 0
    result = sig.sig_from_coverage(np.array([0.6, 0.3, 0.1]), got.coverage)
    np.testing.assert_allclose(result.per_turn, [0.6, 0.1])
    assert (result.per_turn >= 0).all()


def test_sig_refuses_coverage_that_shrinks():
    with pytest.raises(ValueError, match=r"only grow .*fact 0 is covered at turn 1, not at 2"):
        sig.sig_from_coverage(np.array([0.6, 0.4]), np.array([[0, 0], [1, 0], [0, 1]], bool))


def test_paper_mode_rejects_short_backend_reply():
    class Short(FakeBackend):
        def chat(self, conversations, **kw):
            return super().chat(conversations, **kw)[:-1]

    with pytest.raises(BackendError, match="2 replies for 3"):
        sig.paper_coverage(Short(), [(make_case(), [("a", "b"), ("c", "d"), ("e", "f")])])
