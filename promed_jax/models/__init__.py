"""promed_jax.models: the NNX decoder (Llama/Qwen2), LoRA, checkpoint I/O and the config-driven loader."""

from promed_jax.models.checkpoints import CheckpointError, load_gguf, load_hf, save_hf
from promed_jax.models.config import ModelConfig, RopeScaling
from promed_jax.models.loader import load_model
from promed_jax.models.lora import LoRA, LoRAParam, merge_lora, merged_weights
from promed_jax.models.transformer import (
    KVCache,
    Transformer,
    attend,
    causal_mask,
    from_weights,
    init_cache,
    positions_from_mask,
)

__all__ = [
    "CheckpointError",
    "KVCache",
    "LoRA",
    "LoRAParam",
    "ModelConfig",
    "RopeScaling",
    "Transformer",
    "attend",
    "causal_mask",
    "from_weights",
    "init_cache",
    "load_gguf",
    "load_hf",
    "load_model",
    "merge_lora",
    "merged_weights",
    "positions_from_mask",
    "save_hf",
]
