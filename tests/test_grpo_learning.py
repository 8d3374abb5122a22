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


def test_set_overrides_are_typed_by_the_entry_points_parser_and_refuse_a_bad_key():
    import pytest

    from experiments.grpo_learning import base_config

    c = base_config(["grpo.steps=30", "grpo.learning_rate=3e-4", "grpo.reward=outcome_only", "sampling.temperature=1"])
    assert (c.grpo.steps, c.grpo.learning_rate, c.grpo.reward) == (30, 3e-4, "outcome_only")
    assert c.sampling.temperature == 1.0 and isinstance(c.sampling.temperature, float)
    assert base_config([]).grpo.steps == 6  # the tiny preset's, untouched
    for bad in ("grpo.steps", "steps=3", "grpo.nosuch=1", "grpo.steps=many"):
        with pytest.raises(SystemExit, match="grpo_learning: --set: ") as raised:
            base_config([bad])
        assert "\n" not in str(raised.value)
