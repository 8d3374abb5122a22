"""The scripted topic doctor of real cases: topic rules, its own words, determinism, the export schema, answers."""

import pytest

from promed_jax.consult.patients import FactSelectPatient
from promed_jax.consult.protocol import extract_answer
from promed_jax.data.cases import Case, load_cases
from promed_jax.training import data as data_lib
from promed_jax.training import topic_doctor as td

FACTS = {
    "Her temperature is 97.8°F (37.0°C).": "vitals/temperature",
    "The patient's blood pressure is 80/55 mm Hg.": "vitals/blood_pressure",
    "His pulse is 126/min.": "vitals/pulse",
    "The patient’s respiratory rate is 14/min.": "vitals/respiratory_rate",
    "The patient's oxygen saturation is 99% on room air.": "vitals/oxygen",
    "His temperature is 37.1°C (98.8°F), pulse is 78/min, and blood pressure is 126/72 mm Hg.": "vitals/all",
    "His current medications include enalapril and donepezil.": "history/medications",
    "The allergy caused anaphylaxis after it was given.": "history/allergies",
    "Her mother has breast cancer.": "history/family",
    "She drinks alcohol socially.": "history/alcohol",
    "He has smoked one pack of cigarettes daily for 20 years.": "history/smoking",
    "The patient has a history of hyperlipidemia.": "history/past_medical",
    "She underwent an appendectomy at age 12.": "history/surgery",
    "She is sexually active with one partner.": "history/sexual",
    "He recently returned from a trip to Mexico.": "history/travel",
    "He works as a farmer.": "history/occupation",
    "Her last menstrual period was 7 weeks ago.": "history/menstrual",
    "She is at 32 weeks' gestation.": "history/pregnancy",
    "He has lost 10 pounds without dieting or changing his appetite.": "history/diet",
    "The patient denies bloody stool.": "symptoms/bowel",
    "He has a productive cough.": "symptoms/breathing",
    "She has had pain in her lower back for 3 days.": "symptoms/pain",
    "A 5/6 systolic ejection murmur is heard at the left upper sternal border.": "exam/heart",
    "Examination shows increased fremitus over the right middle lung field.": "exam/lungs",
    "The liver is tender on palpation.": "exam/abdomen",
    "Physical examination shows dry mucous membranes.": "exam/head_neck",
    "Hemoglobin is 8 g/dL.": "labs/blood_count",
    "Serum TSH level is 0.03 μU/mL.": "labs/endocrine",
    "A chest x-ray shows a right lower lobe infiltrate.": "imaging/scan",
    "Ribosomes are used to synthesize proteins.": None,
}


def _case(facts, *, answer=("B",), language="en", known=(), case_id="t:1") -> Case:
    return Case(
        id=case_id,
        source="t",
        language=language,
        initial_info="A 40-year-old woman comes to the clinic with fever.",
        question="Which of the following is the most likely diagnosis?",
        options={"A": "Influenza", "B": "Pneumonia", "C": "Asthma", "D": "Tuberculosis"},
        answer=tuple(answer),
        facts=tuple(facts),
        known=tuple(known),
    )


@pytest.mark.parametrize(("fact", "topic"), FACTS.items())
def test_facts_are_classified_by_topic(fact, topic):
    found = td.classify(fact)
    assert (found.name if found else None) == topic


def test_shares_run_counts_consecutive_words():
    assert td.shares_run("Does she have a family history of cancer?", "She has a family history of breast cancer.")
    assert not td.shares_run("Has anyone in your family had cancer?", "She has a family history of breast cancer.")
    assert td.shares_run("你的体温是多少", "患者体温是多少度", n=4)  # a CJK character is a word


def test_questions_never_hold_four_words_of_the_fact_on_medqa_dev(data_dir):
    cases = load_cases(data_dir / "medqa_dev_convo.jsonl", on_error="skip")
    assert len(cases) == 1269
    for case in cases:
        for fact in case.facts:
            _, questions = td.candidate_questions(fact)
            assert not [q for q in questions if td.shares_run(q, fact)], fact
        for q in td.plan_case(case, seed=0, max_questions=10).questions:
            assert not td.shares_run(q.text, case.facts[q.fact]), (q.text, case.facts[q.fact])


def test_unclassified_facts_get_a_generic_question():
    plan = td.plan_case(_case(["Ribosomes are used to synthesize proteins."]), seed=0, max_questions=10)
    assert [q.topic for q in plan.questions] in ([], [td.FALLBACK])
    seeds = [
        td.plan_case(_case(["Ribosomes are used to synthesize proteins."]), seed=s, max_questions=1) for s in range(20)
    ]
    asked = [p.questions[0] for p in seeds if p.questions]
    assert asked and all(q.fallback and q.text in td.FALLBACKS_EN for q in asked)
    assert all(p.fallbacks == len(p.questions) for p in seeds)


