"""Per-token log-probabilities over vocabulary chunks: the fp32 logits `[B, T, V]` never exist at once.

`token_logprobs(hidden [B, T, D], head [D, V], targets [B, T])` walks the vocabulary in chunks of `chunk`
columns with an online log-sum-exp (running max and rescaled sum of exponentials, as in blockwise softmax),
picking each target's logit from the chunk that holds it. The chunk body is rematerialised, so the backward
pass also holds one `[B, T, chunk]` block at a time. At 8k tokens and Qwen's 152k vocabulary a row's full
fp32 logits would take about 5 GB; a chunk of 8,192 columns takes 256 MB.

The SFT loss (`masked_nll`) and the GRPO ratio and KL terms both read these log-probabilities.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

DEFAULT_CHUNK = 8192


def chunk_width(vocab: int, chunk: int) -> int:
    """The widest divisor of `vocab` that is at most `chunk` when it is at least half of `chunk` (no padding
    then), else `chunk` itself (the head is padded): SmolLM2's 49,152 -> 8,192."""
    chunk = min(chunk, vocab)
    for width in range(chunk, max(chunk // 2, 1) - 1, -1):
        if vocab % width == 0:
            return width
    return chunk


def token_logprobs(hidden: jax.Array, head: jax.Array, targets: jax.Array, *, chunk: int = DEFAULT_CHUNK) -> jax.Array:
    """log softmax(hidden @ head)[target] per token.

    Args:
      hidden: [B, T, D] final hidden states (any float dtype; products accumulate in fp32).
      head: [D, V] output projection.
      targets: int [B, T] the token whose log-probability is wanted at each position.
      chunk: vocabulary columns per block.

    Returns:
      float32 [B, T].
    """
    chex.assert_rank(hidden, 3)
    chex.assert_rank(head, 2)
    chex.assert_equal_shape_prefix((hidden, targets), 2)
    d, vocab = head.shape
    chex.assert_axis_dimension(hidden, 2, d)
    width = chunk_width(vocab, chunk)
    n_chunks = -(-vocab // width)
    if n_chunks * width != vocab:
        head = jnp.pad(head, ((0, 0), (0, n_chunks * width - vocab)))
    head = head.astype(hidden.dtype)
    targets = targets.astype(jnp.int32)
    columns = jnp.arange(width, dtype=jnp.int32)

    @jax.checkpoint
    def block(carry, index):
        running_max, running_sum, picked = carry
        start = index * width
        w = jax.lax.dynamic_slice_in_dim(head, start, width, axis=1)
        logits = jnp.einsum("btd,dv->btv", hidden, w, preferred_element_type=jnp.float32)
        logits = jnp.where(start + columns < vocab, logits, -jnp.inf)
        new_max = jnp.maximum(running_max, logits.max(axis=-1))
        running_sum = running_sum * jnp.exp(running_max - new_max) + jnp.exp(logits - new_max[..., None]).sum(-1)
        local = targets - start
        inside = (local >= 0) & (local < width)
        hit = jnp.take_along_axis(logits, jnp.clip(local, 0, width - 1)[..., None], axis=-1)[..., 0]
        return (new_max, running_sum, picked + jnp.where(inside, hit, 0.0)), None

    shape = targets.shape
    init = (jnp.full(shape, -jnp.inf, jnp.float32), jnp.zeros(shape, jnp.float32), jnp.zeros(shape, jnp.float32))
    (running_max, running_sum, picked), _ = jax.lax.scan(block, init, jnp.arange(n_chunks))
    return picked - (running_max + jnp.log(running_sum))


def masked_nll(logprobs: jax.Array, weights: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(sum of -log p over the weighted tokens, their count): float32 [B, T] x bool/float [B, T] -> two
    scalars, so that accumulation divides by the global count."""
    chex.assert_equal_shape((logprobs, weights))
    weights = weights.astype(jnp.float32)
    return -(logprobs * weights).sum(), weights.sum()
