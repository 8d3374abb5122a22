"""The hand-written natural question sets: their shape, and that no question is built from its fact's words."""

import collections
import json
import pathlib

import pytest

from promed_jax.consult import patients as PT
from promed_jax.data.cases import load_cases

HERE = pathlib.Path(__file__).parent / "data"
SETS = {"tune": "natural_questions_tune.jsonl", "test": "natural_questions_test.jsonl"}


def read(name: str) -> list[dict]:
    return [json.loads(line) for line in (HERE / name).read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def medqa(data_dir):
    return {c.id: c for c in load_cases(data_dir / "medqa_dev_convo.jsonl", on_error="skip")}


@pytest.mark.parametrize("split", sorted(SETS))
def test_set_shape(split):
    records = read(SETS[split])
    per_case = collections.defaultdict(collections.Counter)
    for r in records:
        assert set(r) == {"case", "question", "fact", "kind"}, r
        assert (r["fact"] is None) == (r["kind"] != "targeted"), r
        per_case[r["case"]][r["kind"]] += 1
    main = {c: k for c, k in per_case.items() if k["targeted"]}
    assert len(main) >= 60
    assert all(k["targeted"] == 3 and k["unanswerable"] == 1 for k in main.values()), main
    assert sum(k["targeted"] + k["unanswerable"] for k in main.values()) >= 240
    assert sum(k["broad"] for k in per_case.values()) == 20
    assert len({r["question"] for r in records if r["kind"] == "broad"}) == 20


def test_sets_are_on_disjoint_cases():
    tune, test = ({r["case"] for r in read(SETS[s])} for s in ("tune", "test"))
    assert not tune & test


@pytest.mark.parametrize("split", sorted(SETS))
def test_questions_refer_to_real_facts_without_their_words(split, medqa):
    """A targeted question shares at most one stemmed content word with its fact (the lexical patient's own
    stemmer and stop words), so a set cannot be passed by parroting the facts."""
    for r in read(SETS[split]):
        case = medqa[r["case"]]
        if r["fact"] is None:
            continue
        assert 0 <= r["fact"] < case.n_facts, r
        shared = PT.content_words(r["question"]) & PT.content_words(case.facts[r["fact"]])
        assert len(shared) <= 1, (r, sorted(shared))


def test_chinese_set(data_dir):
    cmb = {c.id: c for c in load_cases(data_dir / "cmb_atomic_patient_train.json", on_error="skip")}
    records = read("natural_questions_zh.jsonl")
    assert len(records) >= 40
    for r in records:
        assert r["case"] in cmb, r
        assert r["fact"] is None or 0 <= r["fact"] < cmb[r["case"]].n_facts, r
