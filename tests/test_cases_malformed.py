"""Malformed input in each format: one error naming the file, the line or record id and the field path,
and nothing written by the data stage that read it."""

import copy
import json
import pathlib

import pytest

from configs import base
from promed_jax.data import CaseError, read_cases, stats

DELETE = object()


def mediq(id_=7, **fields):
    record = {
        "id": id_,
        "question": "Which of the following is the most likely diagnosis?",
        "context": ["A 30-year-old man comes with a fever.", "He has a cough."],
        "options": {"A": "Pneumonia", "B": "Asthma", "C": "Migraine", "D": "Gout"},
        "answer": "Pneumonia",
        "answer_idx": "A",
        "atomic_facts": ["1. The patient has a fever.", "2. The patient has a cough."],
    }
    return _apply(record, fields)


def promed(id_=1, **fields):
    record = {
        "id": id_,
        "question": "A 3-month-old baby died. Which precaution helps?",
        "options": {"A": "Supine sleep", "B": "ECG", "C": "Warm room", "D": "Device", "E": "No pacifier"},
        "answer": "Supine sleep",
        "answer_idx": "A",
        "atomic_question": " Which precaution helps?",
        "context": ["A 3-month-old baby died suddenly at night"],
        "facts": ["The patient is a 3-month-old baby", "The patient died at night"],
    }
    return _apply(record, fields)


def cmb(id_=5, **fields):
    record = {
        "question": "患者男，40岁，发热。最可能的诊断是",
        "answer": "A",
        "question_type": "单项选择题",
        "option": {"A": "肺炎", "B": "哮喘", "C": "偏头痛", "D": "痛风", "E": "胃炎"},
        "id": id_,
        "facts": ["患者是男性", "患者年龄40岁", "患者发热"],
        "atomic_question": "最可能的诊断是什么？",
    }
    return _apply(record, fields)


def _apply(record, fields):
    record = copy.deepcopy(record)
    for key, value in fields.items():
        if value is DELETE:
            del record[key]
        else:
            record[key] = value
    return record


def jsonl(*records) -> bytes:
    return b"".join(json.dumps(r, ensure_ascii=False).encode() + b"\n" for r in records)


def json_array(*records) -> bytes:
    return json.dumps(list(records), ensure_ascii=False, indent=1).encode()


def data_stage_error(tmp_path: pathlib.Path, name: str, content: bytes, **data) -> str:
    """Runs the data stage on one file with on_error='raise'; returns the error and checks nothing was written."""
    folder = tmp_path / "in"
    folder.mkdir()
    path = folder / name
    path.write_bytes(content)
    config = base.get_config()
    config.data.kind = "files"
    config.data.paths = (str(path),)
    config.data.on_error = "raise"
    config.data.update(data)
    workdir = tmp_path / "workdir"
    with pytest.raises(CaseError) as error:
        stats.run(config, str(workdir))
    assert not workdir.exists() or not any(p.is_file() for p in workdir.rglob("*"))
    assert [p.name for p in folder.iterdir()] == [name]
    message = str(error.value)
    assert "\n" not in message
    return message


# --- MediQ / ALFA jsonl ------------------------------------------------------------------------------


def test_mediq_missing_question(tmp_path):
    msg = data_stage_error(tmp_path, "m.jsonl", jsonl(mediq(7, question=DELETE)))
    assert msg == "m.jsonl line 1 (id 7): field 'question': missing"


def test_mediq_answer_letter_not_among_options(tmp_path):
    msg = data_stage_error(tmp_path, "m.jsonl", jsonl(mediq(1), mediq(8, answer_idx="E")))
    assert msg == "m.jsonl line 2 (id 8): field 'answer_idx': letter E is not among the options ABCD"


def test_mediq_empty_option_text(tmp_path):
    options = {"A": "Pneumonia", "B": "  ", "C": "Migraine", "D": "Gout"}
    msg = data_stage_error(tmp_path, "m.jsonl", jsonl(mediq(3, options=options)))
    assert msg == "m.jsonl line 1 (id 3): field 'options.B': empty option text"


def test_mediq_duplicate_id(tmp_path):
    msg = data_stage_error(tmp_path, "m.jsonl", jsonl(mediq(7), mediq(9), mediq(7)))
    assert msg == "m.jsonl line 3 (id 7): field 'id': duplicate of line 1"


def test_mediq_no_facts(tmp_path):
    msg = data_stage_error(tmp_path, "m.jsonl", jsonl(mediq(224, atomic_facts=[], context=[])))
    assert msg == "m.jsonl line 1 (id 224): field 'atomic_facts': no facts"


def test_mediq_facts_wrong_type(tmp_path):
    msg = data_stage_error(tmp_path, "m.jsonl", jsonl(mediq(4, atomic_facts="1. The patient has a fever.")))
    assert msg == "m.jsonl line 1 (id 4): field 'atomic_facts': expected list, got str"


