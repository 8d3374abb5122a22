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
    [("True", True), ("false.", False), ("The answer is TRUE", True), ("正确", True), ("错误", False), ("maybe", None)],
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
    got = sig.paper_coverage(FakeBackend(judge_reply="I cannot tell"), [(make_case(known=(1,)), [("q?", FACTS[0])])])
    np.testing.assert_array_equal(got[0].coverage, [[0, 1, 0], [0, 0, 0]])
    assert got[0].unparsed == 3


def test_paper_mode_rejects_short_backend_reply():
    class Short(FakeBackend):
        def chat(self, conversations, **kw):
            return super().chat(conversations, **kw)[:-1]

    with pytest.raises(BackendError, match="2 replies for 3"):
        sig.paper_coverage(Short(), [(make_case(), [("a", "b"), ("c", "d"), ("e", "f")])])
