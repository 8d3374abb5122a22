"""Loading the real files in ../shared/data (skipped without them) and the loaders' conventions."""

import json
import re

import pytest

from configs import base
from promed_jax.data import (
    Case,
    CaseError,
    DataConfigError,
    cases_from_config,
    detect_format,
    from_dataset,
    load_cases,
    load_from_config,
    read_cases,
    resolve_path,
    to_dataset,
)
from promed_jax.data.sources import split_of

MEDQA = "medqa_dev_convo.jsonl"
CMB = "cmb_atomic_patient_train.json"
PROMED_MEDQA = "promed_examples/medqa_atomic_data_example.jsonl"
PROMED_CMB = "promed_examples/cmb_atomic_patient_example.json"
EMPTY_MEDQA_IDS = (224, 298, 779)


@pytest.fixture(scope="module")
def medqa(data_dir):
    return read_cases(data_dir / MEDQA, on_error="skip")


@pytest.fixture(scope="module")
def cmb(data_dir):
    return read_cases(data_dir / CMB, on_error="raise")


# --- the real files ----------------------------------------------------------------------------------------


def test_medqa_loads_1269_cases_and_reports_the_three_empty_ones(medqa):
    assert medqa.fmt == "mediq"
    assert len(medqa.cases) == 1269
    assert medqa.errors == tuple(
        f"{MEDQA} line {i + 1} (id {i}): field 'atomic_facts': no facts" for i in EMPTY_MEDQA_IDS
    )
    ids = {case.id for case in medqa.cases}
    assert len(ids) == 1269 and not ids & {f"medqa_dev_convo:{i}" for i in EMPTY_MEDQA_IDS}
    assert all(len(case.options) == 4 and case.language == "en" and case.known == () for case in medqa.cases)


def test_medqa_stops_at_the_first_empty_case_when_asked(data_dir):
    with pytest.raises(CaseError, match=r"^medqa_dev_convo\.jsonl line 225 \(id 224\): field 'atomic_facts': no facts$"):
        read_cases(data_dir / MEDQA, on_error="raise")


def test_medqa_first_case_follows_the_mediq_convention(medqa, data_dir):
    raw = json.loads((data_dir / MEDQA).read_text(encoding="utf-8").split("\n", 1)[0])
    case = medqa.cases[0]
    assert case.id == "medqa_dev_convo:0" and case.source == "medqa_dev_convo"
    assert case.initial_info == raw["context"][0]
    assert case.question == raw["question"]
    assert case.answer == (raw["answer_idx"],) and case.gold_text == raw["answer"]
    assert case.facts[0] == raw["atomic_facts"][0].removeprefix("1. ")
    assert not any(fact[0].isdigit() and ". " in fact[:4] for c in medqa.cases for fact in c.facts)


def test_medqa_indented_lines_continue_the_fact_above(medqa):
    case = next(c for c in medqa.cases if c.id == "medqa_dev_convo:698")
    assert case.n_facts == 8
    assert case.facts[6] == (
        "Preoperative serum studies: Na+ 138 mEq/L, K+ 6.1 mEq/L, Cl- 100 mEq/L, HCO3- 22 mEq/L, "
        "Urea nitrogen 13 mg/dL, Creatinine 1.0 mg/dL"
    )
    assert case.facts[7] == "ECG findings: Normal sinus rhythm"


def test_cmb_loads_1000_cases_dropping_and_counting_padding(cmb):
    assert cmb.fmt == "cmb" and len(cmb.cases) == 1000 and cmb.errors == ()
    assert cmb.records_with_dropped_options == 30
    assert cmb.dropped_options == 34  # 26 records pad E, 4 pad D and E
    assert cmb.dropped_facts == 2
    assert sum(case.multi_answer for case in cmb.cases) == 23
    assert all(all(text for text in case.options.values()) for case in cmb.cases)
    assert all(set(case.answer) <= set(case.options) for case in cmb.cases)


