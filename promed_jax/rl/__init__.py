"""Stage 2's math (promed.md §4): per-turn reward inputs, token rewards, advantages, KL and the policy loss.

Importing the package registers the kinds `rl.reward`, `rl.advantage`, `rl.kl` and `rl.aggregation`. A GRPO
step uses them so (`grpo` is the config section; every array is aligned with `rollout.tokens`, so
`logps[n, t]` is log π(tokens[n, t] | tokens[n, :t])):

    turns = turn_arrays(rollout, weights, format_start=grpo.format_reward_start,
                        format_contains=grpo.format_reward_contains)             # host side, once per batch
    reward = functools.partial(registry.get("rl.reward", grpo.reward), config=RewardConfig.from_config(grpo))
    rewards, parts = reward(turns, rollout.turn_ids, rollout.role_mask, rollout.correct)
    advantages, stats = registry.get("rl.advantage", grpo.advantage)(rewards, rollout.role_mask, rollout.group)
    loss = functools.partial(policy_loss, config=LossConfig.from_config(grpo))   # inside the jitted step:
    total, denom, metrics = loss(logps, old_logps, ref_logps, advantages, rollout.role_mask)
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
