"""Sources named by file, ids unique across files, selection by ids and fact counts, the train/dev/test split,
and the case fingerprint."""

import collections
import dataclasses
import json
import random
import re

import pytest

from configs import base
from promed_jax.data import Case, DataConfigError, cases_from_config, load_from_config, read_cases
from promed_jax.data.sources import SPLITS, check_data_config, split_of
from promed_jax.errors import ConfigError, DataError

MEDQA = "medqa_dev_convo.jsonl"


def mediq_line(case_id, n_facts=2, question="Which diagnosis?"):
    return json.dumps(
        {
            "id": case_id,
            "question": question,
            "context": ["A patient comes in."],
            "options": {"A": "flu", "B": "cold"},
            "answer_idx": "A",
            "atomic_facts": [f"fact {k} of {case_id}" for k in range(n_facts)],
        }
    )


def write(path, lines):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def files_config(*paths, **data):
    config = base.get_config()
    config.data.kind = "files"
    config.data.paths = tuple(paths)
    config.data.split = "all"
    for field, value in data.items():
        config.data[field] = value
    return config.data


# --- sources ---------------------------------------------------------------------------------------------------


def test_source_is_the_file_stem_and_two_files_of_one_format_load_together(tmp_path):
    dev = write(tmp_path / "medqa_dev.jsonl", [mediq_line(1), mediq_line(2)])
    test = write(tmp_path / "medqa_test.jsonl", [mediq_line(1)])
    cases = cases_from_config(files_config(dev, test), stage="data")
    assert [c.id for c in cases] == ["medqa_dev:1", "medqa_dev:2", "medqa_test:1"]
    assert [c.source for c in cases] == ["medqa_dev", "medqa_dev", "medqa_test"]
    assert read_cases(dev).cases[0].id == "medqa_dev:1"


def test_same_stem_in_two_folders_is_a_data_error_naming_both_files_unless_sources_differ(tmp_path):
    dev = write(tmp_path / "dev" / "medqa.jsonl", [mediq_line(1)])
    test = write(tmp_path / "test" / "medqa.jsonl", [mediq_line(7), mediq_line(1)])
    message = f"case id medqa:1 is in both {dev} and {test}; give them distinct data.sources"
    with pytest.raises(DataError, match=f"^{re.escape(message)}$"):
        cases_from_config(files_config(dev, test), stage="data")
    cases = cases_from_config(files_config(dev, test, sources=("medqa_dev", "")), stage="data")
    assert [c.id for c in cases] == ["medqa_dev:1", "medqa:7", "medqa:1"]


@pytest.mark.parametrize(
    ("sources", "message"),
    [
        (("a",), "config data.sources has 1 names for 2 data.paths (one per path, '' = the stem)"),
        (("a/b", ""), "config data.sources: source 'a/b' of "),
        (("", ".hidden"), "config data.sources: source '.hidden' of "),
    ],
)
def test_bad_sources_are_config_errors(tmp_path, sources, message):
    one = write(tmp_path / "one.jsonl", [mediq_line(1)])
    two = write(tmp_path / "two.jsonl", [mediq_line(1)])
    with pytest.raises(DataConfigError, match=f"^{re.escape(message)}"):
        cases_from_config(files_config(one, two, sources=sources), stage="data")


def test_paths_with_the_synthetic_kind_is_a_config_error_naming_both_fields():
    config = base.get_config("tiny")
    config.data.paths = ("../shared/data/medqa_dev_convo.jsonl",)
    message = "config data.paths is set but data.kind='synthetic' reads no files; set data.kind='files' or leave it"
    with pytest.raises(ConfigError, match=f"^{re.escape(message)} empty$"):
        check_data_config(config.data)
    config.data.paths = ()
    config.data.sources = ("x",)
    with pytest.raises(ConfigError, match="^config data.sources is set but data.kind='synthetic'"):
        cases_from_config(config.data, stage="eval")


def test_synthetic_clinic_keeps_its_source_and_is_not_split_by_default():
    config = base.get_config("tiny")
    config.data.synthetic_n = 10
    for stage in ("data", "shapley", "eval"):
        cases = cases_from_config(config.data, stage=stage)
        assert len(cases) == 10 and {c.source for c in cases} == {"synthetic"}
    config.data.split = "train"
    train = cases_from_config(config.data, stage="eval")
    assert {split_of(c.id, config.data.split_fractions) for c in train} == {"train"} and len(train) < 10


# --- selection ---------------------------------------------------------------------------------------------------


