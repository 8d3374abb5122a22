"""Advantage estimators of Stage 2, registered under kind `rl.advantage` (promed.md §4, issue 12).

Each is `advantage(rewards, mask, group) -> (advantages float[N, T], metrics)` over N rows (dialogues) of
T tokens: `rewards` float[N, T] token rewards (`rewards`), `mask` bool[N, T] the doctor tokens, `group`
int32[N] in [0, N) the case of each row (rows of one case form a group of G). Advantages are 0 off the mask.

- `token_mean` (the paper's): token reward − the mean token reward over all doctor tokens of the group. A
  dialogue weighs in the baseline by its number of doctor tokens.
- `traj_mean`: token reward − the mean over the group's dialogues of each one's mean doctor-token reward, so
  each dialogue counts once whatever its length.
- `group_std` (GRPO): (R − mean R) / std R over the group's per-dialogue summed rewards R = Σ_t r_t
  (sample std, ddof = 1), broadcast to the dialogue's doctor tokens.
- `rloo`: R minus the mean R of the group's other dialogues, broadcast.
- `zero`: 0 everywhere, the control run's (only the KL term acts).

For `group_std` and `rloo` a group whose summed rewards are all equal (within a relative 1e-6), or that
has one row, gets zero advantage (the reference code gives such a group random ±1). `metrics` holds
`equal_reward_share`, the share of groups whose summed rewards are all equal, whatever the estimator, and the
mean and std of the advantage over doctor tokens.
"""

from __future__ import annotations

from collections.abc import Callable

import chex
import jax
import jax.numpy as jnp

from promed_jax import registry

KIND = "rl.advantage"
Metrics = dict[str, jax.Array]
AdvantageFn = Callable[[jax.Array, jax.Array, jax.Array], tuple[jax.Array, Metrics]]
EQUAL_RTOL = 1e-6  # summed rewards this close (relative to max(1, |R|)) count as equal


def _segment(values: jax.Array, group: jax.Array) -> jax.Array:
    """Per-group sums, [N] (group ids index the first axis), gathered back to each row."""
    return jax.ops.segment_sum(values, group, num_segments=group.shape[0])[group]


def _check(rewards: jax.Array, mask: jax.Array, group: jax.Array) -> None:
    chex.assert_rank([rewards, mask, group], [2, 2, 1])
    chex.assert_equal_shape([rewards, mask])
    chex.assert_equal_shape_prefix([rewards, group], 1)


def summed(rewards: jax.Array, mask: jax.Array) -> jax.Array:
    """float[N]: each dialogue's doctor-token rewards summed."""
    return jnp.where(mask, rewards, 0.0).sum(axis=1)


def equal_groups(totals: jax.Array, group: jax.Array) -> jax.Array:
    """bool[N]: the row's group has all summed rewards equal (a one-row group included)."""
    n = group.shape[0]
    high = jax.ops.segment_max(totals, group, num_segments=n)[group]
    low = jax.ops.segment_min(totals, group, num_segments=n)[group]
    return high - low <= EQUAL_RTOL * jnp.maximum(1.0, jnp.maximum(jnp.abs(high), jnp.abs(low)))


def _metrics(advantages: jax.Array, mask: jax.Array, totals: jax.Array, group: jax.Array) -> Metrics:
    n = group.shape[0]
    present = jax.ops.segment_sum(jnp.ones(n), group, num_segments=n) > 0
    equal = jax.ops.segment_max(equal_groups(totals, group).astype(jnp.float32), group, num_segments=n)
    m = mask.astype(jnp.float32)
    tokens = jnp.maximum(m.sum(), 1.0)
    mean = (advantages * m).sum() / tokens
    return {
        "equal_reward_share": jnp.where(present, equal, 0.0).sum() / present.sum(),
        "advantage_mean": mean,
        "advantage_std": jnp.sqrt((jnp.square(advantages - mean) * m).sum() / tokens),
    }


def _finish(advantages: jax.Array, rewards, mask, group) -> tuple[jax.Array, Metrics]:
    advantages = jnp.where(mask, advantages, 0.0)
    return advantages, _metrics(advantages, mask, summed(rewards, mask), group)


@registry.register(KIND, "token_mean")
def token_mean(rewards: jax.Array, mask: jax.Array, group: jax.Array) -> tuple[jax.Array, Metrics]:
    _check(rewards, mask, group)
    tokens = _segment(mask.sum(axis=1).astype(rewards.dtype), group)
    baseline = _segment(summed(rewards, mask), group) / jnp.maximum(tokens, 1.0)
    return _finish(rewards - baseline[:, None], rewards, mask, group)


@registry.register(KIND, "traj_mean")
def traj_mean(rewards: jax.Array, mask: jax.Array, group: jax.Array) -> tuple[jax.Array, Metrics]:
    _check(rewards, mask, group)
    tokens = mask.sum(axis=1).astype(rewards.dtype)
    has_tokens = (tokens > 0).astype(rewards.dtype)
    row_mean = summed(rewards, mask) / jnp.maximum(tokens, 1.0)
    baseline = _segment(row_mean, group) / jnp.maximum(_segment(has_tokens, group), 1.0)
    return _finish(rewards - baseline[:, None], rewards, mask, group)


@registry.register(KIND, "group_std")
def group_std(rewards: jax.Array, mask: jax.Array, group: jax.Array) -> tuple[jax.Array, Metrics]:
    _check(rewards, mask, group)
    totals = summed(rewards, mask)
    size = _segment(jnp.ones_like(totals), group)
    mean = _segment(totals, group) / size
    std = jnp.sqrt(_segment(jnp.square(totals - mean), group) / jnp.maximum(size - 1.0, 1.0))
    degenerate = equal_groups(totals, group) | (size < 2)
    row = jnp.where(degenerate, 0.0, (totals - mean) / jnp.where(degenerate, 1.0, std))
    return _finish(jnp.broadcast_to(row[:, None], rewards.shape), rewards, mask, group)


@registry.register(KIND, "rloo")
def rloo(rewards: jax.Array, mask: jax.Array, group: jax.Array) -> tuple[jax.Array, Metrics]:
    _check(rewards, mask, group)
    totals = summed(rewards, mask)
    size = _segment(jnp.ones_like(totals), group)
    others = (_segment(totals, group) - totals) / jnp.maximum(size - 1.0, 1.0)
    degenerate = equal_groups(totals, group) | (size < 2)
    row = jnp.where(degenerate, 0.0, totals - others)
    return _finish(jnp.broadcast_to(row[:, None], rewards.shape), rewards, mask, group)


@registry.register(KIND, "zero")
def zero(rewards: jax.Array, mask: jax.Array, group: jax.Array) -> tuple[jax.Array, Metrics]:
    """The control of the learning runs: every advantage 0, so only the KL term moves the policy (towards
    the reference, where it starts). The rewards are still computed and logged."""
    _check(rewards, mask, group)
    return _finish(jnp.zeros_like(rewards), rewards, mask, group)
