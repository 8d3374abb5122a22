"""The train state, the optimizer and the one pure, sharded train step that SFT and GRPO share.

A model is split once into `graphdef` (structure), `params` (what is trained: the LoRA adapters, or every
`nnx.Param` under full fine-tuning) and `frozen` (the rest: base weights under LoRA, dropout RNG variables).
`train_step(state, batch) -> (state, metrics)` merges them, runs `loss_fn(model, microbatch, rng) -> (sum,
count, aux)` on each of the batch's microbatches (leading axis), adds the gradients of the sums and divides
by the global count, so 4 microbatches of B/4 equal one batch of B. Dropout is on (the graphdef comes from
`model.train()`) with keys derived from the state's RNG and step: a resumed run draws the masks an
uninterrupted one draws. Only `params` (and their optimizer state) change; under LoRA the optimizer state
covers the adapters alone.

Layer layout: stored unscanned (`nnx.List` of blocks): the checkpoint layout, the HF import/export maps
and the per-layer KV caches of the sampler and the Shapley game use it. With `model.remat` the forward
without a KV cache (the SFT and GRPO steps, their log-prob passes) runs the blocks as one `lax.scan` over
their stacked variables, each iteration rematerialised (`transformer._scanned_blocks`): remat per block in
the unrolled loop saved nothing on the CPU, where XLA scheduled every recomputation early (a SmolLM2 step of
8 x 1,024 tokens: 35.8 GiB with it, 37.2 without; 2.6 GiB scanned; `experiments/sft_memory.py`). The stack
is a copy of the layers' weights inside the step; storing them stacked would save it (and compile time) but
change every map above.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import chex
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from promed_jax.models.lora import LoRAParam
from promed_jax.sharding import variable_sharding

# loss_fn(model, microbatch, rng) -> (loss sum, count, aux dict of scalars summed over microbatches)
LossFn = Callable[[nnx.Module, Mapping[str, jax.Array], jax.Array], tuple[jax.Array, jax.Array, dict]]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
    """Everything a step reads and writes; a pytree, donated to the step.

    Attributes:
      params: the trained variables (nnx.State).
      frozen: the model's other variables (nnx.State; not checkpointed: rebuilt from the model).
      opt_state: optax state of `params`.
      step: int32 [] optimizer steps taken.
      rng: uint32 [2] key data of the base key (`jax.random.key_data`); step k uses fold_in(key, k).
      data_position: int32 [] batches consumed (the position in the deterministic batch order).
    """

    params: Any
    frozen: Any
    opt_state: Any
    step: jax.Array
    rng: jax.Array
    data_position: jax.Array


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW with linear warmup then cosine decay to `final_lr_fraction * learning_rate`, after clipping the
    global gradient norm to `max_grad_norm` (0 = no clipping). Weight decay applies to matrices only."""

    learning_rate: float
    total_steps: int
    warmup_steps: int = 0
    final_lr_fraction: float = 0.0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    b1: float = 0.9
    b2: float = 0.999


def schedule(cfg: OptimizerConfig) -> optax.Schedule:
    total = max(cfg.total_steps, 1)
    warmup = min(cfg.warmup_steps, total - 1)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0 if warmup else cfg.learning_rate,
        peak_value=cfg.learning_rate,
        warmup_steps=warmup,
        decay_steps=total,
        end_value=cfg.learning_rate * cfg.final_lr_fraction,
    )


def make_optimizer(cfg: OptimizerConfig) -> optax.GradientTransformation:
    def decay_mask(params):
        return jax.tree.map(lambda x: x.ndim >= 2, params)

    adamw = optax.adamw(schedule(cfg), b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay, mask=decay_mask)
    if cfg.max_grad_norm > 0:
        return optax.chain(optax.clip_by_global_norm(cfg.max_grad_norm), adamw)
    return adamw


def trained_filter(lora: bool) -> nnx.filterlib.Filter:
    """LoRA: the adapters only. Full fine-tuning: every parameter."""
    return LoRAParam if lora else nnx.Param


def split_for_training(model: nnx.Module, *, lora: bool) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """(graphdef in training mode, trained variables, the rest). The model is left in eval mode."""
    model.train()
    graphdef, params, frozen = nnx.split(model, trained_filter(lora), ...)
    model.eval()
    return graphdef, params, frozen


def eval_graphdef(graphdef: nnx.GraphDef, params: nnx.State, frozen: nnx.State, *, lora: bool) -> nnx.GraphDef:
    """The same model with dropout off."""
    model = nnx.merge(graphdef, params, frozen)
    model.eval()
    return nnx.split(model, trained_filter(lora), ...)[0]


def init_state(params: nnx.State, frozen: nnx.State, tx: optax.GradientTransformation, seed: int) -> TrainState:
    return TrainState(
        params=params,
        frozen=frozen,
        opt_state=tx.init(params),
        step=jnp.zeros((), jnp.int32),
        rng=jax.random.key_data(jax.random.key(seed)),
        data_position=jnp.zeros((), jnp.int32),
    )


def with_dropout_keys(frozen: nnx.State, key: jax.Array) -> nnx.State:
    """`frozen` with every RNG stream (the dropout layers') keyed fold_in(key, its index), counting from zero.

    A new state of new variables, not a mutation: the variables of `frozen` belong to the caller's trace, and
    `nnx.remat` writes back into the variables it is given."""
    index = iter(range(1 << 30))

    def rekey(v):
        if isinstance(v, nnx.RngKey):
            return v.replace(jax.random.fold_in(key, next(index)))
        if isinstance(v, nnx.RngCount):
            return v.replace(jnp.zeros_like(v[...]))
        return v.replace(v.get_value())

    return jax.tree.map(rekey, frozen, is_leaf=lambda x: isinstance(x, nnx.Variable))


