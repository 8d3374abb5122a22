"""Log-probabilities of given continuation tokens after given prompts, for a batch, in one jitted forward.

Each row is `prompt + continuation`, RIGHT-aligned in a [B, T] buffer (left padding), so that every
continuation ends in the last column and the log-probs are read from one [B, C] window of the logits.
Batch, T and C are rounded up to powers of two so that other sizes reuse the compiled forward.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from promed_jax.models.transformer import causal_mask, positions_from_mask
from promed_jax.sampling.sampler import MIN_PROMPT_BUCKET, left_padded, next_power_of_two


@dataclasses.dataclass(frozen=True)
class ScoreOutput:
    """Per-token log-probabilities of the continuations (host numpy arrays).

    Attributes:
      logprobs: float32[B, C] log p(continuation[b][j] | prompt[b], continuation[b][:j]); 0 where masked.
      mask: bool[B, C] True for the first `len(continuation[b])` entries of row b.
    """

    logprobs: np.ndarray
    mask: np.ndarray

    def totals(self) -> np.ndarray:
        """float32[B] the summed log-probability of each continuation."""
        return self.logprobs.sum(axis=-1)

    def means(self) -> np.ndarray:
        """float32[B] the mean per-token log-probability of each continuation."""
        return self.logprobs.sum(axis=-1) / np.maximum(self.mask.sum(axis=-1), 1)


def score_continuations(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    prompts: Sequence[Sequence[int]],
    continuations: Sequence[Sequence[int]],
    *,
    pad_id: int = 0,
    use_lora: bool = True,
) -> ScoreOutput:
    """Log-probabilities of `continuations[b]` (token ids) after `prompts[b]` under `(graphdef, params)`."""
    if len(prompts) != len(continuations) or not prompts:
        raise ValueError(f"score_continuations: {len(prompts)} prompts and {len(continuations)} continuations")
    for b, (prompt, continuation) in enumerate(zip(prompts, continuations, strict=True)):
        if not prompt or not continuation:
            raise ValueError(f"score_continuations: row {b} has an empty prompt or continuation")
    rows = [[*prompt, *continuation] for prompt, continuation in zip(prompts, continuations, strict=True)]
    batch = next_power_of_two(len(rows))
    total = next_power_of_two(max(len(row) for row in rows), MIN_PROMPT_BUCKET)
    window = min(next_power_of_two(max(len(c) for c in continuations)), total - 1)
    tokens, valid = left_padded(rows, batch, total, pad_id)
    logprobs = np.asarray(_window_logprobs(graphdef, params, tokens, valid, window=window, use_lora=use_lora))

    lengths = np.array([len(c) for c in continuations])
    out = np.zeros((len(prompts), int(lengths.max())), dtype=np.float32)
    mask = np.arange(out.shape[1])[None, :] < lengths[:, None]
    for b, n in enumerate(lengths):
        out[b, :n] = logprobs[b, window - n :]
    return ScoreOutput(logprobs=out, mask=mask)


@functools.partial(jax.jit, static_argnames=("graphdef", "window", "use_lora"))
def _window_logprobs(graphdef, params, tokens, valid, *, window: int, use_lora: bool) -> jax.Array:
    """float32[B, window]: log-prob of each of the last `window` tokens of every row given what precedes it."""
    model = nnx.merge(graphdef, params)
    logits, _ = model(tokens, positions_from_mask(valid), causal_mask(valid), use_lora=use_lora)
    predicting = logits[:, -window - 1 : -1].astype(jnp.float32)  # [B, window, V]
    targets = tokens[:, -window:]
    picked = jnp.take_along_axis(predicting, targets[..., None], axis=-1)[..., 0]
    return picked - jax.nn.logsumexp(predicting, axis=-1)
