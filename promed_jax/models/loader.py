"""`load_model(config.model) -> (model, tokenizer)`: the one place a config section becomes a model."""

from __future__ import annotations

import pathlib
from collections.abc import Mapping
from typing import Any

from flax import nnx
from jax.sharding import Mesh

from promed_jax.models.checkpoints import load_gguf, load_hf
from promed_jax.models.config import ModelConfig
from promed_jax.models.transformer import Transformer
from promed_jax.sharding import shard_model

KINDS = ("tiny", "hf", "gguf")


def _our_fields(section: Mapping[str, Any]) -> dict[str, Any]:
    """The config fields that are ours, not the checkpoint's: numerics, remat and LoRA."""
    names = ("dtype", "param_dtype", "remat", "lora_rank", "lora_alpha", "lora_dropout", "lora_targets")
    fields = {name: section[name] for name in names if name in section}
    if "lora_targets" in fields:
        fields["lora_targets"] = tuple(fields["lora_targets"])
    return fields


def load_model(
    section: Mapping[str, Any], *, mesh: Mesh | None = None, tokenizer: Any = None
) -> tuple[Transformer, Any]:
    """Build the model and its tokenizer from the `model` config section (`configs/base.py: model_config`).

    kind `tiny`: a random model (seeded) sized by `section.tiny`, vocabulary from `tokenizer` (default: the tiny
    tokenizer of `text.tokenizer`);
    `hf`: a Hugging Face folder at `section.path`; `gguf`: a GGUF file at `section.path`, SmolLM2-135M-Instruct
    from its package when the path is empty. With a mesh every array is placed under its logical sharding.
    For sampling and scoring, call `model.materialize_head()` on the result (tied embeddings).
    """
    from promed_jax.text.tokenizer import build_tiny_tokenizer, load_tokenizer

    kind = section.get("kind", "tiny")
    seed = int(section.get("seed", 0))
    path = str(section.get("path", "") or "")
    ours = _our_fields(section)
    if kind == "tiny":
        tokenizer = tokenizer if tokenizer is not None else build_tiny_tokenizer()
        cfg = ModelConfig.tiny(vocab_size=len(tokenizer), **dict(section.get("tiny", {})), **ours)
        model = Transformer(cfg, rngs=nnx.Rngs(seed))
        if mesh is not None:
            shard_model(model, mesh)
        return model, tokenizer
    if kind == "hf":
        if not path:
            raise ValueError("model.kind='hf' needs model.path (a Hugging Face folder)")
        return load_hf(path, seed=seed, mesh=mesh, **ours), load_tokenizer(path)
    if kind == "gguf":
        if not path:
            from promed_jax.assets import smollm2_gguf_path

            path = str(smollm2_gguf_path())
        if pathlib.Path(path).suffix != ".gguf":
            raise ValueError(f"model.kind='gguf' needs a .gguf file; model.path={path!r}")
        return load_gguf(path, seed=seed, mesh=mesh, **ours), load_tokenizer(path)
    raise ValueError(f"unknown model.kind {kind!r}; known: {KINDS}")
