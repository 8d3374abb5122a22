"""The SFT loss: cross-entropy on the doctor's tokens only, log-probs over vocabulary chunks."""

from __future__ import annotations

import functools
from collections.abc import Mapping

import jax
from flax import nnx

from promed_jax.models.transformer import causal_mask, positions_from_mask
from promed_jax.training.logprobs import DEFAULT_CHUNK, masked_nll, token_logprobs


def sequence_logprobs(
    model: nnx.Module, batch: Mapping[str, jax.Array], *, chunk: int = DEFAULT_CHUNK, use_lora: bool = True
) -> jax.Array:
    """float32 [B, T]: log p(targets[t] | tokens[:t + 1]) under `model` for a right-padded batch
    (`tokens`, `targets` int [B, T], `valid` bool [B, T])."""
    valid = batch["valid"]
    hidden, _ = model.hidden_states(
        batch["tokens"], positions_from_mask(valid), causal_mask(valid), use_lora=use_lora, causal=True
    )
    return token_logprobs(hidden, model.head_kernel(), batch["targets"], chunk=chunk)


def sft_loss(
    model: nnx.Module, batch: Mapping[str, jax.Array], rng: jax.Array, *, chunk: int = DEFAULT_CHUNK
) -> tuple[jax.Array, jax.Array, dict]:
    """(sum of -log p over doctor tokens, their count, {}): batch also holds `weights` bool [B, T]."""
    del rng  # dropout keys are set on the model by the step
    s, c = masked_nll(sequence_logprobs(model, batch, chunk=chunk), batch["weights"])
    return s, c, {}


def make_sft_loss(chunk: int):
    return functools.partial(sft_loss, chunk=chunk)
