"""Per-token log-probabilities over vocabulary chunks: the fp32 logits `[B, T, V]` never exist at once.

`token_logprobs(hidden [B, T, D], head [D, V], targets [B, T])` walks the vocabulary in chunks of `chunk`
columns with an online log-sum-exp (running max and rescaled sum of exponentials, as in blockwise softmax),
picking each target's logit from the chunk that holds it. The backward pass is written out (a custom VJP): it
keeps only the log-sum-exp per token, recomputes each block's logits, and forms the block's gradient
`g * (onehot(target) - softmax)` directly, so it too holds one `[B, T, chunk]` block at a time and runs one
product more than a materialized softmax would (four against three). Differentiating the online log-sum-exp
through a rematerialised scan instead, as this module first did, cost 2.0 s against 1.4 for SmolLM2's head at
1,024 tokens on the CPU (the chain through the running max and sum, and the gradient of the target pick). At
8k tokens and Qwen's 152k vocabulary a row's full fp32 logits would take about 5 GB; a chunk of 8,192 columns
takes 256 MB.

The SFT loss (`masked_nll`) and the GRPO ratio and KL terms both read these log-probabilities.
"""

from __future__ import annotations

import functools

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
    return _chunked_logprobs(hidden, head.astype(hidden.dtype), targets.astype(jnp.int32), width, vocab)


def _chunk_logits(hidden: jax.Array, head: jax.Array, index: jax.Array, width: int, vocab: int):
    """(the head's columns of block `index` [D, width], their fp32 logits [B, T, width], padding at -inf)."""
    start = index * width
    w = jax.lax.dynamic_slice_in_dim(head, start, width, axis=1)
    logits = jnp.einsum("btd,dv->btv", hidden, w, preferred_element_type=jnp.float32)
    return w, jnp.where(start + jnp.arange(width, dtype=jnp.int32) < vocab, logits, -jnp.inf)


def _forward(hidden, head, targets, width, vocab):
    """(the target's logit, log-sum-exp of all logits), both float32 [B, T], one block at a time."""

    def block(carry, index):
        running_max, running_sum, picked = carry
        _, logits = _chunk_logits(hidden, head, index, width, vocab)
        new_max = jnp.maximum(running_max, logits.max(axis=-1))
        running_sum = running_sum * jnp.exp(running_max - new_max) + jnp.exp(logits - new_max[..., None]).sum(-1)
        local = targets - index * width
        inside = (local >= 0) & (local < width)
        hit = jnp.take_along_axis(logits, jnp.clip(local, 0, width - 1)[..., None], axis=-1)[..., 0]
        return (new_max, running_sum, picked + jnp.where(inside, hit, 0.0)), None

    shape = targets.shape
    init = (jnp.full(shape, -jnp.inf, jnp.float32), jnp.zeros(shape, jnp.float32), jnp.zeros(shape, jnp.float32))
    (running_max, running_sum, picked), _ = jax.lax.scan(block, init, jnp.arange(head.shape[1] // width))
    return picked, running_max + jnp.log(running_sum)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _chunked_logprobs(hidden, head, targets, width, vocab):
    picked, lse = _forward(hidden, head, targets, width, vocab)
    return picked - lse


def _chunked_fwd(hidden, head, targets, width, vocab):
    picked, lse = _forward(hidden, head, targets, width, vocab)
    return picked - lse, (hidden, head, targets, lse)


def _chunked_bwd(width, vocab, residuals, g):
    """d logp[t] / d logits = onehot(target) - softmax: per block, the logits are recomputed from the saved
    log-sum-exp, and the block's share of both gradients is two products with the head's columns."""
    hidden, head, targets, lse = residuals
    columns = jnp.arange(width, dtype=jnp.int32)

    def block(d_hidden, index):
        w, logits = _chunk_logits(hidden, head, index, width, vocab)
        onehot = (targets - index * width)[..., None] == columns
        d_logits = (g[..., None] * (onehot - jnp.exp(logits - lse[..., None]))).astype(hidden.dtype)
        d_hidden = d_hidden + jnp.einsum("btv,dv->btd", d_logits, w, preferred_element_type=jnp.float32)
        d_w = jnp.einsum("btd,btv->dv", hidden, d_logits, preferred_element_type=jnp.float32)
        return d_hidden, d_w.astype(head.dtype)

    d_hidden, d_blocks = jax.lax.scan(block, jnp.zeros(hidden.shape, jnp.float32), jnp.arange(head.shape[1] // width))
    d_head = d_blocks.transpose(1, 0, 2).reshape(head.shape)  # [n, D, width] -> [D, n * width]
    return d_hidden.astype(hidden.dtype), d_head, None


_chunked_logprobs.defvjp(_chunked_fwd, _chunked_bwd)


def masked_nll(logprobs: jax.Array, weights: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(sum of -log p over the weighted tokens, their count): float32 [B, T] x bool/float [B, T] -> two
    scalars, so that accumulation divides by the global count."""
    chex.assert_equal_shape((logprobs, weights))
    weights = weights.astype(jnp.float32)
    return -(logprobs * weights).sum(), weights.sum()
