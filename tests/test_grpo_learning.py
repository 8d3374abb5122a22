"""experiments/grpo_learning.py: the share of questions that revealed no fact."""

from experiments.grpo_learning import VARIANTS, no_fact_share


def test_no_fact_share_counts_questions_not_facts():
    records = [
        {"n_questions": 4, "revealed_turn": [4, 4, -1, 0]},  # question 4 revealed two facts; 0 = known at the start
        {"n_questions": 2, "revealed_turn": [1, -1]},
    ]
    assert no_fact_share(records) == 1 - 2 / 6
    assert no_fact_share([{"n_questions": 0, "revealed_turn": [0]}]) is None
    assert VARIANTS["zero_advantage"] == {"grpo.advantage": "zero"}
