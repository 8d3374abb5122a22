"""promed_jax.sampling: batched KV-cache sampling and continuation scoring."""

from promed_jax.sampling.keys import row_key, row_keys
from promed_jax.sampling.sampler import (
    Controls,
    SampledTurn,
    SampleOutput,
    SamplerState,
    SamplingConfig,
    decode_texts,
    generate,
    sampled_turns,
    stop_sequences_for,
    truncate_at_stop_strings,
)
from promed_jax.sampling.scorer import ScoreOutput, score_continuations

__all__ = [
    "Controls",
    "SampleOutput",
    "SampledTurn",
    "SamplerState",
    "SamplingConfig",
    "ScoreOutput",
    "decode_texts",
    "generate",
    "row_key",
    "row_keys",
    "sampled_turns",
    "score_continuations",
    "stop_sequences_for",
    "truncate_at_stop_strings",
]
