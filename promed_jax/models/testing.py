"""Test helpers: tiny random transformers (torch) checkpoints that our loader must reproduce exactly.

torch and transformers are imported lazily; only the reference tests use this module.
"""

from __future__ import annotations

import os
import pathlib
from typing import Any

import numpy as np

TINY_HF_CONFIG: dict[str, Any] = {
    "vocab_size": 256,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-6,
}


def random_hf_model(model_type: str = "llama", *, seed: int = 0, **config: Any) -> Any:
    """A tiny random `LlamaForCausalLM` / `Qwen2ForCausalLM` (fp32, eager attention) whose logits have a
    standard deviation well above 1, with random (not zero) biases and norm scales, so that a wrong rope
    theta, a missing bias or a wrong layout fails a 1e-4 tolerance."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    classes = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}
    config_cls, model_cls = classes[model_type]
    hf_config = config_cls(**{**TINY_HF_CONFIG, **config}, attn_implementation="eager")
    torch.manual_seed(seed)
    model = model_cls(hf_config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.normal_(1.0, 0.2)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.5)
            elif "embed_tokens" in name:
                p.normal_(0.0, 1.0)
            else:  # [out, in]: unit-variance outputs; lm_head a little hotter for logits with std > 1
                scale = 3.0 if name.startswith("lm_head") else 1.0
                p.normal_(0.0, scale / np.sqrt(p.shape[-1]))
    return model


def save_hf_model(model: Any, folder: str | os.PathLike, **kwargs: Any) -> pathlib.Path:
    """`save_pretrained` as safetensors (kwargs: max_shard_size, ...)."""
    folder = pathlib.Path(folder)
    model.save_pretrained(folder, safe_serialization=True, **kwargs)
    return folder


def torch_logits(model: Any, tokens: np.ndarray, valid: np.ndarray | None = None, positions: np.ndarray | None = None):
    """float32 [B, T, V] logits of a transformers model (attention mask = `valid`, position ids = `positions`)."""
    import torch

    kwargs = {}
    if valid is not None:
        kwargs["attention_mask"] = torch.tensor(np.asarray(valid, dtype=np.int64))
    if positions is not None:
        kwargs["position_ids"] = torch.tensor(np.asarray(positions, dtype=np.int64))
    with torch.no_grad():
        out = model(input_ids=torch.tensor(np.asarray(tokens, dtype=np.int64)), **kwargs)
    return out.logits.float().numpy()
