"""One NNX decoder for the Llama and Qwen2 families, with explicit positions and token-level masks.

Call: `model(tokens [B, T], positions [B, T], mask [B, T, S], cache=None, cache_index=None, use_lora=True)
-> (logits float32 [B, T, V], cache)`. The Shapley stage masks fact spans out of one sequence, so the mask is
any token-level mask, not only causal+padding.

Layout: every kernel is stored `[in, out]` (q: `[D, H, hd]`, o: `[H, hd, D]`, gate/up: `[D, F]`, down:
`[F, D]`) because XLA:CPU streams `x @ W` with that layout much faster than a transposed product, and decode
at batch 1 is bound by reading the weights. For a tied embedding `[V, D]` the logits would be the transposed
product `h @ E.T`; `Transformer.materialize_head()` stores a `[D, V]` copy for inference (sampling, scoring)
while training keeps using the tied embedding.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from promed_jax.models.config import ModelConfig
from promed_jax.models.dense import dense
from promed_jax.models.lora import LoRA

Axes = tuple[str | None, ...]


class InferenceHead(nnx.Variable):
    """A materialized `[D, V]` copy of a tied embedding, for inference only (not an `nnx.Param`: optimizers
    built with `wrt=nnx.Param` ignore it)."""


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """Per-layer keys and values, each `[B, S, kv_heads, head_dim]` (S cache slots)."""

    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]

    @property
    def size(self) -> int:
        return self.k[0].shape[1]

    def tuples(self) -> tuple[tuple[jax.Array, ...], tuple[jax.Array, ...]]:
        """(keys per layer, values per layer)."""
        return self.k, self.v

    def grow(self, batch: int, extra_slots: int) -> KVCache:
        """This cache broadcast to `batch` rows, with `extra_slots` empty slots appended: e.g. a shared prompt
        prefix computed once for one row, then continued separately by every row. Use it rather than
        reshaping the arrays yourself, so that the cache layout can change in one place."""

        def grow_one(x: jax.Array) -> jax.Array:
            x = jnp.broadcast_to(x, (batch, *x.shape[1:]))
            return jnp.pad(x, ((0, 0), (0, extra_slots), (0, 0), (0, 0)))

        return KVCache(k=tuple(map(grow_one, self.k)), v=tuple(map(grow_one, self.v)))


def init_cache(cfg: ModelConfig, batch: int, size: int, dtype: jnp.dtype | None = None) -> KVCache:
    """An all-zero cache of `size` slots per row."""
    shape = (batch, size, cfg.num_kv_heads, cfg.head_dim)
    dtype = cfg.compute_dtype if dtype is None else dtype

    def zeros() -> tuple[jax.Array, ...]:  # distinct buffers, so that the cache can be donated
        return tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers))

    return KVCache(k=zeros(), v=zeros())


def causal_mask(valid: jax.Array) -> jax.Array:
    """bool [B, T] (False = padding) -> bool [B, T, T]: query i attends valid keys j <= i."""
    t = valid.shape[-1]
    causal = jnp.tril(jnp.ones((t, t), dtype=bool))
    return causal[None] & valid[:, None, :] & valid[:, :, None]


def positions_from_mask(valid: jax.Array) -> jax.Array:
    """bool [B, T] -> int32 [B, T]: the index of each kept token among the kept tokens (left padding gets -1,
    clipped to 0; those positions are never attended)."""
    return jnp.maximum(jnp.cumsum(valid.astype(jnp.int32), axis=-1) - 1, 0)


def _param(value: jax.Array, axes: Axes) -> nnx.Param:
    # Logical axis names only; `promed_jax.sharding` maps them to mesh axes, so no eager placement here.
    return nnx.Param(value, out_sharding=axes, eager_sharding=False)


def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
    """float32 [head_dim / 2] rotary inverse frequencies, with Llama-3.1 scaling when configured."""
    exponents = np.arange(0, cfg.head_dim, 2, dtype=np.float32) / np.float32(cfg.head_dim)
    # theta ** e rounded to float32, then a float32 reciprocal: bit-identical to the torch reference, which
    # matters at large positions (one ulp of a frequency is 2e-4 rad at position 3000).
    inv_freq = np.float32(1.0) / np.power(np.float64(cfg.rope_theta), exponents.astype(np.float64)).astype(np.float32)
    s = cfg.rope_scaling
    if s is None:
        return inv_freq
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * np.pi / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def rope_tables(cfg: ModelConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """int [B, T] -> (cos, sin), each float32 [B, T, 1, head_dim / 2] (broadcast over heads)."""
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(rope_inv_freq(cfg))
    return jnp.cos(angles)[:, :, None, :], jnp.sin(angles)[:, :, None, :]


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [B, T, N, hd] rotated in the half-split (not interleaved) convention of Hugging Face checkpoints."""
    x1, x2 = jnp.split(x, 2, axis=-1)
    cos, sin = cos.astype(x.dtype), sin.astype(x.dtype)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


