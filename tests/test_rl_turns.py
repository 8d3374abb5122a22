"""The per-turn reward inputs of a rendered rollout (`rl.turns`): kinds, format rewards, SIG per question and
the final state, by hand on dialogues with several questions, a multi-answer Chinese case, a turn with no
marker, a cut-off turn and a runaway; exact and paper coverage; and the token rewards they give on the rendered
tokens, end-of-turn tokens included."""

import numpy as np
import pytest

from promed_jax.consult import protocol
from promed_jax.consult.patients import FactSelectPatient
from promed_jax.consult.rollout import Dialogue, consult, to_rollout
from promed_jax.data import synthetic
from promed_jax.data.cases import Case
from promed_jax.errors import CacheError, DataError
from promed_jax.rl import ANSWER, OTHER, QUESTION, RewardConfig, distributed, paper_coverages, turn_arrays
from promed_jax.shapley.sig import exact_sig
from promed_jax.text.tokenizer import build_tiny_tokenizer

EN = Case(
    id="t:en",
    source="t",
    language="en",
    initial_info="A 30-year-old man comes to the clinic.",
    question="Which of the following is the most likely diagnosis?",
    options={"A": "Migraine", "B": "Meningitis", "C": "Pneumonia", "D": "Measles"},
    answer=("B",),
    facts=("He has a stiff neck.", "He finds light painful.", "He has a fever.", "He has a headache."),
)
ZH = Case(
    id="t:zh",
    source="t",
    language="zh",
    initial_info="患者男，30岁。",
    question="可能的诊断是？",
    options={"A": "脑膜炎", "B": "偏头痛", "C": "发热"},
    answer=("A", "C"),
    facts=("患者颈部僵硬。", "患者发热三天。", "患者畏光。"),
    known=(0,),
)
WEIGHTS = {"t:en": np.array([0.1, 0.2, 0.3, 0.4]), "t:zh": np.array([0.5, 0.25, 0.25])}
INSTR = {"role": "user", "content": "instruction"}
UNKNOWN = "Sorry, I don't know the answer to that question."


def doctor(text):
    return {"role": "assistant", "content": text}


def patient(text):
    return {"role": "user", "content": text}


def dialogue(case, messages, revealed, end, letters=(), sample=0):
    turn = [0 if i in case.known else -1 for i in range(case.n_facts)]
    for k, facts in enumerate(revealed, start=1):
        for i in facts or ():
            turn[i] = k if turn[i] == -1 else turn[i]
    return Dialogue(
        case=case,
        sample=sample,
        messages=(INSTR, *messages),
        revealed=tuple(revealed),
        revealed_turn=tuple(turn),
        n_questions=sum(m["role"] == "user" for m in messages),
        letters=tuple(letters),
        correct=protocol.is_correct(letters, case.answer),
        end=end,
    )


ASKS = dialogue(  # three questions (the second only contains its marker and reveals nothing), then right
    EN,
    [
        doctor("question: Does he have a fever?"),
        patient(EN.facts[2]),
        doctor("Let me ask. question: Any cough?"),
        patient(UNKNOWN),
        doctor("question: Stiff neck or headache?"),
        patient(EN.facts[0] + " " + EN.facts[3]),
        doctor("answer: neck and fever. 【answer: B】"),
    ],
    [(2,), (), (0, 3), ()],
    protocol.END_ANSWER,
    ("B",),
)
MULTI = dialogue(  # CMB-style: one fact known at the start, a multi-answer item answered right
    ZH,
    [doctor("question: 有没有发热？"), patient(ZH.facts[1]), doctor("答案：颈强直伴发热，【答案：AC】")],
    [(1,), ()],
    protocol.END_ANSWER,
    ("A", "C"),
)
NO_MARKER = dialogue(EN, [doctor("I think it is pneumonia.")], [()], protocol.END_NO_MARKER, sample=1)
CUT = dialogue(  # the first question was cut off at the token limit (but went to the patient), then wrong
    EN,
    [doctor("question: Does he have a fever and"), patient(EN.facts[2]), doctor("answer: 【answer: A】")],
    [(2,), ()],
    protocol.END_ANSWER,
    ("A",),
    sample=2,
)
RUNAWAY = dialogue(EN, [doctor("question: " + "is it is it " * 20)], [()], protocol.END_RUNAWAY, sample=3)
DIALOGUES = [ASKS, MULTI, NO_MARKER, CUT, RUNAWAY]
TRUNCATED = [[False] * 4, [False] * 2, [False], [True, False], [False]]


@pytest.fixture(scope="module")
def rollout():
    return to_rollout(DIALOGUES, build_tiny_tokenizer(), pad_to_multiple=16)


