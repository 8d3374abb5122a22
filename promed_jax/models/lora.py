"""Low-rank adapters on the projections, switchable off (the reference model) and mergeable (export).

An adapter adds `scale * (dropout(x) @ A) @ B` to a projection `x @ W`, with `A: [*in, r]`, `B: [r, *out]`,
`scale = alpha / r`. `B` starts at zero, so a fresh adapter leaves the model unchanged. The adapter weights
are `LoRAParam`s (a subclass of `nnx.Param`), so an optimizer built with `wrt=LoRAParam` trains only them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from promed_jax.models.dense import dense


class LoRAParam(nnx.Param):
    """A trainable adapter weight (train these alone with `nnx.Optimizer(model, tx, wrt=LoRAParam)`)."""


# The model's parameters without the adapters.
BASE_PARAMS = nnx.All(nnx.Param, nnx.Not(LoRAParam))


class LoRA(nnx.Module):
    """The low-rank update of one projection with input shape `in_shape` and output shape `out_shape`."""

    def __init__(
        self,
        in_shape: Sequence[int],
        out_shape: Sequence[int],
        *,
        rank: int,
        scale: float,
        dropout: float,
        in_axes: Sequence[str | None],
        out_axes: Sequence[str | None],
        param_dtype: jnp.dtype,
        rngs: nnx.Rngs,
    ):
        in_shape, out_shape = tuple(in_shape), tuple(out_shape)
        fan_in = math.prod(in_shape)
        init_a = jax.nn.initializers.normal(stddev=fan_in**-0.5)
        self.a = LoRAParam(
            init_a(rngs.params(), (*in_shape, rank), param_dtype),
            out_sharding=(*in_axes, None),
            eager_sharding=False,
        )
        self.b = LoRAParam(
            jnp.zeros((rank, *out_shape), param_dtype),
            out_sharding=(None, *out_axes),
            eager_sharding=False,
        )
        self.scale = scale
        self.n_in = len(in_shape)
        # Deterministic unless the model is switched to training with `model.train()`.
        self.dropout = nnx.Dropout(dropout, deterministic=True, rngs=rngs) if dropout > 0 else None

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.dropout is not None:
            x = self.dropout(x)
        low = dense(x, self.a[...].astype(x.dtype), self.n_in)
        return dense(low, self.b[...].astype(x.dtype), 1) * jnp.asarray(self.scale, x.dtype)

    def delta(self) -> jax.Array:
        """The dense update `scale * A @ B` of the kernel, shape `[*in, *out]`."""
        return jnp.tensordot(self.a[...], self.b[...], axes=1) * self.scale


def merged_weights(model: nnx.Module) -> dict[str, jax.Array]:
    """The base parameters of `model` (flat path `layers.0.self_attn.q_proj.kernel` -> array) with every
    adapter folded into its kernel: `W + scale * A @ B`."""
    base = nnx.state(model, BASE_PARAMS)
    merged = {".".join(map(str, path)): v[...] for path, v in nnx.to_flat_state(base)}
    for path, module in nnx.iter_graph(model):
        if isinstance(module, LoRA):
            key = ".".join(map(str, (*path[:-1], "kernel")))
            merged[key] = (merged[key] + module.delta()).astype(merged[key].dtype)
    return merged


def merge_lora(model: nnx.Module) -> nnx.Module:
    """A copy of `model` without adapters whose kernels include them (same outputs as `use_lora=True`)."""
    from promed_jax.models.transformer import from_weights

    return from_weights(model.config.replace(lora_rank=0), merged_weights(model))