class RMSNorm(nnx.Module):
    def __init__(self, cfg: ModelConfig):
        self.scale = _param(jnp.ones((cfg.hidden_size,), cfg.weight_dtype), ("embed",))
        self.eps = cfg.rms_norm_eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.scale[...].astype(x.dtype) * normed.astype(x.dtype)


class Projection(nnx.Module):
    """`x [..., *in] -> [..., *out]` with kernel `[*in, *out]`, optional bias `[*out]` and LoRA adapter."""

    def __init__(
        self,
        cfg: ModelConfig,
        name: str,
        in_shape: Sequence[int],
        out_shape: Sequence[int],
        in_axes: Axes,
        out_axes: Axes,
        *,
        bias: bool,
        rngs: nnx.Rngs,
    ):
        in_shape, out_shape = tuple(in_shape), tuple(out_shape)
        fan_in = int(np.prod(in_shape))
        init = jax.nn.initializers.normal(stddev=fan_in**-0.5)
        self.kernel = _param(
            init(rngs.params(), (*in_shape, *out_shape), cfg.weight_dtype),
            (*in_axes, *out_axes),
        )
        self.bias = _param(jnp.zeros(out_shape, cfg.weight_dtype), out_axes) if bias else None
        self.n_in = len(in_shape)
        self.dtype = cfg.compute_dtype
        self.lora = (
            LoRA(
                in_shape,
                out_shape,
                rank=cfg.lora_rank,
                scale=cfg.lora_scale,
                dropout=cfg.lora_dropout,
                in_axes=in_axes,
                out_axes=out_axes,
                param_dtype=cfg.weight_dtype,
                rngs=rngs,
            )
            if cfg.lora_rank and name in cfg.lora_targets
            else None
        )

    def __call__(self, x: jax.Array, use_lora: bool = True) -> jax.Array:
        x = x.astype(self.dtype)
        y = dense(x, self.kernel[...].astype(self.dtype), self.n_in)
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        if use_lora and self.lora is not None:
            y = y + self.lora(x)
        return y


def attend(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, scale: float, *, causal_block: int = 0
) -> jax.Array:
    """Grouped-query attention: q [B, T, KV, G, hd], k/v [B, S, KV, hd], mask bool [B, T, S] -> [B, T, KV, G, hd].

    Scores and softmax in float32. A masked-out row (padding) gets uniform weights, never NaN.

    `causal_block > 0` promises a causal mask over S == T keys (no query attends a later key, as
    `causal_mask` builds): the queries then go in blocks of `causal_block` rows, each against the keys up to
    its last row, so the blocks above the diagonal are never computed (at T = n blocks, (n + 1) / 2n of the
    work and of the scores' memory). Every row with an attended key gets the same value; an all-masked
    (padding) row is uniform over its block's keys instead of all S.
    """
    t = q.shape[1]
    if causal_block and t > causal_block and k.shape[1] == t:
        starts = range(0, t, causal_block)
        return jnp.concatenate(
            [
                _attend(
                    q[:, s : s + causal_block],
                    k[:, : s + causal_block],
                    v[:, : s + causal_block],
                    mask[:, s : s + causal_block, : s + causal_block],
                    scale,
                )
                for s in starts
            ],
            axis=1,
        )
    return _attend(q, k, v, mask, scale)


