"""The semantic patient: its lexical parts by hand, its floors on the held-out natural questions, the synthetic
clinic exactly, fact vectors cached, the fallback where the encoder is absent, and results kept apart."""

import logging
import math
import pathlib

import ml_collections
import numpy as np
import pytest

from configs import base
from promed_jax import assets
from promed_jax.consult import patients as PT
from promed_jax.consult import question_sets as QS
from promed_jax.consult import retrieval as R
from promed_jax.data import synthetic
from promed_jax.data.cases import load_cases
from promed_jax.text import prompts
from tests.conftest import need

HERE = pathlib.Path(__file__).parent / "data"
W = R.HybridWeights(
    contrast_weight=0.0, hub_weight=0.0, lexical_weight=1.0, threshold=0.5, margin=0.1, max_facts=2, zh_threshold=0.5
)


def test_concepts_fold_clinical_synonyms():
    assert R.concepts("What's her heart rate?") == R.concepts("pulse") == ("pulse",)
    assert R.concepts("Does she have a fever?") == R.concepts("Her temperature") == ("temperature",)
    assert R.concepts("Are you itchy?") == R.concepts("pruritic") == R.concepts("itching") == ("itch",)
    assert R.concepts("medicines") == R.concepts("medications")
    assert R.concepts("examination") == R.concepts("exam")
    assert R.concepts("Physical exam demonstrates hepatomegaly.")[-2:] == ("liver", "enlarge")
    assert R.concepts("Is it a long problem, getting worse?") == ()  # generic words are no evidence


def test_bm25_by_hand():
    facts = [("pulse", "fast"), ("temperature",), ("pulse",)]
    # 'pulse' is in 2 of 3 facts: idf = ln(1 + 1.5 / 2.5); 'cough' is in none and adds nothing.
    idf = math.log(1 + 1.5 / 2.5)
    avg = 4 / 3
    k1, b = 1.2, 0.75
    expect0 = idf * (k1 + 1) / (1 + k1 * (1 - b + b * 2 / avg))
    expect2 = idf * (k1 + 1) / (1 + k1 * (1 - b + b * 1 / avg))
    np.testing.assert_allclose(R.bm25(("pulse", "cough"), facts), [expect0, 0.0, expect2])
    assert R.bm25(("cough",), facts).tolist() == [0.0, 0.0, 0.0]


def test_select_threshold_margin_cap():
    assert R.select(np.array([0.2, 0.9, 0.85, 0.84]), W) == (1, 2)  # capped at max_facts
    assert R.select(np.array([0.2, 0.9, 0.7]), W) == (1,)  # 0.7 is not within the margin
    assert R.select(np.array([0.49, 0.3]), W) == ()  # nothing reaches the threshold
    assert R.select(np.array([0.6, 0.6]), W) == (0, 1)  # ties in fact order
    assert R.select(np.array([0.45]), W, threshold=0.4) == (0,)


def test_encoder_text_drops_framing_only():
    assert R.encoder_text("The patient's pulse is 126/min.") == "pulse 126/min."
    assert R.encoder_text("Has he been?") == "?"
    assert R.encoder_text("he has") == "he has"


@pytest.fixture(scope="module")
def patient():
    need(assets.minilm_available(), f"all-MiniLM-L6-v2 ({assets.MINILM_INSTALL})")
    p = PT.make_patient(base.get_config().patient)
    assert isinstance(p, R.SemanticPatient) and p.name == "semantic"
    return p


@pytest.fixture(scope="module")
def test_set_scores(patient, data_dir):
    cases = {c.id: c for c in load_cases(data_dir / "medqa_dev_convo.jsonl", on_error="skip")}
    questions = QS.load_questions(HERE / "natural_questions_test.jsonl")
    replies = QS.ask_all(patient, questions, cases)
    for q, r in zip(questions, replies):
        assert r.text == (" ".join(cases[q.case].facts[i] for i in r.facts) or prompts.PATIENT_CANNOT_ANSWER["en"])
    s = QS.score(questions, replies)
    assert (s.n_targeted, s.n_unanswerable) == (183, 61)
    return s


def test_held_out_test_set_as_measured(test_set_scores):
    """What the semantic patient reaches on questions no weight was tuned on (0.814 / 0.809 / 0.119 / 0.836
    when written; fact_select: 0.131 / 0.115 / 0.033 / 1.0): a regression guard, below the issue's floors."""
    s = test_set_scores
    assert s.returned >= 0.80, s
    assert s.first >= 0.78, s
    assert s.other <= 0.13, s
    assert s.cannot_answer >= 0.82, s


