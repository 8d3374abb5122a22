"""promed_jax.sampling: batched KV-cache sampling and continuation scoring."""

from promed_jax.sampling.sampler import (
    SampleOutput,
    SamplerState,
    SamplingConfig,
    decode_texts,
    generate,
    stop_sequences_for,
    truncate_at_stop_strings,
)
from promed_jax.sampling.scorer import ScoreOutput, score_continuations

__all__ = [
    "SampleOutput",
    "SamplerState",
    "SamplingConfig",
    "ScoreOutput",
    "decode_texts",
    "generate",
    "score_continuations",
    "stop_sequences_for",
    "truncate_at_stop_strings",
]