def test_cmb_initial_information_is_the_first_half_of_the_facts(cmb):
    case = next(c for c in cmb.cases if c.id == "cmb_atomic_patient_train:2750")
    assert case.language == "zh" and case.n_facts == 5
    assert case.known == (0, 1)
    assert case.initial_info == "患者是13岁，患者在玩游戏时被物体刮伤小腿。"
    assert case.question == "医生首先采取的确诊方法是什么？"
    assert all(case.known == tuple(range(case.n_facts // 2)) for case in cmb.cases)


def test_cmb_multi_answer_gold_text_is_joined_in_letter_order(cmb):
    case = next(c for c in cmb.cases if c.multi_answer)
    assert case.answer == tuple(sorted(case.answer))
    assert case.gold_text == "，".join(case.options[letter] for letter in case.answer)


def test_promed_examples_load(data_dir):
    medqa = read_cases(data_dir / PROMED_MEDQA)
    assert medqa.fmt == "promed_medqa"
    assert [c.id for c in medqa.cases] == ["medqa_atomic_data_example:1", "medqa_atomic_data_example:9"]
    assert all(len(c.options) == 5 for c in medqa.cases)
    first = medqa.cases[0]
    assert first.initial_info == "A 3-month-old baby died suddenly at night while asleep."
    assert first.question == "Which of the following precautions could have prevented the death of the baby?"
    assert first.answer == ("A",) and first.n_facts == 4
    cmb = read_cases(data_dir / PROMED_CMB)
    assert cmb.fmt == "cmb" and [c.id for c in cmb.cases] == ["cmb_atomic_patient_example:10010"]
    assert cmb.cases[0].known == (0, 1, 2, 3)


def test_first_50_valid_medqa_cases_skip_the_empty_ones(data_dir):
    cases = load_cases(data_dir / MEDQA, on_error="skip", limit=50)
    assert len(cases) == 50 and cases[-1].id == "medqa_dev_convo:49"


def test_half_facts_policy_on_medqa(data_dir):
    cases = load_cases(data_dir / MEDQA, on_error="skip", initial_info="half_facts", limit=5)
    for case in cases:
        half = case.n_facts // 2
        assert case.known == tuple(range(half))
        assert case.initial_info.startswith(case.facts[0]) if half else case.initial_info == ""


def test_smollm_eval_preset_takes_50_cases_of_the_test_split_that_training_never_reads(data_dir):
    from configs import eval as eval_config
    from configs import shapley as shapley_config

    config = eval_config.get_config("smollm")
    assert resolve_path(config.data.paths[0]) == (data_dir / MEDQA).resolve()
    cases = cases_from_config(config.data, stage="eval")
    assert len(cases) == 50 and all(case.source == "medqa_dev_convo" for case in cases)
    assert {split_of(case.id, config.data.split_fractions) for case in cases} == {"test"}
    train = cases_from_config(shapley_config.get_config("smollm").data, stage="shapley")
    assert len(train) > 900 and not {c.id for c in train} & {c.id for c in cases}


# --- conventions, without the shared data ---------------------------------------------------------------------


def test_detect_format_by_fields():
    assert detect_format({"option": {}, "atomic_question": "?"}) == "cmb"
    assert detect_format({"options": {}, "atomic_question": "?", "facts": []}) == "promed_medqa"
    assert detect_format({"options": {}, "question": "?", "atomic_facts": []}) == "mediq"
    assert detect_format({"options": {}, "question": "?", "context": [], "facts": []}) == "mediq"
    with pytest.raises(ValueError, match="unknown record layout"):
        detect_format({"id": 1})


def test_mediq_with_facts_field_instead_of_atomic_facts(tmp_path):
    record = {
        "id": "q1",
        "question": "Which drug?",
        "context": ["A 50-year-old woman has a headache"],
        "options": {"A": "x", "B": "y", "C": "z", "D": "w"},
        "answer_idx": "b",
        "facts": ["1. The patient has a headache.", "2. The headache is one-sided."],
    }
    path = tmp_path / "mediq.jsonl"
    path.write_text(json.dumps(record) + "\n", encoding="utf-8")
    (case,) = load_cases(path, source="icraftmd")
    assert case.id == "icraftmd:q1" and case.answer == ("B",)
    assert case.initial_info == "A 50-year-old woman has a headache."
    assert case.facts == ("The patient has a headache.", "The headache is one-sided.")


def test_dataset_round_trip(tmp_path):
    pytest.importorskip("datasets")  # a declared dependency; absent on the lent GPU machine
    cases = [
        Case("a:1", "a", "en", "info", "q?", {"A": "x", "B": "y"}, ("B",), ("f1", "f2"), ()),
        Case("b:2", "b", "zh", "信息", "问？", {"A": "甲", "B": "乙", "C": "丙"}, ("A", "C"), ("事实",), (0,)),
    ]
    dataset = to_dataset(cases)
    assert len(dataset) == 2 and dataset[1]["option_letters"] == ["A", "B", "C"]
    assert from_dataset(dataset) == cases


def test_bad_arguments_are_named(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text("", encoding="utf-8")
    with pytest.raises(ValueError, match="on_error must be"):
        read_cases(path, on_error="ignore")
    with pytest.raises(ValueError, match="unknown format 'medqa'"):
        read_cases(path, fmt="medqa")
    with pytest.raises(ValueError, match="unknown initial_info policy 'all'"):
        read_cases(path, initial_info="all")
    with pytest.raises(FileNotFoundError, match="case file not found"):
        read_cases(tmp_path / "missing.jsonl")
    with pytest.raises(CaseError, match="x.jsonl: no readable records"):
        read_cases(path)


def test_configured_files_resolve_against_the_repository(tmp_path):
    config = base.get_config("smollm")
    assert config.data.kind == "files" and config.data.paths == (base.MEDQA_PATH,)
    assert resolve_path(str(tmp_path)) == tmp_path
    assert resolve_path("configs/base.py").is_file()


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("on_error", "ignore", "config data.on_error must be one of 'raise', 'skip', got 'ignore'"),
        ("kind", "hub", "config data.kind must be one of 'synthetic', 'files', got 'hub'"),
        ("initial_info", "all", "config data.initial_info must be one of '', 'first_sentence', 'half_facts'"),
        ("limit", -1, "config data.limit must be >= 0, got -1"),
    ],
)
def test_bad_data_config_is_named(field, value, message):
    config = base.get_config()
    config.data[field] = value
    with pytest.raises(DataConfigError, match=re.escape(message)):
        load_from_config(config.data, stage="data")