def test_turn_arrays_by_hand(rollout):
    turns = turn_arrays(rollout, WEIGHTS, truncated=TRUNCATED)
    q, a, o = QUESTION, ANSWER, OTHER
    np.testing.assert_array_equal(turns.kind, [[q, q, q, a], [q, a, o, o], [o, o, o, o], [o, a, o, o], [o, o, o, o]])
    np.testing.assert_allclose(
        turns.format_reward, [[1, 0.5, 1, 1], [1, 1, 0, 0], [0, 0, 0, 0], [1, 1, 0, 0], [1, 0, 0, 0]]
    )
    # SIG: fever 0.3; nothing; neck 0.1 + headache 0.4. The cut-off question's SIG is dropped (format only).
    np.testing.assert_allclose(turns.sig, [[0.3, 0, 0.5, 0], [0.25, 0, 0, 0], [0] * 4, [0] * 4, [0] * 4], atol=1e-7)
    np.testing.assert_array_equal(turns.n_turns, [4, 2, 1, 2, 1])
    # s_T: 0.3 + 0.5; the known fact 0.5 + fever 0.25; nothing; fever 0.3 (its coverage stays); nothing
    np.testing.assert_allclose(turns.final_state, [0.8, 0.75, 0, 0.3, 0], atol=1e-7)


def test_token_rewards_on_the_rendered_tokens(rollout):
    turns = turn_arrays(rollout, WEIGHTS, truncated=TRUNCATED)
    token, _ = distributed(turns, rollout.turn_ids, rollout.role_mask, rollout.correct, config=RewardConfig())
    token = np.asarray(token)
    per_turn = {
        0: [2 * 0.3 + 0.3 + 1, 0.5, 2 * 0.5 + 0.5 + 1, 3 + 1],
        1: [2 * 0.25 + 0.25 + 1, 3 + 1],
        2: [0.0],
        3: [1.0, 1.0],
        4: [1.0],
    }
    im_end = 2  # the tiny tokenizer's end-of-turn token
    for row, values in per_turn.items():
        mask = rollout.role_mask[row]
        turn_of = rollout.turn_ids[row]
        np.testing.assert_allclose(token[row][mask], np.asarray(values)[turn_of[mask] - 1], rtol=1e-6)
        assert not token[row][~mask].any()
        # every doctor turn's end-of-turn token is in the mask and carries its turn's reward
        ends = np.flatnonzero(mask & (rollout.tokens[row] == im_end))
        assert [int(turn_of[i]) for i in ends] == list(range(1, len(values) + 1))


def test_paper_coverage_replaces_revealed_facts(rollout):
    class EchoJudge:
        """Understanding = its own prompt (the dialogue so far); the judge says True when the fact appears
        twice in its prompt (once in the understanding text, once as the input)."""

        def chat(self, conversations, *, max_tokens=256, temperature=0.0, stop=()):
            out = []
            for conv in conversations:
                text = conv[-1]["content"]
                facts = [f for d in DIALOGUES for f in d.case.facts if text.count(f) >= 1]
                judged = any(text.count(f) >= 2 for f in facts)
                out.append(("True" if judged else "False") if "True" in text and "False" in text else text)
            return out

    coverages = paper_coverages(EchoJudge(), rollout.dialogues)
    assert [c.shape for c in coverages] == [(4, 4), (2, 3), (1, 4), (2, 4), (1, 4)]
    exact = turn_arrays(rollout, WEIGHTS, truncated=TRUNCATED)
    paper = turn_arrays(rollout, WEIGHTS, truncated=TRUNCATED, coverages=coverages)
    np.testing.assert_allclose(paper.sig, exact.sig, atol=1e-7)
    np.testing.assert_allclose(paper.final_state, exact.final_state, atol=1e-7)
    with pytest.raises(ValueError, match="coverage of case t:en has shape"):
        turn_arrays(rollout, WEIGHTS, truncated=TRUNCATED, coverages=[c[:1] for c in coverages])


def test_exact_mode_needs_a_patient_that_reports_facts():
    llm = dialogue(
        EN,
        [doctor("question: fever?"), patient("yes"), doctor("answer: 【answer: B】")],
        [None, ()],
        protocol.END_ANSWER,
        ("B",),
    )
    rollout = to_rollout([llm], build_tiny_tokenizer(), pad_to_multiple=16)
    with pytest.raises(DataError, match="case t:en: the patient did not say which facts"):
        turn_arrays(rollout, WEIGHTS)
    with pytest.raises(CacheError, match="no fact weights for case t:en"):
        turn_arrays(rollout, {})


def test_a_consultation_gives_the_sig_of_its_revealed_facts():
    """Through `consult` and the fact_select patient: the per-turn SIG is `exact_sig` of the revealed facts."""
    case = synthetic.make_cases(1, seed=3)[0]
    asks = [synthetic.FINDINGS[synthetic.FACT_TO_FINDING[f]].question for f in case.facts[:2]]

    class Script:
        def chat(self, conversations, *, max_tokens=256, temperature=0.0, stop=()):
            turns = [
                "question: " + asks[0],
                "question: Do you smoke?",
                "question: " + asks[1],
                f"answer: 【answer: {case.answer[0]}】",
            ]
            return [turns[sum(m["role"] == "assistant" for m in c)] for c in conversations]

    (d,) = consult([case], Script(), FactSelectPatient())
    w = np.array([0.4, 0.3, 0.2, 0.1])
    turns = turn_arrays(to_rollout([d], build_tiny_tokenizer()), {case.id: w})
    expected = exact_sig(w, case.known, d.revealed).per_turn
    assert d.correct and d.n_questions == 3 and expected[0] > 0 and expected[1] == 0
    np.testing.assert_allclose(turns.sig[0], expected, atol=1e-7)
    np.testing.assert_array_equal(turns.kind[0], [QUESTION, QUESTION, QUESTION, ANSWER])