@pytest.mark.xfail(strict=True, reason="returned 0.814 < 0.85 and cannot-answer 0.836 < 0.90 on the test set")
def test_issue_floors_on_held_out_test_set(test_set_scores):
    """The issue's floors. Not met yet: when they are, this XPASSes, which fails; drop the marker then."""
    s = test_set_scores
    assert s.returned >= 0.85 and s.first >= 0.75 and s.other <= 0.15 and s.cannot_answer >= 0.90, s


def test_synthetic_clinic_exact(patient):
    """A question about a finding, in the clinic's own words or the doctor's, returns exactly that finding's
    fact. About a finding the case lacks, mostly the cannot-answer reply; the rest (133 of 744 when written)
    name a finding close to it ("chest pain?" -> "The patient has flank pain.")."""
    absent = wrong = 0
    names = list(synthetic.FINDINGS)
    for case in synthetic.make_cases(8, seed=3):
        questions = [f"Is it true that {f.fact[0].lower()}{f.fact[1:-1]}?" for f in synthetic.FINDINGS.values()]
        questions += [f.question for f in synthetic.FINDINGS.values()]
        replies = patient.reply([PT.PatientRequest(case=case, question=q) for q in questions])
        for name, reply in zip(names + names, replies):
            fact = synthetic.FINDINGS[name].fact
            if fact in case.facts:
                assert reply.facts == (case.facts.index(fact),) and reply.text == fact, (case.id, name, reply)
            else:
                absent += 1
                wrong += reply != PT.PatientReply(prompts.PATIENT_CANNOT_ANSWER["en"], ())
    assert wrong / absent <= 0.2, (wrong, absent)


class _CountingEncoder:
    def __init__(self, inner):
        self.inner, self.texts = inner, []

    def encode(self, texts):
        self.texts += list(texts)
        return self.inner.encode(texts)


def test_fact_vectors_are_computed_once_per_case(patient):
    enc = _CountingEncoder(patient.encoder)
    p = R.SemanticPatient(patient.weights, encoder=enc)
    cases = synthetic.make_cases(3, seed=1)
    probes = len(enc.texts)
    requests = [PT.PatientRequest(case=c, question="Any fever?") for c in cases]
    first = p.reply(requests)
    assert len(enc.texts) - probes == sum(c.n_facts for c in cases) + 3
    assert p.reply(requests) == first
    assert len(enc.texts) - probes == sum(c.n_facts for c in cases) + 6  # only the questions again


def test_chinese_case_lexical(patient, data_dir):
    (case,) = [
        c for c in load_cases(data_dir / "cmb_atomic_patient_train.json", on_error="skip") if c.id.endswith(":18298")
    ]
    (diarrhea, off) = patient.reply(
        [PT.PatientRequest(case, "有没有拉肚子？"), PT.PatientRequest(case, "你喜欢什么颜色的汽车？")]
    )
    assert diarrhea.facts[0] == case.facts.index("患者腹泻")
    assert off == PT.PatientReply(prompts.PATIENT_CANNOT_ANSWER["zh"], ())


def test_falls_back_to_fact_select_without_the_encoder(monkeypatch, caplog):
    monkeypatch.setattr(assets, "minilm_available", lambda: False)
    cfg = ml_collections.ConfigDict(base.get_config().patient.to_dict())
    with caplog.at_level(logging.WARNING):
        p = PT.make_patient(cfg)
    assert isinstance(p, PT.FactSelectPatient) and p.name == "fact_select"
    assert "using the lexical 'fact_select' patient instead" in caplog.text


def test_default_patient_is_semantic():
    assert base.get_config().patient.kind == "semantic"


def test_evaluation_keeps_patients_apart(tmp_path):
    """Resuming an evaluation written by one patient with another is refused (the record's `patient`)."""
    from promed_jax.errors import CacheError
    from promed_jax.evaluation import evaluate

    path = tmp_path / "proactive.jsonl"
    done = [{"id": "c1", "model": "m", "patient": "fact_select", "prompt_version": evaluate._prompt_version()}]
    evaluate._check_compatible(path, done, model="m", patient="fact_select")
    with pytest.raises(CacheError, match="'patient': 'fact_select'.*'patient': 'semantic'"):
        evaluate._check_compatible(path, done, model="m", patient="semantic")


def test_family_questions_reach_only_facts_about_relatives(patient):
    import dataclasses

    case = dataclasses.replace(
        synthetic.make_cases(1)[0],
        facts=("He was diagnosed with colorectal cancer.", "His father had a stroke at 60.", "He has a cough."),
    )
    ask = lambda q: patient.reply([PT.PatientRequest(case=case, question=q)])[0].facts
    assert ask("Any family history of colon cancer?") in ((), (1,))
    assert ask("Have you been told you have bowel cancer?")[0] == 0
    assert ask("Has anyone in your family had a stroke?") == (1,)