def test_selection_by_ids_fact_range_and_limit(tmp_path):
    path = write(tmp_path / "f.jsonl", [mediq_line(i, n_facts=i) for i in range(1, 9)])
    def facts(**data):
        return [c.n_facts for c in cases_from_config(files_config(path, **data), stage="data")]

    assert facts(min_facts=3, max_facts=5) == [3, 4, 5]
    assert facts(min_facts=7) == [7, 8] and facts(max_facts=2) == [1, 2]
    chosen = cases_from_config(files_config(path, ids=("f:6", "f:2")), stage="data")
    assert [c.id for c in chosen] == ["f:2", "f:6"]  # file order
    assert len(cases_from_config(files_config(path, min_facts=2, limit=3), stage="data")) == 3
    with pytest.raises(DataConfigError, match=r"^config data: no case selected from f\.jsonl \(split all, ids \(\), facts 9\.\.any"):
        cases_from_config(files_config(path, min_facts=9), stage="data")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"ids": ("f:99",)}, "config data.ids: no configured case has id 'f:99'"),
        ({"ids": ("f:1", "f:1")}, "config data.ids repeats an id"),
        ({"ids": ("f:2",), "min_facts": 3}, "config data.ids: case f:2 has 2 facts, outside data.min_facts=3 .."),
        ({"min_facts": -1}, "config data.min_facts must be >= 0, got -1"),
        ({"max_facts": 2, "min_facts": 3}, "config data.max_facts=2 is below data.min_facts=3 (0 = no bound)"),
        ({"split": "val"}, "config data.split must be one of '', 'train', 'dev', 'test', 'all', got 'val'"),
        ({"split_fractions": (0.8, 0.1, 0.2)}, "config data.split_fractions must be 3 fractions >= 0"),
        ({"split_fractions": (1.2, -0.1, -0.1)}, "config data.split_fractions must be 3 fractions >= 0"),
        ({"split_fractions": (0.5, 0.5)}, "config data.split_fractions must be 3 fractions >= 0"),
    ],
)
def test_bad_selection_is_a_config_error(tmp_path, data, message):
    path = write(tmp_path / "f.jsonl", [mediq_line(i, n_facts=i) for i in range(1, 5)])
    with pytest.raises(DataConfigError, match=f"^{re.escape(message)}"):
        cases_from_config(files_config(path, **data), stage="data")


def test_an_id_outside_the_stages_split_is_refused(tmp_path):
    path = write(tmp_path / "f.jsonl", [mediq_line(i) for i in range(40)])
    data = files_config(path, split="")
    test_id = next(f"f:{i}" for i in range(40) if split_of(f"f:{i}", data.split_fractions) == "test")
    data.ids = (test_id,)
    assert [c.id for c in cases_from_config(data, stage="eval")] == [test_id]
    with pytest.raises(DataConfigError, match=f"^config data.ids: case {test_id} is in the test split, this stage"):
        cases_from_config(data, stage="shapley")


# --- split ---------------------------------------------------------------------------------------------------------


def test_split_depends_on_the_id_alone_is_disjoint_and_follows_the_fractions(tmp_path):
    ids = list(range(300))
    full = write(tmp_path / "a" / "f.jsonl", [mediq_line(i) for i in ids])
    shuffled = ids[:]
    random.Random(0).shuffle(shuffled)
    part = write(tmp_path / "b" / "f.jsonl", [mediq_line(i) for i in shuffled[:100]])
    data = files_config(full, split="")
    by_split = {s: {c.id for c in cases_from_config(files_config(full, split=s), stage="data")} for s in SPLITS}
    assert sum(map(len, by_split.values())) == len(ids) and set().union(*by_split.values()) == {f"f:{i}" for i in ids}
    for split in SPLITS:
        subset = {c.id for c in cases_from_config(files_config(part, split=split), stage="data")}
        assert subset == by_split[split] & {f"f:{i}" for i in shuffled[:100]}
    assert {c.id for c in cases_from_config(data, stage="shapley")} == by_split["train"]
    assert {c.id for c in cases_from_config(data, stage="eval")} == by_split["test"]
    assert split_of("f:1", (0.0, 0.0, 1.0)) == "test" and split_of("f:1", (1.0, 0.0, 0.0)) == "train"


def test_split_of_the_real_dev_file_is_near_the_fractions(data_dir):
    data = files_config(str(data_dir / MEDQA), on_error="skip")
    (result,) = load_from_config(data, stage="data")
    counts = collections.Counter(split_of(c.id, data.split_fractions) for c in result.cases)
    assert sum(counts.values()) == 1269
    for split, fraction in zip(SPLITS, data.split_fractions, strict=True):
        assert abs(counts[split] / 1269 - fraction) < 0.02, counts


# --- fingerprint -----------------------------------------------------------------------------------------------------


def test_fingerprint_is_stable_and_covers_facts_question_options_and_answer():
    case = Case("s:1", "s", "en", "info", "Which?", {"A": "flu", "B": "cold"}, ("A",), ("fever", "cough"))
    assert case.fingerprint == "96ad5cde9683109c"  # sha256 of the JSON [facts, question, options, answer]
    assert dataclasses.replace(case, id="t:1", source="t", initial_info="other").fingerprint == case.fingerprint
    for change in (
        {"facts": ("fever", "rash")},
        {"question": "Which one?"},
        {"options": {"A": "flu", "B": "cough"}},
        {"answer": ("B",)},
    ):
        assert dataclasses.replace(case, **change).fingerprint != case.fingerprint