def test_mediq_fact_element_wrong_type(tmp_path):
    msg = data_stage_error(tmp_path, "m.jsonl", jsonl(mediq(4, atomic_facts=["1. A fever.", 2])))
    assert msg == "m.jsonl line 1 (id 4): field 'atomic_facts[1]': expected str, got int"


def test_mediq_fact_empty_after_numbering(tmp_path):
    msg = data_stage_error(tmp_path, "m.jsonl", jsonl(mediq(4, atomic_facts=["1. A fever.", "2. A cough.", "3. "])))
    assert msg == "m.jsonl line 1 (id 4): field 'atomic_facts[2]': empty fact"


def test_mediq_answer_wrong_type(tmp_path):
    msg = data_stage_error(tmp_path, "m.jsonl", jsonl(mediq(6, answer_idx=0)))
    assert msg == "m.jsonl line 1 (id 6): field 'answer_idx': expected str, got int"


def test_mediq_options_wrong_type(tmp_path):
    msg = data_stage_error(tmp_path, "m.jsonl", jsonl(mediq(6, options=["Pneumonia", "Asthma"])))
    assert msg == "m.jsonl line 1 (id 6): field 'options': expected dict, got list"


def test_mediq_missing_id(tmp_path):
    msg = data_stage_error(tmp_path, "m.jsonl", jsonl(mediq(1), mediq(2, id=DELETE)))
    assert msg == "m.jsonl line 2: field 'id': missing"


def test_mediq_empty_first_sentence(tmp_path):
    msg = data_stage_error(tmp_path, "m.jsonl", jsonl(mediq(5, context=[""])))
    assert msg == "m.jsonl line 1 (id 5): field 'context[0]': no first sentence for the initial information"


def test_mediq_record_not_an_object(tmp_path):
    content = jsonl(mediq(1)) + b'["not", "a", "record"]\n'
    msg = data_stage_error(tmp_path, "m.jsonl", content)
    assert msg == "m.jsonl line 2: field '<record>': expected a JSON object, got list"


def test_mediq_broken_json_line(tmp_path):
    content = jsonl(mediq(1)) + b'{"id": 2, "question": \n' + jsonl(mediq(3))
    msg = data_stage_error(tmp_path, "m.jsonl", content)
    assert msg.startswith("m.jsonl line 2: broken JSON: ")


def test_mediq_torn_last_line(tmp_path):
    content = jsonl(mediq(1), mediq(2)) + jsonl(mediq(3))[:40]
    msg = data_stage_error(tmp_path, "m.jsonl", content)
    assert msg.startswith("m.jsonl line 3: broken JSON (torn last line): ")


def test_mediq_non_utf8_line(tmp_path):
    content = jsonl(mediq(1)) + b'{"id": 2, "question": "caf\xe9"}\n'
    msg = data_stage_error(tmp_path, "m.jsonl", content)
    assert msg == "m.jsonl line 2: not UTF-8 (byte 0xe9 at offset 26)"


# --- ProMed MedQA jsonl --------------------------------------------------------------------------------


def test_promed_missing_atomic_question(tmp_path):
    msg = data_stage_error(tmp_path, "p.jsonl", jsonl(promed(1), promed(2, atomic_question=DELETE)))
    assert msg == "p.jsonl line 2 (id 2): field 'atomic_question': missing"


def test_promed_no_facts(tmp_path):
    msg = data_stage_error(tmp_path, "p.jsonl", jsonl(promed(1), promed(9, facts=[])))
    assert msg == "p.jsonl line 2 (id 9): field 'facts': no facts"


def test_promed_bad_option_letter(tmp_path):
    options = {"A": "Supine sleep", "B": "ECG", "c": "Warm room", "D": "Device", "E": "No pacifier"}
    msg = data_stage_error(tmp_path, "p.jsonl", jsonl(promed(1, options=options)))
    assert msg == "p.jsonl line 1 (id 1): field 'options.c': option keys must be single letters A-Z"


def test_promed_empty_id(tmp_path):
    msg = data_stage_error(tmp_path, "p.jsonl", jsonl(promed(" ")))
    assert msg == "p.jsonl line 1 (id  ): field 'id': empty text"


def test_promed_context_wrong_type(tmp_path):
    msg = data_stage_error(tmp_path, "p.jsonl", jsonl(promed(2, context="A baby died.")))
    assert msg == "p.jsonl line 1 (id 2): field 'context': expected list, got str"


# --- CMB json ------------------------------------------------------------------------------------------


