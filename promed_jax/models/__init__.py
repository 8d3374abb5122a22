"""promed_jax.models: the NNX decoder (Llama/Qwen2), LoRA, and checkpoint I/O."""

from promed_jax.models.config import ModelConfig, RopeScaling
from promed_jax.models.lora import LoRA, LoRAParam
from promed_jax.models.transformer import (
    KVCache,
    Transformer,
    causal_mask,
    init_cache,
    positions_from_mask,
)

__all__ = [
    "KVCache",
    "LoRA",
    "LoRAParam",
    "ModelConfig",
    "RopeScaling",
    "Transformer",
    "causal_mask",
    "init_cache",
    "positions_from_mask",
]