def test_plans_are_a_function_of_seed_and_case_id():
    facts = list(FACTS)[:20]
    a = td.plan_case(_case(facts), seed=3, max_questions=6)
    assert a == td.plan_case(_case(facts), seed=3, max_questions=6)
    plans = {td.plan_case(_case(facts, case_id=f"t:{i}"), seed=3, max_questions=6) for i in range(10)}
    assert len(plans) > 1
    lengths = {len(td.plan_case(_case(facts), seed=s, max_questions=6).questions) for s in range(40)}
    assert lengths == set(range(7))  # 0..max_questions


def test_known_facts_are_never_asked_and_few_facts_are_all_asked():
    facts = list(FACTS)[:6]
    for seed in range(30):
        plan = td.plan_case(_case(facts, known=(0, 1, 2)), seed=seed, max_questions=10)
        assert {q.fact for q in plan.questions} <= {3, 4, 5}
        assert [q.fact for q in plan.questions] == sorted(q.fact for q in plan.questions)
        assert len({q.text for q in plan.questions}) == len(plan.questions)  # no question twice


@pytest.mark.parametrize(
    ("answer", "language"), [(("B",), "en"), (("A", "C"), "en"), (("D",), "zh"), (("B", "D"), "zh")]
)
def test_the_answer_turn_reads_as_the_gold_letters(answer, language):
    case = _case(list(FACTS)[:3], answer=answer, language=language)
    for heard in ([], ["your temperature"], ["your temperature", "your pulse", "your medications"]):
        turn = td.answer_turn(case, heard)
        assert turn.startswith("answer: ")
        assert extract_answer(turn, case.options, multi_answer=len(answer) > 1) == answer


def test_dialogues_follow_the_export_schema(tmp_path):
    cases = [_case(list(FACTS), case_id=f"t:{i}", answer=("ABCD"[i % 4],)) for i in range(12)]
    path = tmp_path / "topic.jsonl"
    records = td.write_dialogues(cases, FactSelectPatient(), path, seed=0, max_questions=6, protocol_max_questions=10)
    read = data_lib.read_dialogues(path)
    assert read == records and len(read) == 12
    for case, r in zip(cases, read, strict=True):
        assert r["case_id"] == case.id and r["fingerprint"] == case.fingerprint
        assert r["policy"] == {"kind": "topic", "seed": 0, "max_questions": 6}
        assert r["correct"] and r["end"] == "answer" and r["letters"] == list(case.answer)
        doctor = [m["content"] for m in r["messages"][1::2]]
        assert all(t.startswith("question: ") for t in doctor[:-1]) and doctor[-1].startswith("answer: ")
        assert len(r["topics"]) == len(r["targets"]) == len(r["revealed"]) == len(doctor) - 1
        for question, fact in zip(doctor, r["targets"], strict=False):
            assert not td.shares_run(question, case.facts[fact])
    assert any(r["targets"] for r in read)


def test_topic_source_needs_case_files():
    from configs import sft as sft_config
    from promed_jax import config_check
    from promed_jax.errors import ConfigError

    config = sft_config.get_config("smollm")
    assert config.sft.source == "topic" and config.data.kind == "files"
    config_check.check_sft_source(config.sft, config.data)
    config = sft_config.get_config()
    config.sft.source = "topic"
    with pytest.raises(ConfigError, match=r"^config sft.source='topic' needs data.kind='files'"):
        config_check.check_sft_source(config.sft, config.data)


def test_a_template_too_close_to_its_fact_is_not_used():
    fact = "The nurse asks what is your temperature and finds it at 39°C."
    name, questions = td.candidate_questions(fact)
    assert name == "vitals/temperature" and questions
    assert "What is your temperature?" not in questions
    for seed in range(20):
        for q in td.plan_case(_case([fact]), seed=seed, max_questions=1).questions:
            assert not td.shares_run(q.text, fact)


def test_the_warm_start_consults_the_first_warm_start_cases(data_dir, tmp_path):
    """`warm_start.cases` picks the topic doctor's consultations: the first cases of the split, whatever
    data.limit (0 = data.limit's)."""
    from configs import rl as rl_config
    from promed_jax.data.sources import cases_from_config
    from promed_jax.training.run import dialogue_records

    config = rl_config.get_config("smollm")
    config.data.paths = (str(data_dir / "medqa_dev_convo.jsonl"),)
    config.data.limit = 8
    config.patient.kind = "fact_select"
    config.warm_start.cases = 3
    records = dialogue_records(config, tmp_path / "three", "warm_start")
    first = [c.id for c in cases_from_config(config.data, stage="warm_start")]
    assert len(first) == 8 and [r["case_id"] for r in records] == first[:3]
    config.warm_start.cases = 0
    assert len(dialogue_records(config, tmp_path / "all", "warm_start")) == 8
    # more than data.limit: the warm start's own cap replaces it (the later stages keep data.limit)
    config.data.limit = 2
    config.warm_start.cases = 5
    records = dialogue_records(config, tmp_path / "five", "warm_start")
    assert [r["case_id"] for r in records] == first[:5]
