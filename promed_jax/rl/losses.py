"""The policy loss of Stage 2 (promed.md §4): PPO-clip with a KL penalty to the reference, pure functions.

Per doctor token, with the log-ratio to the sampling policy clamped, log ρ = clip(log π − log π_old, ±c):

    loss_t = max(−A_t·ρ_t, −A_t·clip(ρ_t, 1 − ε, 1 + ε_high)) + β_KL·KL_t

ε = 0.1 (the paper's), ε_high = ε unless set (`grpo.clip_eps_high`, the asymmetric "clip-higher" variant).
KL estimators (kind `rl.kl`) of KL(π ‖ π_ref) per token, with log r = clip(log π_ref − log π, ±c):
`k1` = −log r, `k2` = (log r)² / 2, `k3` = r − log r − 1 (the paper's; unbiased and ≥ 0), `none` = 0.
Aggregations (kind `rl.aggregation`) return (sum, denominator), so that gradient accumulation over
micro-batches divides the summed losses by the summed denominators:

- `seq_mean_token_mean` (the paper's): the mean over each row's doctor tokens, then over rows that have any;
  sum = Σ_n mean_t loss, denominator = the number of such rows.
- `token_mean`: sum = Σ_{n,t} loss, denominator = the number of doctor tokens.
- `seq_mean_token_sum_norm`: each row's summed loss over a constant number of tokens, then the mean over
  rows (Dr. GRPO's constant normaliser; no length bias): sum = Σ_{n,t} loss / C, denominator = the number of
  rows that have doctor tokens (so that rows padding a batch to the mesh change nothing).

The clamp makes a token whose log-ratio is outside ±c contribute no gradient through ρ (or r); it guards
the exponentials against a stale `old_logps` row, not the ordinary update.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import chex
import jax
import jax.numpy as jnp

from promed_jax import registry

KL_KIND = "rl.kl"
AGGREGATION_KIND = "rl.aggregation"
Metrics = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True, kw_only=True)
class LossConfig:
    """The policy loss's settings (promed.md §4; the paper's values as defaults).

    Attributes:
      clip_eps: ε, the lower (and by default upper) clip range of the ratio.
      clip_eps_high: the upper clip range; None = clip_eps.
      kl_beta: β_KL, the KL penalty's weight (0 switches the penalty off; the KL is still measured).
      kl_estimator: a name registered under `rl.kl`.
      aggregation: a name registered under `rl.aggregation`.
      log_ratio_clamp: c, the bound of |log π − log π_old| and |log π_ref − log π| before exponentiating.
      norm_tokens: C, the constant normaliser of `seq_mean_token_sum_norm`.
    """

    clip_eps: float = 0.1
    clip_eps_high: float | None = None
    kl_beta: float = 0.04
    kl_estimator: str = "k3"
    aggregation: str = "seq_mean_token_mean"
    log_ratio_clamp: float = 20.0
    norm_tokens: int = 8192

    @classmethod
    def from_config(cls, grpo: Mapping) -> LossConfig:
        """From the `grpo` config section; `grpo.clip_eps_high = 0` means the same as `clip_eps`."""
        return cls(
            clip_eps=float(grpo["clip_eps"]),
            clip_eps_high=float(grpo["clip_eps_high"]) or None,
            kl_beta=float(grpo["kl_beta"]),
            kl_estimator=grpo["kl_estimator"],
            aggregation=grpo["loss_aggregation"],
            log_ratio_clamp=float(grpo["log_ratio_clamp"]),
            norm_tokens=int(grpo["loss_norm_tokens"]),
        )

    @property
    def eps_high(self) -> float:
        return self.clip_eps if self.clip_eps_high is None else self.clip_eps_high


# --- KL estimators: (logps, ref_logps, clamp) -> float[N, T] ----------------------------------------------


def _log_r(logps: jax.Array, ref_logps: jax.Array, clamp: float) -> jax.Array:
    return jnp.clip(ref_logps - logps, -clamp, clamp)


@registry.register(KL_KIND, "k1")
def kl_k1(logps: jax.Array, ref_logps: jax.Array, *, clamp: float) -> jax.Array:
    return -_log_r(logps, ref_logps, clamp)


@registry.register(KL_KIND, "k2")
def kl_k2(logps: jax.Array, ref_logps: jax.Array, *, clamp: float) -> jax.Array:
    return 0.5 * jnp.square(_log_r(logps, ref_logps, clamp))


@registry.register(KL_KIND, "k3")
def kl_k3(logps: jax.Array, ref_logps: jax.Array, *, clamp: float) -> jax.Array:
    log_r = _log_r(logps, ref_logps, clamp)
    return jnp.exp(log_r) - log_r - 1.0


@registry.register(KL_KIND, "none")
def kl_none(logps: jax.Array, ref_logps: jax.Array | None, *, clamp: float) -> jax.Array:
    del ref_logps, clamp
    return jnp.zeros_like(logps)


# --- aggregations: (per_token, mask, config) -> (sum, denominator) -----------------------------------------


@registry.register(AGGREGATION_KIND, "seq_mean_token_mean")
def seq_mean_token_mean(per_token: jax.Array, mask: jax.Array, *, config: LossConfig) -> tuple[jax.Array, jax.Array]:
    m = mask.astype(per_token.dtype)
    tokens = m.sum(axis=1)
    rows = (per_token * m).sum(axis=1) / jnp.maximum(tokens, 1.0)
    return rows.sum(), (tokens > 0).sum().astype(per_token.dtype)


@registry.register(AGGREGATION_KIND, "token_mean")
def token_mean(per_token: jax.Array, mask: jax.Array, *, config: LossConfig) -> tuple[jax.Array, jax.Array]:
    m = mask.astype(per_token.dtype)
    return (per_token * m).sum(), m.sum()


@registry.register(AGGREGATION_KIND, "seq_mean_token_sum_norm")
def seq_mean_token_sum_norm(
    per_token: jax.Array, mask: jax.Array, *, config: LossConfig
) -> tuple[jax.Array, jax.Array]:
    m = mask.astype(per_token.dtype)
    return (per_token * m).sum() / config.norm_tokens, mask.any(axis=1).sum().astype(per_token.dtype)


# --- the loss --------------------------------------------------------------------------------------------


def policy_loss(
    logps: jax.Array,
    old_logps: jax.Array,
    ref_logps: jax.Array | None,
    advantages: jax.Array,
    mask: jax.Array,
    *,
    config: LossConfig,
) -> tuple[jax.Array, jax.Array, Metrics]:
    """PPO-clip + β_KL·KL over the doctor tokens, aggregated by `config.aggregation`.

    Args:
      logps: float[N, T] log π(token) under the policy being updated (the raw model: temperature 1).
      old_logps: float[N, T] the same under the policy that sampled the rollout (no gradient flows into it).
      ref_logps: float[N, T] the same under the frozen reference; None when no KL is taken.
      advantages: float[N, T] per-token advantages (`advantages`).
      mask: bool[N, T] the doctor tokens.

    Returns:
      (sum, denominator, metrics): the loss is sum / denominator; metrics are means over the doctor tokens:
      `clip_fraction` (tokens whose clipped side is active: `clip_low` with A < 0, `clip_high` with A > 0),
      `kl`, `ratio_mean`, `ratio_min`, `ratio_max`, and `pg_loss` / `kl_loss` aggregated as the loss is.
    """
    chex.assert_rank([logps, mask], 2)
    chex.assert_equal_shape([logps, old_logps, advantages, mask])
    # The KL is measured whenever there is an estimator and a reference, and penalised when kl_beta != 0.
    use_kl = config.kl_estimator != "none" and ref_logps is not None
    if config.kl_estimator != "none" and config.kl_beta != 0 and ref_logps is None:
        raise ValueError(f"kl_estimator {config.kl_estimator!r} with kl_beta={config.kl_beta} needs ref_logps")
    if use_kl:
        chex.assert_equal_shape([logps, ref_logps])
    c = config.log_ratio_clamp
    # Off the mask the inputs may hold anything (-inf, NaN): zeroed first, so neither the loss nor its
    # gradient can pick it up.
    logps = jnp.where(mask, logps, 0.0)
    old_logps = jax.lax.stop_gradient(jnp.where(mask, old_logps, 0.0))
    advantages = jax.lax.stop_gradient(jnp.where(mask, advantages, 0.0)).astype(logps.dtype)
    if use_kl:
        ref_logps = jax.lax.stop_gradient(jnp.where(mask, ref_logps, 0.0))
    ratio = jnp.exp(jnp.clip(logps - old_logps, -c, c))
    low, high = 1.0 - config.clip_eps, 1.0 + config.eps_high
    pg = jnp.maximum(-advantages * ratio, -advantages * jnp.clip(ratio, low, high))
    kl_fn: Callable = registry.get(KL_KIND, config.kl_estimator if use_kl else "none")
    kl = kl_fn(logps, ref_logps if use_kl else None, clamp=c)
    aggregate = registry.get(AGGREGATION_KIND, config.aggregation)
    total, denom = aggregate(pg + config.kl_beta * kl, mask, config=config)

    m = mask.astype(logps.dtype)
    tokens = jnp.maximum(m.sum(), 1.0)

    def mean(x: jax.Array) -> jax.Array:
        return (x.astype(logps.dtype) * m).sum() / tokens

    clip_low = (ratio < low) & (advantages < 0)
    clip_high = (ratio > high) & (advantages > 0)
    pg_sum, _ = aggregate(pg, mask, config=config)
    kl_sum, _ = aggregate(kl, mask, config=config)
    safe = jnp.maximum(denom, 1.0)
    metrics = {
        "clip_fraction": mean(clip_low | clip_high),
        "clip_low": mean(clip_low),
        "clip_high": mean(clip_high),
        "kl": mean(kl),
        "ratio_mean": mean(ratio),
        "ratio_min": jnp.where(mask, ratio, jnp.inf).min(),
        "ratio_max": jnp.where(mask, ratio, -jnp.inf).max(),
        "pg_loss": pg_sum / safe,
        "kl_loss": kl_sum / safe,
    }
    return total, denom, metrics