def test_cmb_multi_answer_letter_not_among_options(tmp_path):
    msg = data_stage_error(tmp_path, "c.json", json_array(cmb(5, answer="AG")))
    assert msg == "c.json record #1 (id 5): field 'answer': letter G is not among the options ABCDE"


def test_cmb_empty_gold_option(tmp_path):
    option = {"A": "肺炎", "B": "哮喘", "C": "偏头痛", "D": "痛风", "E": ""}
    msg = data_stage_error(tmp_path, "c.json", json_array(cmb(1), cmb(6, option=option, answer="BE")))
    assert msg == "c.json record #2 (id 6): field 'answer': gold option E has empty text"


def test_cmb_empty_option_before_others(tmp_path):
    option = {"A": "肺炎", "B": "哮喘", "C": "", "D": "痛风", "E": "胃炎"}
    msg = data_stage_error(tmp_path, "c.json", json_array(cmb(5, option=option)))
    assert msg == "c.json record #1 (id 5): field 'option.C': empty option text"


def test_cmb_duplicate_id(tmp_path):
    msg = data_stage_error(tmp_path, "c.json", json_array(cmb(5), cmb(5)))
    assert msg == "c.json record #2 (id 5): field 'id': duplicate of record #1"


def test_cmb_empty_fact_inside(tmp_path):
    msg = data_stage_error(tmp_path, "c.json", json_array(cmb(5, facts=["患者是男性", "", "患者发热"])))
    assert msg == "c.json record #1 (id 5): field 'facts[1]': empty fact"


def test_cmb_facts_wrong_type(tmp_path):
    msg = data_stage_error(tmp_path, "c.json", json_array(cmb(5, facts={"0": "患者是男性"})))
    assert msg == "c.json record #1 (id 5): field 'facts': expected list, got dict"


def test_cmb_answer_not_letters(tmp_path):
    msg = data_stage_error(tmp_path, "c.json", json_array(cmb(5, answer="A、B")))
    assert msg == "c.json record #1 (id 5): field 'answer': 'A、B' is not option letters"


def test_cmb_broken_json_file(tmp_path):
    content = json_array(cmb(5)).rstrip()[:-1]
    msg = data_stage_error(tmp_path, "c.json", content)
    assert msg.startswith("c.json: broken JSON at line ")


def test_cmb_non_utf8_file(tmp_path):
    content = json_array(cmb(5)).replace("肺炎".encode(), b"\xff\xfe")
    msg = data_stage_error(tmp_path, "c.json", content)
    offset = json_array(cmb(5)).index("肺炎".encode())
    assert msg == f"c.json: not UTF-8 (byte 0xff at offset {offset})"


def test_cmb_missing_option_field_with_explicit_format(tmp_path):
    msg = data_stage_error(tmp_path, "c.json", json_array(cmb(5, option=DELETE)), format="cmb")
    assert msg == "c.json record #1 (id 5): field 'option': missing"


def test_unknown_layout(tmp_path):
    msg = data_stage_error(tmp_path, "x.jsonl", jsonl({"id": 1, "text": "hello"}))
    assert msg == "x.jsonl line 1: unknown record layout with fields ['id', 'text']"


# --- skipping instead of stopping ------------------------------------------------------------------------


def test_skip_counts_every_bad_record_and_keeps_the_rest(tmp_path):
    path = tmp_path / "m.jsonl"
    content = (
        jsonl(mediq(1), mediq(2, atomic_facts=[]), mediq(3), mediq(3), mediq(4, answer_idx="Z"))
        + b"{broken\n"
        + jsonl(mediq(5))
        + b'{"id": 6'
    )
    path.write_bytes(content)
    result = read_cases(path, on_error="skip")
    assert [c.id for c in result.cases] == ["m:1", "m:3", "m:5"]
    assert len(result.errors) == 5
    assert result.errors[0] == "m.jsonl line 2 (id 2): field 'atomic_facts': no facts"
    assert result.errors[1] == "m.jsonl line 4 (id 3): field 'id': duplicate of line 3"
    assert result.errors[2] == "m.jsonl line 5 (id 4): field 'answer_idx': letter Z is not among the options ABCD"
    assert result.errors[3].startswith("m.jsonl line 6: broken JSON: ")
    assert result.errors[4].startswith("m.jsonl line 8: broken JSON (torn last line): ")


def test_skip_drops_trailing_padding_options_with_a_count(tmp_path):
    path = tmp_path / "c.json"
    padded = {"A": "肺炎", "B": "哮喘", "C": "偏头痛", "D": "", "E": ""}
    path.write_bytes(json_array(cmb(1), cmb(2, option=padded), cmb(3, option={**padded, "D": "痛风"})))
    result = read_cases(path, on_error="raise")
    assert [len(c.options) for c in result.cases] == [5, 3, 4]
    assert (result.dropped_options, result.records_with_dropped_options) == (3, 2)
