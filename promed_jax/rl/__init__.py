"""Stage 2's math (promed.md §4): per-turn reward inputs, token rewards, advantages, KL and the policy loss.

Importing the package registers the kinds `rl.reward`, `rl.advantage`, `rl.kl` and `rl.aggregation`.
"""

from promed_jax.rl.advantages import equal_groups, group_std, rloo, summed, token_mean, traj_mean
from promed_jax.rl.losses import LossConfig, policy_loss
from promed_jax.rl.rewards import RewardConfig, distributed, no_distribution, outcome_only, trajectory, turn_terms
from promed_jax.rl.turns import (
    ANSWER,
    OTHER,
    QUESTION,
    TurnArrays,
    dialogue_turns,
    exact_turn_coverage,
    paper_coverages,
    turn_arrays,
)

__all__ = [
    "ANSWER",
    "OTHER",
    "QUESTION",
    "LossConfig",
    "RewardConfig",
    "TurnArrays",
    "dialogue_turns",
    "distributed",
    "equal_groups",
    "exact_turn_coverage",
    "group_std",
    "no_distribution",
    "outcome_only",
    "paper_coverages",
    "policy_loss",
    "rloo",
    "summed",
    "token_mean",
    "traj_mean",
    "trajectory",
    "turn_arrays",
    "turn_terms",
]