def accumulate(
    loss_fn: LossFn,
    graphdef: nnx.GraphDef,
    params: nnx.State,
    frozen: nnx.State,
    batch: Mapping[str, jax.Array],
    key: jax.Array,
) -> tuple[jax.Array, jax.Array, nnx.State, dict]:
    """(loss sum, count, gradient of the sum, aux sums) over the microbatches of `batch` (leading axis A)."""
    n_micro = jax.tree.leaves(batch)[0].shape[0]

    def micro(carry, inputs):
        total, count, grads, aux_sum = carry
        microbatch, index = inputs
        rng = jax.random.fold_in(key, index)

        def loss_sum(p):
            model = nnx.merge(graphdef, p, with_dropout_keys(frozen, rng))
            s, c, aux = loss_fn(model, microbatch, rng)
            return s, (c, aux)

        (s, (c, aux)), g = jax.value_and_grad(loss_sum, has_aux=True)(params)
        grads = jax.tree.map(jnp.add, grads, g)
        aux_sum = jax.tree.map(jnp.add, aux_sum, aux)
        return (total + s, count + c, grads, aux_sum), None

    aux_shape = jax.eval_shape(
        lambda p, f, b: loss_fn(nnx.merge(graphdef, p, with_dropout_keys(f, key)), b, key)[2],
        params,
        frozen,
        jax.tree.map(lambda x: x[0], batch),
    )
    zeros = jax.tree.map(jnp.zeros_like, params)
    init = (
        jnp.zeros((), jnp.float32),
        jnp.zeros((), jnp.float32),
        zeros,
        jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), aux_shape),
    )
    (total, count, grads, aux), _ = jax.lax.scan(micro, init, (batch, jnp.arange(n_micro)))
    return total, count, grads, aux


def make_train_step(
    loss_fn: LossFn, graphdef: nnx.GraphDef, tx: optax.GradientTransformation, lr: optax.Schedule
) -> Callable[[TrainState, Mapping[str, jax.Array]], tuple[TrainState, dict]]:
    """The pure step: batch leaves are [A, B/A, ...] (A microbatches)."""

    def train_step(state: TrainState, batch: Mapping[str, jax.Array]) -> tuple[TrainState, dict]:
        key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        total, count, grads, aux = accumulate(loss_fn, graphdef, state.params, state.frozen, batch, key)
        denom = jnp.maximum(count, 1.0)
        grads = jax.tree.map(lambda g: g / denom, grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {
            "loss": total / denom,
            "tokens": count,
            "grad_norm": optax.tree.norm(grads),
            "lr": jnp.asarray(lr(state.step), jnp.float32),
            **{k: v for k, v in aux.items()},
        }
        new = dataclasses.replace(
            state, params=params, opt_state=opt_state, step=state.step + 1, data_position=state.data_position + 1
        )
        return new, metrics

    return train_step


def make_eval_step(loss_fn: LossFn, graphdef: nnx.GraphDef) -> Callable[[TrainState, Mapping], tuple]:
    """(loss sum, count) of a batch with dropout off (`graphdef` from `eval_graphdef`); no gradients."""

    def eval_step(state: TrainState, batch: Mapping[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
        model = nnx.merge(graphdef, state.params, state.frozen)
        key = jax.random.wrap_key_data(state.rng)
        s, c, _ = loss_fn(model, jax.tree.map(lambda x: x.reshape(-1, *x.shape[2:]), batch), key)
        return s, c

    return eval_step


# --- shardings ----------------------------------------------------------------------------------------


def state_shardings(state: TrainState, mesh: Mesh) -> TrainState:
    """Variables by their logical axes (optimizer moments follow their parameters); scalars replicated."""
    replicated = NamedSharding(mesh, PartitionSpec())

    def one(x):
        if isinstance(x, nnx.Variable):
            return x.replace(variable_sharding(x, mesh))
        return replicated

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


BATCH_AXES = ("data", "fsdp")


def batch_sharding(mesh: Mesh, rows: int) -> NamedSharding:
    """[A, B, T] batch leaves: rows split over the mesh's data and fsdp axes (those that divide B)."""
    axes, size = [], 1
    for name in BATCH_AXES:
        if name in mesh.shape and rows % (size * mesh.shape[name]) == 0:
            axes.append(name)
            size *= mesh.shape[name]
    return NamedSharding(mesh, PartitionSpec(None, tuple(axes) or None))


def compile_step(
    train_step: Callable, state: TrainState, mesh: Mesh, rows: int
) -> Callable[[TrainState, Mapping[str, jax.Array]], tuple[TrainState, dict]]:
    """`jax.jit` with the state's and the batch's shardings (`rows` per microbatch) and the state donated."""
    state_sh = state_shardings(state, mesh)
    replicated = NamedSharding(mesh, PartitionSpec())
    return jax.jit(
        train_step,
        in_shardings=(state_sh, batch_sharding(mesh, rows)),
        out_shardings=(state_sh, replicated),
        donate_argnums=0,
    )


def place_state(state: TrainState, mesh: Mesh) -> TrainState:
    return jax.device_put(state, state_shardings(state, mesh))


def check_batch(batch: Mapping[str, jax.Array]) -> None:
    """Every leaf [A, B, T] with one shape."""
    leaves = list(batch.values())
    chex.assert_rank(leaves, 3)
    chex.assert_equal_shape(leaves)
