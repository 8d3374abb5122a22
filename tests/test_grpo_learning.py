"""experiments/grpo_learning.py: the share of questions that revealed no fact, and the --set overrides."""

from experiments.grpo_learning import VARIANTS, no_fact_share


def test_no_fact_share_counts_questions_not_facts():
    records = [
        {"n_questions": 4, "revealed_turn": [4, 4, -1, 0]},  # question 4 revealed two facts; 0 = known at the start
        {"n_questions": 2, "revealed_turn": [1, -1]},
    ]
    assert no_fact_share(records) == 1 - 2 / 6
    assert no_fact_share([{"n_questions": 0, "revealed_turn": [0]}]) is None
    assert VARIANTS["zero_advantage"] == {"grpo.advantage": "zero"}


def test_set_overrides_parse_literals_and_refuse_a_bad_key():
    import pytest

    from experiments.grpo_learning import _parse

    assert _parse("grpo.steps=30") == ("grpo.steps", 30)
    assert _parse("grpo.learning_rate=3e-4") == ("grpo.learning_rate", 3e-4)
    assert _parse("grpo.reward=outcome_only") == ("grpo.reward", "outcome_only")
    for bad in ("grpo.steps", "steps=3", "a.b.c=1"):
        with pytest.raises(SystemExit, match="SECTION.FIELD=VALUE"):
            _parse(bad)