def _attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, scale: float) -> jax.Array:
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32)
    scores = jnp.where(mask[:, None, None, :, :], scores * scale, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
    return jnp.einsum("bkgts,bskd->btkgd", probs, v)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        d, h, kv, hd = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        qkv_bias = cfg.attention_bias
        self.q_proj = Projection(
            cfg,
            "q_proj",
            (d,),
            (h, hd),
            ("embed",),
            ("heads", None),
            bias=qkv_bias,
            rngs=rngs,
        )
        self.k_proj = Projection(
            cfg,
            "k_proj",
            (d,),
            (kv, hd),
            ("embed",),
            ("kv_heads", None),
            bias=qkv_bias,
            rngs=rngs,
        )
        self.v_proj = Projection(
            cfg,
            "v_proj",
            (d,),
            (kv, hd),
            ("embed",),
            ("kv_heads", None),
            bias=qkv_bias,
            rngs=rngs,
        )
        self.o_proj = Projection(
            cfg,
            "o_proj",
            (h, hd),
            (d,),
            ("heads", None),
            ("embed",),
            bias=cfg.attention_out_bias,
            rngs=rngs,
        )
        self.groups = h // kv
        self.scale = hd**-0.5

    def __call__(
        self,
        x: jax.Array,
        cos: jax.Array,
        sin: jax.Array,
        mask: jax.Array,
        kv_cache: tuple[jax.Array, jax.Array] | None,
        cache_index: jax.Array | None,
        use_lora: bool,
        causal_block: int = 0,
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
        q = apply_rope(self.q_proj(x, use_lora), cos, sin)  # [B, T, H, hd]
        k = apply_rope(self.k_proj(x, use_lora), cos, sin)  # [B, T, KV, hd]
        v = self.v_proj(x, use_lora)
        if kv_cache is not None:
            start = (0, cache_index, 0, 0)
            k = jax.lax.dynamic_update_slice(kv_cache[0], k.astype(kv_cache[0].dtype), start)
            v = jax.lax.dynamic_update_slice(kv_cache[1], v.astype(kv_cache[1].dtype), start)
            kv_cache = (k, v)
        b, t, h, hd = q.shape
        q = q.reshape(b, t, h // self.groups, self.groups, hd)
        out = attend(q, k.astype(q.dtype), v.astype(q.dtype), mask, self.scale, causal_block=causal_block)
        out = out.reshape(b, t, h, hd)
        return self.o_proj(out, use_lora), kv_cache


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        d, f = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = Projection(cfg, "gate_proj", (d,), (f,), ("embed",), ("mlp",), bias=False, rngs=rngs)
        self.up_proj = Projection(cfg, "up_proj", (d,), (f,), ("embed",), ("mlp",), bias=False, rngs=rngs)
        self.down_proj = Projection(cfg, "down_proj", (f,), (d,), ("mlp",), ("embed",), bias=False, rngs=rngs)

    def __call__(self, x: jax.Array, use_lora: bool) -> jax.Array:
        return self.down_proj(
            jax.nn.silu(self.gate_proj(x, use_lora)) * self.up_proj(x, use_lora),
            use_lora,
        )


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.input_layernorm = RMSNorm(cfg)
        self.self_attn = Attention(cfg, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(cfg)
        self.mlp = MLP(cfg, rngs=rngs)

    def __call__(self, x, cos, sin, mask, kv_cache, cache_index, use_lora: bool, causal_block: int = 0):
        attn, kv_cache = self.self_attn(
            self.input_layernorm(x), cos, sin, mask, kv_cache, cache_index, use_lora, causal_block
        )
        x = x + attn
        return x + self.mlp(self.post_attention_layernorm(x), use_lora), kv_cache


class Transformer(nnx.Module):
    """The decoder. Parameter names follow Hugging Face's (`layers[i].self_attn.q_proj.kernel`, ...), which
    keeps the checkpoint key maps short."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        d = cfg.hidden_size
        embed_init = jax.nn.initializers.normal(stddev=d**-0.5)
        self.embed = _param(
            embed_init(rngs.params(), (cfg.vocab_size, d), cfg.weight_dtype),
            ("vocab", "embed"),
        )
        self.layers = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg)
        head_init = jax.nn.initializers.normal(stddev=d**-0.5)
        self.lm_head = (
            None
            if cfg.tie_word_embeddings
            else _param(
                head_init(rngs.params(), (d, cfg.vocab_size), cfg.weight_dtype),
                ("embed", "vocab"),
            )
        )
        self.inference_head = nnx.data(None)

    def materialize_head(self) -> None:
        """For a tied embedding, store a `[D, V]` copy used by the forward (fast logits at inference).

        Call it once after loading or training, before sampling or scoring; never during training (the copy
        is not tied: gradients would not reach the embedding through it). No-op for an untied head.
        """
        if self.config.tie_word_embeddings:
            self.inference_head = nnx.data(
                InferenceHead(
                    jnp.asarray(self.embed[...]).T.copy(),
                    out_sharding=("embed", "vocab"),
                    eager_sharding=False,
                )
            )

    def head_kernel(self) -> jax.Array:
        """The output projection `[D, V]`: the materialized copy, the separate head, or the tied embedding."""
        if self.inference_head is not None:
            return self.inference_head[...]
        if self.lm_head is not None:
            return self.lm_head[...]
        return self.embed[...].T

    def __call__(
        self,
        tokens: jax.Array,
        positions: jax.Array,
        mask: jax.Array,
        *,
        cache: KVCache | None = None,
        cache_index: jax.Array | None = None,
        use_lora: bool = True,
    ) -> tuple[jax.Array, KVCache | None]:
        """tokens int32 [B, T], positions int32 [B, T], mask bool [B, T, S] -> (logits float32 [B, T, V], cache).

        Without a cache S == T. With a cache of S slots the new keys/values go to slots
        `[cache_index, cache_index + T)` of every row and the queries attend all S slots under `mask`.
        """
        x, cache = self.hidden_states(tokens, positions, mask, cache=cache, cache_index=cache_index, use_lora=use_lora)
        logits = jnp.dot(x, self.head_kernel().astype(x.dtype), preferred_element_type=jnp.float32)
        return logits, cache

    def hidden_states(
        self,
        tokens: jax.Array,
        positions: jax.Array,
        mask: jax.Array,
        *,
        cache: KVCache | None = None,
        cache_index: jax.Array | None = None,
        use_lora: bool = True,
        causal: bool = False,
    ) -> tuple[jax.Array, KVCache | None]:
        """As `__call__`, but the final normed hidden states `[B, T, D]` (compute dtype) instead of the logits,
        for losses that apply the head in vocabulary chunks (`promed_jax.training.logprobs`).

        `causal=True` (no cache) promises that `mask` is causal, as the training losses' `causal_mask` is:
        attention then skips the key blocks above the diagonal (`attend`, blocks of `config.attention_block`
        queries). The Shapley game and the sampler attend through a KV cache and leave it off."""
        if causal and cache is not None:
            raise ValueError("causal=True is for the cache-free forward")
        cfg = self.config
        if (cache is None) != (cache_index is None):
            raise ValueError("pass cache and cache_index together")
        expected_s = tokens.shape[1] if cache is None else cache.size
        if mask.shape != (*tokens.shape, expected_s) or positions.shape != tokens.shape:
            raise ValueError(
                f"tokens {tokens.shape}, positions {positions.shape}, mask {mask.shape}: expected positions "
                f"[B, T] and mask [B, T, {expected_s}]"
            )
        x = jnp.take(self.embed[...], tokens, axis=0).astype(cfg.compute_dtype)
        cos, sin = rope_tables(cfg, positions)

        block_size = cfg.attention_block if causal else 0
        if cfg.remat and cache is None:
            return self.norm(_scanned_blocks(self.layers, x, cos, sin, mask, use_lora, block_size)), None

        def step(block: Block, x: jax.Array, layer_cache: tuple[jax.Array, jax.Array] | None):
            return block(x, cos, sin, mask, layer_cache, cache_index, use_lora, block_size)

        if cfg.remat:
            step = nnx.remat(step)
        new_k, new_v = [], []
        for i, block in enumerate(self.layers):
            layer_cache = None if cache is None else (cache.k[i], cache.v[i])
            x, layer_cache = step(block, x, layer_cache)
            if layer_cache is not None:
                new_k.append(layer_cache[0])
                new_v.append(layer_cache[1])
        return self.norm(x), (None if cache is None else KVCache(k=tuple(new_k), v=tuple(new_v)))


def _scanned_blocks(layers, x, cos, sin, mask, use_lora: bool, causal_block: int = 0) -> jax.Array:
    """The blocks as one `lax.scan` of a rematerialised block over their stacked variables (no KV cache).

    Why not `nnx.remat` per block in the Python loop: in an unrolled loop XLA is free to schedule every
    block's recomputation before the backward pass needs it, and on the CPU it does (jax-ml/jax#19822): a
    SmolLM2 SFT step of 8 x 1,024 tokens asked for 35.8 GiB with remat and 37.2 GiB without. Inside a scan each
    iteration's recomputation waits for its turn; the same step then needs 2.6 GiB
    (experiments/sft_memory.py). The stacking copies the layers' weights once per call (inside the jit), and
    the blocks' RNG streams (LoRA dropout) advance exactly as in the loop: each block keeps its own.
    """
    graphdef = nnx.graphdef(layers[0])
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *[nnx.state(block) for block in layers])

    @jax.checkpoint
    def body(x, state):
        block = nnx.merge(graphdef, state)
        y, _ = block(x, cos, sin, mask, None, None, use_lora, causal_block)
        return y, nnx.state(block, nnx.RngState)

    x, rng_states = jax.lax.scan(body, x, stacked)
    for i, block in enumerate(layers):
        nnx.update(block, jax.tree.map(lambda a, i=i: a[i], rng_states))
    return x


def from_weights(cfg: ModelConfig, weights: Mapping[str, jax.Array]) -> Transformer:
    """A model whose every variable comes from `weights` (flat path `layers.0.mlp.up_proj.kernel` -> array),
    without random initialisation; for configs whose variables are all parameters (no LoRA dropout)."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
    for path, variable in nnx.to_flat_state(state):
        key = ".".join(map(str, path))
        if key not in weights:
            raise KeyError(f"no weight for {key}")
        variable.set_value(weights[key])
    return nnx.merge(graphdef, state)
