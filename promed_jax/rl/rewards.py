"""Token rewards of Stage 2 (promed.md §4): pure functions of arrays, registered under kind `rl.reward`.

Every doctor token of turn k (its end-of-turn token included: the role mask covers it) gets its turn's term
plus that turn's format reward:

- question k: α·SIG_k + β·SIG_k·1[correct];
- the answer: γ·1[correct];
- a turn with neither marker, or cut off: its format reward only (`turns.OTHER`).

Modes (`grpo.reward`):

- `distributed`: the paper's, as above.
- `outcome_only`: as `distributed` without SIG: γ·1[correct] on the answer and the format rewards.
- `no_distribution`: the dialogue's `distributed` token rewards summed and spread evenly over its doctor
  tokens, so the dialogue's total is the same and only its credit assignment is gone.
- `trajectory`: the ablation's one scalar per dialogue, R = c·1[correct] + mean format reward over its turns
  + s·Σ_i w_i c_i(T) (c = 4, s = 2), spread evenly over its doctor tokens (so that they sum to R, which the
  per-dialogue advantages `group_std` / `rloo` read back).

Each mode is `reward(turns, turn_ids, role_mask, correct, *, config) -> (token_rewards float32[N, T], parts)`,
where `parts` holds per-dialogue float32[N] metrics: `question` (Σ of the question-turn terms; for
`trajectory` its information term s·Σ_i w_i c_i(T)), `answer` (the answer-turn term; for `trajectory`
c·1[correct]), `format` (mean format reward per turn), `sig` (Σ SIG_k over questions) and `total` (Σ of the
dialogue's token rewards). `outcome_only` reports `sig` and `question` as 0. `shapley.weighting=uniform` (no Shapley weighting) changes the weights that
`turns.turn_arrays` computes SIG from, not these functions.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import chex
import jax
import jax.numpy as jnp

from promed_jax import registry
from promed_jax.rl.turns import ANSWER, QUESTION, TurnArrays

KIND = "rl.reward"
Parts = dict[str, jax.Array]
RewardFn = Callable[..., tuple[jax.Array, Parts]]


@dataclasses.dataclass(frozen=True, kw_only=True)
class RewardConfig:
    """Reward coefficients (promed.md §4; the paper's values as defaults)."""

    alpha: float = 2.0
    beta: float = 1.0
    gamma: float = 3.0
    trajectory_correct_reward: float = 4.0
    trajectory_sig_scale: float = 2.0

    @classmethod
    def from_config(cls, grpo: Mapping) -> RewardConfig:
        return cls(**{f.name: float(grpo[f.name]) for f in dataclasses.fields(cls)})


def _check(turns: TurnArrays, turn_ids: jax.Array, role_mask: jax.Array, correct: jax.Array) -> None:
    chex.assert_rank([turn_ids, role_mask, correct, turns.kind], [2, 2, 1, 2])
    chex.assert_equal_shape([turn_ids, role_mask])
    chex.assert_equal_shape([turns.kind, turns.format_reward, turns.sig])
    chex.assert_equal_shape_prefix([turn_ids, turns.kind, correct, turns.n_turns, turns.final_state], 1)


def turn_terms(turns: TurnArrays, correct: jax.Array, config: RewardConfig, *, use_sig: bool = True) -> jax.Array:
    """float32[N, K_max]: each turn's term plus its format reward (zero on padding turns)."""
    c = correct.astype(jnp.float32)[:, None]
    sig = turns.sig.astype(jnp.float32) if use_sig else jnp.zeros_like(turns.sig, jnp.float32)
    question = jnp.where(turns.kind == QUESTION, config.alpha * sig + config.beta * sig * c, 0.0)
    answer = jnp.where(turns.kind == ANSWER, config.gamma * c, 0.0)
    return question + answer + turns.format_reward.astype(jnp.float32)


def per_token(values: jax.Array, turn_ids: jax.Array, role_mask: jax.Array) -> jax.Array:
    """float32[N, T]: turn k's value float32[N, K_max] on every doctor token of turn k, 0 on other tokens."""
    index = jnp.clip(turn_ids - 1, 0, values.shape[1] - 1)
    return jnp.where(role_mask, jnp.take_along_axis(values, index, axis=1), 0.0)


def spread(total: jax.Array, role_mask: jax.Array) -> jax.Array:
    """float32[N, T]: total float32[N] spread evenly over each row's doctor tokens."""
    tokens = role_mask.sum(axis=1)
    return jnp.where(role_mask, (total / jnp.maximum(tokens, 1))[:, None], 0.0)


def _parts(turns: TurnArrays, correct: jax.Array, config: RewardConfig, token: jax.Array, *, use_sig: bool) -> Parts:
    c = correct.astype(jnp.float32)
    sig = jnp.where(turns.kind == QUESTION, turns.sig, 0.0).sum(axis=1) if use_sig else jnp.zeros_like(c)
    answered = (turns.kind == ANSWER).any(axis=1)
    return {
        "question": (config.alpha + config.beta * c) * sig,
        "answer": jnp.where(answered, config.gamma * c, 0.0),
        "format": turns.format_reward.sum(axis=1) / jnp.maximum(turns.n_turns, 1),
        "sig": sig,
        "total": token.sum(axis=1),
    }


@registry.register(KIND, "distributed")
def distributed(turns, turn_ids, role_mask, correct, *, config: RewardConfig) -> tuple[jax.Array, Parts]:
    _check(turns, turn_ids, role_mask, correct)
    token = per_token(turn_terms(turns, correct, config), turn_ids, role_mask)
    return token, _parts(turns, correct, config, token, use_sig=True)


@registry.register(KIND, "outcome_only")
def outcome_only(turns, turn_ids, role_mask, correct, *, config: RewardConfig) -> tuple[jax.Array, Parts]:
    _check(turns, turn_ids, role_mask, correct)
    token = per_token(turn_terms(turns, correct, config, use_sig=False), turn_ids, role_mask)
    return token, _parts(turns, correct, config, token, use_sig=False)


@registry.register(KIND, "no_distribution")
def no_distribution(turns, turn_ids, role_mask, correct, *, config: RewardConfig) -> tuple[jax.Array, Parts]:
    token, parts = distributed(turns, turn_ids, role_mask, correct, config=config)
    return spread(token.sum(axis=1), role_mask), parts


@registry.register(KIND, "trajectory")
def trajectory(turns, turn_ids, role_mask, correct, *, config: RewardConfig) -> tuple[jax.Array, Parts]:
    _check(turns, turn_ids, role_mask, correct)
    c = correct.astype(jnp.float32)
    fmt = turns.format_reward.sum(axis=1) / jnp.maximum(turns.n_turns, 1)
    state = turns.final_state.astype(jnp.float32)
    total = config.trajectory_correct_reward * c + fmt + config.trajectory_sig_scale * state
    token = spread(total, role_mask)
    parts = {
        "question": config.trajectory_sig_scale * state,
        "answer": config.trajectory_correct_reward * c,
        "format": fmt,
        "sig": jnp.where(turns.kind == QUESTION, turns.sig, 0.0).sum(axis=1),
        "total": token.sum(axis=1),
    }
    return token, parts
