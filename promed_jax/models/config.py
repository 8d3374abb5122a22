"""The decoder's hyper-parameters: one frozen dataclass for the Llama and Qwen2 families."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp

LORA_TARGETS = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
)
SUPPORTED_MODEL_TYPES = ("llama", "qwen2")
_DTYPES = {
    "float32": "float32",
    "fp32": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
}


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama-3.1's `llama3` frequency scaling (the only scaling the two families use)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int
    rope_type: str = "llama3"

    def __post_init__(self) -> None:
        if self.rope_type != "llama3":
            raise ValueError(f"unsupported rope_type {self.rope_type!r}; supported: 'llama3' (or no scaling)")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shapes and numerics of the decoder. Hashable, so it can be a static argument of `jax.jit`.

    `dtype` is the compute dtype, `param_dtype` the storage dtype ("float32" or "bfloat16"). `lora_rank == 0`
    means no adapters; otherwise every projection named in `lora_targets` gets a rank-`lora_rank` adapter
    scaled by `lora_alpha / lora_rank`. `attention_bias` gives q/k/v biases (Qwen2 always, Llama optionally);
    `attention_out_bias` an o_proj bias (Llama's `attention_bias` sets both).
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10_000.0
    rope_scaling: RopeScaling | None = None
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    max_position_embeddings: int = 8192
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: bool = False
    lora_rank: int = 0
    lora_alpha: float = 32.0
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] = ("q_proj", "v_proj")
    attention_out_bias: bool = False
    model_type: str = "llama"
    attention_block: int = 128  # queries per block of the causal training forward (`attend`); 0: one block

    def __post_init__(self) -> None:
        if isinstance(self.rope_scaling, Mapping):
            object.__setattr__(self, "rope_scaling", _rope_scaling_from_dict(dict(self.rope_scaling)))
        object.__setattr__(self, "lora_targets", tuple(self.lora_targets))
        for name in ("dtype", "param_dtype"):
            value = str(getattr(self, name))
            if value not in _DTYPES:
                raise ValueError(f"ModelConfig.{name}={value!r}; expected one of {sorted(_DTYPES)}")
            object.__setattr__(self, name, _DTYPES[value])
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for rotary embeddings")
        unknown = set(self.lora_targets) - set(LORA_TARGETS)
        if unknown:
            raise ValueError(f"unknown lora_targets {sorted(unknown)}; known: {LORA_TARGETS}")
        if self.lora_rank < 0 or not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"bad LoRA settings: rank={self.lora_rank}, dropout={self.lora_dropout}")
        if self.attention_block < 0:
            raise ValueError(f"attention_block={self.attention_block} must be >= 0 (0: no blocks)")
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"model_type {self.model_type!r} is not supported; supported: {SUPPORTED_MODEL_TYPES}")

    @property
    def compute_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)

    @property
    def weight_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.param_dtype)

    @property
    def lora_scale(self) -> float:
        return self.lora_alpha / self.lora_rank if self.lora_rank else 0.0

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    @classmethod
    def tiny(cls, **overrides: Any) -> ModelConfig:
        """A two-layer grouped-query model for tests and the CPU default."""
        fields = {
            "vocab_size": 512,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_layers": 2,
            "num_heads": 4,
            "num_kv_heads": 2,
            "head_dim": 16,
            "rope_theta": 10_000.0,
            "rms_norm_eps": 1e-6,
            "tie_word_embeddings": True,
            "max_position_embeddings": 2048,
        }
        fields.update(overrides)
        return cls(**fields)

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any], **overrides: Any) -> ModelConfig:
        """From a Hugging Face `config.json` dict (transformers 4 `rope_theta`/`rope_scaling` or 5
        `rope_parameters` layout). `overrides` set our own fields (dtype, LoRA, remat, ...)."""
        model_type = hf.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"config.json: model_type {model_type!r} is not supported; supported: {SUPPORTED_MODEL_TYPES}"
            )
        if hf.get("mlp_bias"):
            raise ValueError("config.json: mlp_bias=true is not supported")
        if model_type == "qwen2" and hf.get("use_sliding_window"):
            raise ValueError("config.json: use_sliding_window=true is not supported")
        theta, scaling = _rope_from_hf(hf)
        heads = int(hf["num_attention_heads"])
        llama_bias = bool(hf.get("attention_bias", False))
        fields = {
            "vocab_size": int(hf["vocab_size"]),
            "hidden_size": int(hf["hidden_size"]),
            "intermediate_size": int(hf["intermediate_size"]),
            "num_layers": int(hf["num_hidden_layers"]),
            "num_heads": heads,
            "num_kv_heads": int(hf.get("num_key_value_heads") or heads),
            "head_dim": int(hf.get("head_dim") or hf["hidden_size"] // heads),
            "rope_theta": theta,
            "rope_scaling": scaling,
            "rms_norm_eps": float(hf.get("rms_norm_eps", 1e-6)),
            "tie_word_embeddings": bool(hf.get("tie_word_embeddings", False)),
            "attention_bias": True if model_type == "qwen2" else llama_bias,
            "attention_out_bias": False if model_type == "qwen2" else llama_bias,
            "max_position_embeddings": int(hf.get("max_position_embeddings", 8192)),
            "model_type": model_type,
        }
        fields.update(overrides)
        return cls(**fields)

    def to_hf(self) -> dict[str, Any]:
        """The `config.json` dict transformers needs to load an exported folder (transformers 4 layout, which
        transformers 5 also reads)."""
        hf: dict[str, Any] = {
            "model_type": self.model_type,
            "architectures": ["LlamaForCausalLM" if self.model_type == "llama" else "Qwen2ForCausalLM"],
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "rope_theta": self.rope_theta,
            "rope_scaling": dataclasses.asdict(self.rope_scaling) if self.rope_scaling else None,
            "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "hidden_act": "silu",
            "torch_dtype": self.param_dtype,
        }
        if self.model_type == "llama":
            hf["attention_bias"] = self.attention_bias
            hf["mlp_bias"] = False
        return hf


def _rope_scaling_from_dict(d: dict[str, Any]) -> RopeScaling:
    rope_type = d.get("rope_type", d.get("type", "llama3"))
    try:
        return RopeScaling(
            factor=float(d["factor"]),
            low_freq_factor=float(d["low_freq_factor"]),
            high_freq_factor=float(d["high_freq_factor"]),
            original_max_position_embeddings=int(d["original_max_position_embeddings"]),
            rope_type=rope_type,
        )
    except KeyError as err:
        raise ValueError(f"rope scaling {d}: field {err} is missing") from None


def _rope_from_hf(hf: Mapping[str, Any]) -> tuple[float, RopeScaling | None]:
    """(theta, scaling) from either layout: transformers 5 puts both into `rope_parameters`."""
    params = hf.get("rope_parameters")
    if params:
        # A per-attention-type dict (e.g. {"full_attention": {...}}) is not used by these two families.
        theta = float(params.get("rope_theta", hf.get("rope_theta", 10_000.0)))
        rope_type = params.get("rope_type", params.get("type", "default"))
        return theta, None if rope_type == "default" else _rope_scaling_from_dict(dict(params))
    theta = float(hf.get("rope_theta", 10_000.0))
    scaling = hf.get("rope_scaling")
    if not scaling or scaling.get("rope_type", scaling.get("type")) == "default":
        return theta, None
    return theta, _rope_scaling_from_dict(dict(scaling))
