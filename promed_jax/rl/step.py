"""The GRPO update of Stage 2 (promed.md §4): one jitted, sharded step on the Stage 1 train state.

A rollout batch becomes target-aligned arrays (`update_batch`): position t predicts token t + 1, so the
doctor mask, the advantages and the sampler's log-probs move left by one, as in SFT (`training.data`).

Per rollout batch:

1. `logprob_pass` (jitted, dropout off, no gradient): the policy's log-probs before any update (the old
   log-probs of the ratio: they equal the sampler's raw-model log-probs up to float error, and they stay
   fixed for the μ passes), the reference's log-probs and the policy's entropy per token. Under LoRA the
   reference is the same model with its adapters off (Stage 2 starts from the Stage 1 model with its
   adapters merged and fresh adapters on top, so adapters off is that model: no second copy); under full
   fine-tuning it is a frozen copy of the initial parameters, passed in.
2. `GrpoUpdater.update`: μ = `grpo.updates_per_batch` passes over the batch; each pass shuffles the rows
   (by seed, rollout batch and pass) into `grpo.minibatches` minibatches and takes one optimizer step per
   minibatch, each of `grpo.grad_accum` microbatches, with the PPO-clip + KL loss of `rl.losses` over the
   chunked log-probs of `training.logprobs` and dropout as the model is configured. The step is SFT's
   (`training.state.make_train_step`): sums and denominators add over microbatches, so accumulation divides
   by the minibatch's own denominator.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Mapping
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from promed_jax.device_memory import CheckedStep
from promed_jax.models.transformer import causal_mask, positions_from_mask
from promed_jax.rl.losses import LossConfig, policy_loss
from promed_jax.training import state as state_lib
from promed_jax.training.logprobs import chunk_width, token_logprobs

# Rows of a rollout's target-aligned arrays, all [N, T].
BATCH_KEYS = ("tokens", "targets", "valid", "weights", "advantages")


def bucket_length(length: int, minimum: int = 64) -> int:
    """Rows are padded to a power of two (at least `minimum`), so a run compiles a few shapes."""
    return max(minimum, 1 << max(0, int(length) - 1).bit_length())


def update_batch(
    tokens: np.ndarray,
    role_mask: np.ndarray,
    lengths: np.ndarray,
    advantages: np.ndarray,
    *,
    pad_id: int,
    length: int | None = None,
) -> dict[str, np.ndarray]:
    """Target-aligned arrays [N, L] of a rollout: `tokens`, `targets` (tokens shifted left), `valid` (a real
    input position), `weights` (the target is a doctor token), `advantages` (the target token's).

    Args:
      tokens: int32[N, T] the rollout's ids; role_mask: bool[N, T] its doctor tokens; lengths: int32[N].
      advantages: float32[N, T] per token (0 off the role mask).
      length: L >= T; default `bucket_length(T)`.
    """
    chex.assert_rank([tokens, role_mask, advantages], 2)
    chex.assert_equal_shape([tokens, role_mask, advantages])
    n, t = tokens.shape
    length = bucket_length(t) if length is None else length
    if length < t:
        raise ValueError(f"update_batch: length {length} < the rollout's {t} tokens")
    out_tokens = np.full((n, length), pad_id, np.int32)
    out_tokens[:, :t] = tokens
    targets = np.full((n, length), pad_id, np.int32)
    targets[:, : t - 1] = tokens[:, 1:]
    valid = np.arange(length)[None, :] < np.asarray(lengths)[:, None]
    weights = np.zeros((n, length), bool)
    weights[:, : t - 1] = role_mask[:, 1:]
    weights &= np.roll(valid, -1, axis=1) & valid
    adv = np.zeros((n, length), np.float32)
    adv[:, : t - 1] = advantages[:, 1:]
    return {
        "tokens": out_tokens,
        "targets": targets,
        "valid": valid,
        "weights": weights,
        "advantages": np.where(weights, adv, 0.0).astype(np.float32),
    }


def token_entropy(hidden: jax.Array, head: jax.Array, *, chunk: int) -> jax.Array:
    """float32[B, T]: the entropy of softmax(hidden @ head) per position, over vocabulary chunks (an online
    log-sum-exp with the running sum of p·logit), never the whole [B, T, V]."""
    vocab = head.shape[1]
    width = chunk_width(vocab, chunk)
    n_chunks = -(-vocab // width)
    if n_chunks * width != vocab:
        head = jnp.pad(head, ((0, 0), (0, n_chunks * width - vocab)))
    head = head.astype(hidden.dtype)
    columns = jnp.arange(width)

    def block(carry, index):
        running_max, total, weighted = carry
        start = index * width
        logits = jnp.einsum(
            "btd,dv->btv",
            hidden,
            jax.lax.dynamic_slice_in_dim(head, start, width, axis=1),
            preferred_element_type=jnp.float32,
        )
        inside = start + columns < vocab
        new_max = jnp.maximum(running_max, jnp.where(inside, logits, -jnp.inf).max(axis=-1))
        scale = jnp.exp(running_max - new_max)
        p = jnp.where(inside, jnp.exp(logits - new_max[..., None]), 0.0)
        return (
            new_max,
            total * scale + p.sum(-1),
            weighted * scale + (p * jnp.where(inside, logits, 0.0)).sum(-1),
        ), None

    shape = hidden.shape[:2]
    init = (jnp.full(shape, -jnp.inf, jnp.float32), jnp.zeros(shape, jnp.float32), jnp.zeros(shape, jnp.float32))
    (running_max, total, weighted), _ = jax.lax.scan(block, init, jnp.arange(n_chunks))
    return running_max + jnp.log(total) - weighted / total


def _forward(model: nnx.Module, batch: Mapping[str, jax.Array], *, use_lora: bool) -> jax.Array:
    valid = batch["valid"]
    hidden, _ = model.hidden_states(
        batch["tokens"], positions_from_mask(valid), causal_mask(valid), use_lora=use_lora, causal=True
    )
    return hidden


def logprob_pass(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    frozen: nnx.State,
    ref_params: nnx.State | None,
    batch: Mapping[str, jax.Array],
    *,
    chunk: int,
    lora: bool,
) -> dict[str, jax.Array]:
    """Dropout off (`graphdef` from `state.eval_graphdef`). float32[N, L] each: `old_logps` (the policy),
    `ref_logps` (adapters off under LoRA; `ref_params` under full fine-tuning), `entropy` (the policy's)."""
    model = nnx.merge(graphdef, params, frozen)
    head = model.head_kernel()
    hidden = _forward(model, batch, use_lora=True)
    old = token_logprobs(hidden, head, batch["targets"], chunk=chunk)
    entropy = token_entropy(hidden, head, chunk=chunk)
    if lora:
        ref_hidden = _forward(model, batch, use_lora=False)
        ref = token_logprobs(ref_hidden, head, batch["targets"], chunk=chunk)
    else:
        ref_model = nnx.merge(graphdef, ref_params, frozen)
        ref = token_logprobs(
            _forward(ref_model, batch, use_lora=False), ref_model.head_kernel(), batch["targets"], chunk=chunk
        )
    return {"old_logps": old, "ref_logps": ref, "entropy": entropy}


def grpo_loss(
    model: nnx.Module, batch: Mapping[str, jax.Array], rng: jax.Array, *, config: LossConfig, chunk: int
) -> tuple[jax.Array, jax.Array, dict]:
    """`training.state.LossFn`: (sum, denominator, token-weighted aux sums) of the policy loss of a microbatch
    with `old_logps`, `ref_logps` and `advantages` in it (all [B, L], target-aligned)."""
    del rng  # dropout keys are set on the model by the step
    hidden = _forward(model, batch, use_lora=True)
    logps = token_logprobs(hidden, model.head_kernel(), batch["targets"], chunk=chunk)
    mask = batch["weights"]
    total, denom, m = policy_loss(
        logps, batch["old_logps"], batch["ref_logps"], batch["advantages"], mask, config=config
    )
    tokens = mask.sum().astype(jnp.float32)
    aux = {
        "doctor_tokens": tokens,
        "clip_tokens": m["clip_fraction"] * tokens,
        "kl_tokens": m["kl"] * tokens,
        "pg_sum": m["pg_loss"] * jnp.maximum(denom, 1.0),
    }
    return total, denom, aux


@dataclasses.dataclass(frozen=True, kw_only=True)
class UpdateConfig:
    """How a rollout batch is turned into optimizer steps (`grpo.updates_per_batch`, `minibatches`,
    `grad_accum`, `vocab_chunk`, `seed`)."""

    passes: int = 1
    minibatches: int = 1
    grad_accum: int = 1
    vocab_chunk: int = 8192
    seed: int = 0

    @classmethod
    def from_config(cls, grpo: Mapping[str, Any]) -> UpdateConfig:
        return cls(
            passes=int(grpo["updates_per_batch"]),
            minibatches=int(grpo["minibatches"]),
            grad_accum=int(grpo["grad_accum"]),
            vocab_chunk=int(grpo["vocab_chunk"]),
            seed=int(grpo["seed"]),
        )

    def steps_per_batch(self) -> int:
        return self.passes * self.minibatches


def optimizer_config(grpo: Mapping[str, Any], total_steps: int) -> state_lib.OptimizerConfig:
    """Adam (the paper's) or AdamW at a constant `grpo.learning_rate`, global-norm clipping."""
    return state_lib.OptimizerConfig(
        learning_rate=float(grpo["learning_rate"]),
        total_steps=total_steps,
        final_lr_fraction=1.0,
        weight_decay=float(grpo["weight_decay"]) if grpo["optimizer"] == "adamw" else 0.0,
        max_grad_norm=float(grpo["max_grad_norm"]),
    )


class GrpoUpdater:
    """The compiled log-prob pass and update step of one Stage 2 run, over a train state it owns.

    `model` is the Stage 2 start (fresh adapters under LoRA); rows per rollout batch `rows` must split into
    `minibatches` x `grad_accum` equal parts.
    """

    def __init__(
        self,
        model: nnx.Module,
        *,
        rows: int,
        lora: bool,
        loss: LossConfig,
        update: UpdateConfig,
        optimizer: state_lib.OptimizerConfig,
        mesh,
        seed: int,
        memory_budget: int | None = None,
    ):
        per_step = update.minibatches * update.grad_accum
        if rows % per_step:
            raise ValueError(
                f"{rows} rollout rows do not split into {update.minibatches} minibatches x "
                f"{update.grad_accum} microbatches"
            )
        self.rows, self.lora, self.update_config, self.mesh = rows, lora, update, mesh
        self.minibatch_rows = rows // update.minibatches
        self.schedule = state_lib.schedule(optimizer)
        tx = state_lib.make_optimizer(optimizer)
        graphdef, params, frozen = state_lib.split_for_training(model, lora=lora)
        self.graphdef = graphdef
        self.eval_graphdef = state_lib.eval_graphdef(graphdef, params, frozen, lora=lora)
        # Full fine-tuning: the reference is a frozen copy of the start (LoRA: the adapters switched off).
        self.ref_params = None if lora else jax.tree.map(jnp.copy, params)
        self.state = state_lib.place_state(state_lib.init_state(params, frozen, tx, seed), mesh)
        loss_fn = functools.partial(grpo_loss, config=loss, chunk=update.vocab_chunk)
        self.step_fn = CheckedStep(
            state_lib.compile_step(
                state_lib.make_train_step(loss_fn, graphdef, tx, self.schedule),
                self.state,
                mesh,
                self.minibatch_rows // update.grad_accum,
            ),
            name="the GRPO step",
            hint="lower it with model.remat=True, more grpo.minibatches or grpo.grad_accum, or a lower sampling.max_dialogue_tokens",
            budget=memory_budget,
        )
        spec = state_lib.batch_sharding(mesh, rows).spec[1:]
        self._row_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec))
        self._pass = jax.jit(functools.partial(logprob_pass, self.eval_graphdef, chunk=update.vocab_chunk, lora=lora))

    def policy_model(self) -> nnx.Module:
        """The current policy with dropout off (shares the state's arrays: use it before the next update)."""
        model = nnx.merge(self.eval_graphdef, self.state.params, self.state.frozen)
        model.eval()
        return model

    def reference_params(self) -> nnx.State | None:
        return self.ref_params

    def logprobs(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """`logprob_pass` on the current state."""
        rows = jax.device_put({k: batch[k] for k in ("tokens", "targets", "valid")}, self._row_sharding)
        out = self._pass(self.state.params, self.state.frozen, self.ref_params, rows)
        return {k: np.asarray(v) for k, v in jax.device_get(out).items()}

    def update(self, batch: Mapping[str, np.ndarray], *, batch_index: int) -> tuple[dict[str, float], dict]:
        """The μ passes over one rollout batch. Returns (update metrics, the log-prob pass's arrays)."""
        chex.assert_shape(batch["tokens"], (self.rows, None))
        start = time.perf_counter()
        extra = self.logprobs(batch)
        full = {**{k: batch[k] for k in BATCH_KEYS}, "old_logps": extra["old_logps"], "ref_logps": extra["ref_logps"]}
        cfg = self.update_config
        records = []
        for p in range(cfg.passes):
            order = np.random.default_rng([cfg.seed, batch_index, p]).permutation(self.rows)
            for m in range(cfg.minibatches):
                rows = order[m * self.minibatch_rows : (m + 1) * self.minibatch_rows]
                shape = (cfg.grad_accum, self.minibatch_rows // cfg.grad_accum)
                mini = {k: v[rows].reshape(*shape, *v.shape[1:]) for k, v in full.items()}
                self.state, metrics = self.step_fn(self.state, mini)
                records.append(jax.device_get(metrics))
        seconds = time.perf_counter() - start
        return summarize(records, extra, batch["weights"], seconds=seconds), extra


def summarize(
    records: list[dict], extra: Mapping[str, np.ndarray], weights: np.ndarray, *, seconds: float
) -> dict[str, float]:
    """One rollout batch's update metrics: means over its optimizer steps; `kl` is the first step's (the
    policy before this batch's updates), `kl_last` the last step's; `entropy` from the log-prob pass."""
    doctor = [max(float(r["doctor_tokens"]), 1.0) for r in records]
    mask = np.asarray(weights, bool)
    return {
        "loss": float(np.mean([r["loss"] for r in records])),
        "pg_loss": float(np.mean([r["pg_sum"] / max(float(r["tokens"]), 1.0) for r in records])),
        "kl": float(records[0]["kl_tokens"]) / doctor[0],
        "kl_last": float(records[-1]["kl_tokens"]) / doctor[-1],
        "clip_fraction": float(sum(float(r["clip_tokens"]) for r in records)) / sum(doctor),
        "grad_norm": float(np.mean([r["grad_norm"] for r in records])),
        "lr": float(records[0]["lr"]),
        "entropy": float(extra["entropy"][mask].mean()) if mask.any() else 0.0,
        "update_tokens": float(sum(float(r["doctor_tokens"]) for r in records)),
        "updates": len(records),
        "update_s": seconds,
    }
