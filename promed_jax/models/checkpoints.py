"""Checkpoint I/O: Hugging Face safetensors folders and GGUF files in, Hugging Face folders out.

One declarative key map per architecture (`KEY_MAPS`) says which checkpoint tensor fills which of our
parameters and how: `linear` (a torch `[out, in]` weight becomes our `[in, out]` kernel, reshaped to our
head layout), `flat` (a flat vector reshaped, e.g. q bias `[H * hd] -> [H, hd]`) or `same`. The loader is
generic and fails loudly: a checkpoint tensor that maps to nothing, a parameter with no tensor, or a shape
that does not fit is an error naming the file and the tensor. Pickle checkpoints (`*.bin`, `*.pt`) are
refused: unpickling runs arbitrary code.

Files are untrusted input: safetensors headers are validated by the `safetensors` library, GGUF layouts here,
and every tensor's dtype and shape are checked against the model config before any is placed on a device
(safetensors data is not even read until then); each failure is one `CheckpointError` line.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import pathlib
import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import ml_dtypes
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from promed_jax import io
from promed_jax.errors import CheckpointError
from promed_jax.models.config import ModelConfig
from promed_jax.models.lora import BASE_PARAMS, merged_weights
from promed_jax.models.transformer import Transformer
from promed_jax.sharding import LOGICAL_RULES, variable_sharding

LINEAR, FLAT, SAME = "linear", "flat", "same"


@dataclasses.dataclass(frozen=True)
class KeyRule:
    """Our parameter path <-> checkpoint key (`{i}` = layer index); `n_in` = input dims of a linear kernel."""

    ours: str
    hf: str
    kind: str
    n_in: int = 1


def _layer(ours: str, hf: str, kind: str, n_in: int = 1) -> KeyRule:
    return KeyRule(f"layers.{{i}}.{ours}", f"model.layers.{{i}}.{hf}", kind, n_in)


_LLAMA_QWEN2 = (
    KeyRule("embed", "model.embed_tokens.weight", SAME),
    KeyRule("norm.scale", "model.norm.weight", SAME),
    KeyRule("lm_head", "lm_head.weight", LINEAR),
    _layer("input_layernorm.scale", "input_layernorm.weight", SAME),
    _layer("post_attention_layernorm.scale", "post_attention_layernorm.weight", SAME),
    _layer("self_attn.q_proj.kernel", "self_attn.q_proj.weight", LINEAR),
    _layer("self_attn.k_proj.kernel", "self_attn.k_proj.weight", LINEAR),
    _layer("self_attn.v_proj.kernel", "self_attn.v_proj.weight", LINEAR),
    _layer("self_attn.o_proj.kernel", "self_attn.o_proj.weight", LINEAR, n_in=2),
    _layer("self_attn.q_proj.bias", "self_attn.q_proj.bias", FLAT),
    _layer("self_attn.k_proj.bias", "self_attn.k_proj.bias", FLAT),
    _layer("self_attn.v_proj.bias", "self_attn.v_proj.bias", FLAT),
    _layer("self_attn.o_proj.bias", "self_attn.o_proj.bias", FLAT),
    _layer("mlp.gate_proj.kernel", "mlp.gate_proj.weight", LINEAR),
    _layer("mlp.up_proj.kernel", "mlp.up_proj.weight", LINEAR),
    _layer("mlp.down_proj.kernel", "mlp.down_proj.weight", LINEAR),
)
# The two families share Hugging Face's names; which biases exist follows from the config.
KEY_MAPS: Mapping[str, tuple[KeyRule, ...]] = {"llama": _LLAMA_QWEN2, "qwen2": _LLAMA_QWEN2}

# Checkpoint tensors that are buffers, not parameters (older Llama checkpoints saved the rotary table).
_IGNORED = re.compile(r".*\.rotary_emb\.inv_freq$")

# GGUF tensor names -> Hugging Face names (llama.cpp's convert_hf_to_gguf naming).
GGUF_NAMES: Mapping[str, str] = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.attn_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "blk.{i}.attn_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "blk.{i}.attn_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.attn_q.bias": "model.layers.{i}.self_attn.q_proj.bias",
    "blk.{i}.attn_k.bias": "model.layers.{i}.self_attn.k_proj.bias",
    "blk.{i}.attn_v.bias": "model.layers.{i}.self_attn.v_proj.bias",
    "blk.{i}.ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
}

_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
_SAFETENSORS_DTYPES: Mapping[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
# What a parameter may be stored as: the library cannot tell float bytes labelled I32, only this check can.
_PARAM_DTYPES = ("F16", "BF16", "F32", "F64")


@dataclasses.dataclass(frozen=True)
class Tensor:
    """One checkpoint tensor as its file describes it; `read()` gives its host array, read on demand once every
    tensor has passed the checks.

    Attributes:
      source: the file it comes from.
      name: its name in that file.
      dtype: its safetensors dtype label (`F32`, `BF16`, ...; a dequantized GGUF tensor is `F32`).
      shape: its shape as stored.
      read: () -> the numpy array, `shape` and `dtype` as stated.
    """

    source: str
    name: str
    dtype: str
    shape: tuple[int, ...]
    read: Callable[[], np.ndarray]


def _one_line(err: BaseException) -> str:
    """A third-party parser's error as a short single line (its type names the failure when the text is empty)."""
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text[:300]}" if text else type(err).__name__


# ---------------------------------------------------------------------------------------------------------
# safetensors, parsed and validated by the safetensors library; bf16 through ml_dtypes (imported above, it
# registers numpy's "bfloat16", the name safetensors' numpy reader asks for)


@contextlib.contextmanager
def _safe_open(path: str | os.PathLike, name: str | None = None) -> Iterator[Any]:
    """`safetensors.safe_open` (numpy), its failures, here or in the block, a `CheckpointError` naming `path`
    and, when given, the tensor `name`."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="numpy") as f:
            yield f
    except (SafetensorError, OSError, ValueError, TypeError) as err:
        where = f"{path}: tensor {name}" if name else str(path)
        raise CheckpointError(f"{where}: not a valid safetensors file ({_one_line(err)})") from None


def _read_safetensor(path: str, name: str) -> np.ndarray:
    with _safe_open(path, name) as f:
        return f.get_tensor(name)


def safetensors_index(path: str | os.PathLike) -> dict[str, Tensor]:
    """name -> `Tensor` for every tensor of one safetensors file, from its validated header (no data is read:
    the library has checked that offsets tile the file exactly and that sizes match dtype and shape)."""
    path = str(path)
    with _safe_open(path) as f:
        slices = {name: f.get_slice(name) for name in f.offset_keys()}
        return {
            name: Tensor(
                path, name, s.get_dtype(), tuple(s.get_shape()), functools.partial(_read_safetensor, path, name)
            )
            for name, s in slices.items()
        }


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """name -> numpy array (host memory) for every tensor of one safetensors file."""
    return {name: tensor.read() for name, tensor in safetensors_index(path).items()}


def write_safetensors(path: str | os.PathLike, tensors: Mapping[str, np.ndarray]) -> None:
    """Write `tensors` as one safetensors file, atomically, streaming one tensor at a time (no second copy
    of the model in memory, which the library's writer would make)."""
    names = {v: k for k, v in _SAFETENSORS_DTYPES.items()}
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, array in tensors.items():
        if array.dtype not in names:
            raise CheckpointError(f"{path}: tensor {name} has unsupported dtype {array.dtype}")
        header[name] = {
            "dtype": names[array.dtype],
            "shape": list(array.shape),
            "data_offsets": [offset, offset + array.nbytes],
        }
        offset += array.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the format aligns the data to 8 bytes
    with io.atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(len(encoded).to_bytes(8, "little") + encoded)
        for array in tensors.values():
            f.write(np.ascontiguousarray(array).reshape(-1).view(np.uint8).data)  # bytes: memoryview lacks bf16
        f.flush()
        os.fsync(f.fileno())


def _read_json(path: pathlib.Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: not readable JSON ({_one_line(err)})") from None


def _weight_map(index: pathlib.Path) -> dict[str, str]:
    """The index's tensor -> shard map; every shard a plain file name, so that no index reaches outside its
    folder (a symlinked shard, as in the Hugging Face cache, is followed)."""
    content = _read_json(index)
    weight_map = content.get("weight_map") if isinstance(content, dict) else None
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index}: weight_map is missing or not an object")
    for key, shard in weight_map.items():
        plain = isinstance(shard, str) and shard not in ("", ".", "..") and "\\" not in shard
        if not plain or pathlib.PurePosixPath(shard).name != shard:
            raise CheckpointError(
                f"{index}: weight_map gives tensor {key} the shard {shard!r}, not a file name in {index.parent}"
            )
    return weight_map


def read_hf_tensors(folder: str | os.PathLike) -> dict[str, Tensor]:
    """All tensors of a Hugging Face folder: `model.safetensors` or the shards named by
    `model.safetensors.index.json`."""
    folder = pathlib.Path(folder)
    index = folder / "model.safetensors.index.json"
    single = folder / "model.safetensors"
    if index.is_file():
        weight_map = _weight_map(index)
        files = sorted(set(weight_map.values()))
    elif single.is_file():
        weight_map, files = None, [single.name]
    else:
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in _PICKLE_SUFFIXES) if folder.is_dir() else []
        if pickles:
            raise CheckpointError(
                f"{folder}: only pickle checkpoints ({', '.join(pickles)}); they are refused because unpickling "
                "runs arbitrary code. Convert them to safetensors first."
            )
        raise CheckpointError(f"{folder}: no model.safetensors or model.safetensors.index.json")
    tensors: dict[str, Tensor] = {}
    for name in files:
        for key, tensor in safetensors_index(folder / name).items():
            if weight_map is not None and weight_map.get(key) != name:
                raise CheckpointError(f"{folder / name}: tensor {key} is not listed for this file in {index.name}")
            tensors[key] = tensor
    if weight_map is not None:
        absent = sorted(set(weight_map) - set(tensors))
        if absent:
            raise CheckpointError(f"{index}: tensors listed but not found in the shards: {absent[:5]}")
    return tensors


# ---------------------------------------------------------------------------------------------------------
# Building a model from named tensors


def _path_str(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def _rule_for(rules: tuple[KeyRule, ...], ours: str) -> tuple[KeyRule, str]:
    for rule in rules:
        pattern = "^" + re.escape(rule.ours).replace(re.escape("{i}"), r"(\d+)") + "$"
        match = re.match(pattern, ours)
        if match:
            return rule, rule.hf.replace("{i}", match.group(1)) if match.groups() else rule.hf
    raise CheckpointError(f"parameter {ours} has no entry in the key map")


def _hf_shape(rule: KeyRule, ours_shape: tuple[int, ...]) -> tuple[int, ...]:
    if rule.kind == LINEAR:
        return (math.prod(ours_shape[rule.n_in :]), math.prod(ours_shape[: rule.n_in]))
    if rule.kind == FLAT:
        return (math.prod(ours_shape),)
    return ours_shape


def to_ours(rule: KeyRule, array: np.ndarray, ours_shape: tuple[int, ...]) -> np.ndarray:
    """A checkpoint tensor in our layout (the caller has checked its shape)."""
    if rule.kind == LINEAR:
        array = array.T
    return array.reshape(ours_shape)


def to_hf(rule: KeyRule, array: np.ndarray) -> np.ndarray:
    """One of our parameters in the checkpoint's layout."""
    shape = _hf_shape(rule, array.shape)
    if rule.kind == LINEAR:
        return np.ascontiguousarray(array.reshape(shape[::-1]).T)
    return array.reshape(shape)


def build_model(
    cfg: ModelConfig,
    tensors: Mapping[str, Tensor],
    *,
    seed: int = 0,
    mesh: Mesh | None = None,
    rules: Mapping[str, str] = LOGICAL_RULES,
) -> Transformer:
    """A `Transformer` whose base parameters come from `tensors` (Hugging Face names); LoRA adapters and RNG
    state are initialised from `seed`. With a mesh, every array is placed under its logical sharding."""
    key_map = KEY_MAPS[cfg.model_type]
    abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(seed)))
    graphdef, base, _ = nnx.split(abstract, BASE_PARAMS, ...)

    def place(variable: nnx.Variable, array: Any) -> Any:
        if mesh is None:
            return jax.device_put(array)
        return jax.device_put(array, variable_sharding(variable, mesh, rules))

    # Every tensor is checked before the first one is read or placed on a device.
    plan, used = [], set()
    for path, variable in nnx.to_flat_state(base):
        ours = _path_str(path)
        rule, key = _rule_for(key_map, ours)
        if key not in tensors:
            raise CheckpointError(f"checkpoint has no tensor {key} (for parameter {ours})")
        tensor = tensors[key]
        expected = _hf_shape(rule, tuple(variable.shape))
        if tensor.shape != expected:
            raise CheckpointError(
                f"{tensor.source}: tensor {key} has shape {tensor.shape}, expected {expected} "
                f"for parameter {ours} {tuple(variable.shape)}"
            )
        if tensor.dtype not in _PARAM_DTYPES:
            raise CheckpointError(
                f"{tensor.source}: tensor {key} has dtype {tensor.dtype}, expected one of {', '.join(_PARAM_DTYPES)} "
                f"for parameter {ours}"
            )
        plan.append((variable, rule, tensor))
        used.add(key)
    # A tied checkpoint may still carry lm_head.weight (a copy of the embedding): it has nothing to fill.
    tolerated = {"lm_head.weight"} if cfg.tie_word_embeddings else set()
    unmapped = sorted(k for k in tensors if k not in used and k not in tolerated and not _IGNORED.match(k))
    if unmapped:
        sources = sorted({tensors[k].source for k in unmapped})
        raise CheckpointError(f"{', '.join(sources)}: tensors that map to no parameter: {unmapped[:8]}")
    for variable, rule, tensor in plan:
        array = to_ours(rule, tensor.read(), tuple(variable.shape)).astype(cfg.weight_dtype)
        variable.set_value(place(variable, array))
    # Only the adapters and RNG state are materialised; XLA drops the unused random base weights.
    rest = jax.jit(lambda: nnx.split(Transformer(cfg, rngs=nnx.Rngs(seed)), BASE_PARAMS, ...)[2])()
    rest = jax.tree.map(lambda v: v.replace(place(v, v[...])), rest, is_leaf=lambda x: isinstance(x, nnx.Variable))
    return nnx.merge(graphdef, base, rest)


def load_hf(
    folder: str | os.PathLike,
    *,
    seed: int = 0,
    mesh: Mesh | None = None,
    rules: Mapping[str, str] = LOGICAL_RULES,
    **overrides: Any,
) -> Transformer:
    """A model from a Hugging Face folder (`config.json` + safetensors). `overrides` set our own config
    fields (dtype, param_dtype, remat, LoRA)."""
    folder = pathlib.Path(folder)
    if folder.suffix in _PICKLE_SUFFIXES:
        raise CheckpointError(f"{folder}: pickle checkpoints are refused (unpickling runs arbitrary code)")
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{folder}: no config.json")
    cfg = _config_from_hf(_read_json(config_path), config_path, overrides)
    return build_model(cfg, read_hf_tensors(folder), seed=seed, mesh=mesh, rules=rules)


def _config_from_hf(hf: Mapping[str, Any], source: str | os.PathLike, overrides: Mapping[str, Any]) -> ModelConfig:
    """`ModelConfig.from_hf`, its errors raised as a `CheckpointError` naming `source`."""
    if not isinstance(hf, Mapping):
        raise CheckpointError(f"{source}: the config is a JSON {type(hf).__name__}, not an object")
    try:
        return ModelConfig.from_hf(hf, **overrides)
    except (KeyError, ValueError) as err:
        raise CheckpointError(f"{source}: {err}") from None


# ---------------------------------------------------------------------------------------------------------
# GGUF


def _unpermute_rotary(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row order (each head's halves interleaved for its rotary kernel)."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_name_to_hf(name: str, source: str) -> str:
    match = re.match(r"^blk\.(\d+)\.(.+)$", name)
    template = f"blk.{{i}}.{match.group(2)}" if match else name
    if template not in GGUF_NAMES:
        raise CheckpointError(f"{source}: GGUF tensor {name} maps to no parameter")
    return GGUF_NAMES[template].replace("{i}", match.group(1)) if match else GGUF_NAMES[template]


# How the gguf parser, which trusts the file, and numpy under it fail on a broken one.
_GGUF_FAILURES = (ValueError, IndexError, KeyError, TypeError, OverflowError, OSError, EOFError, MemoryError)
_GGUF_INTEGER_TYPES = frozenset({"I8", "I16", "I32", "I64"})


def _in_memory(array: np.ndarray, source: str, name: str) -> Tensor:
    return Tensor(source, name, "F32", tuple(array.shape), lambda: array)


def _check_gguf_layout(path: str, reader: Any, alignment: int) -> None:
    """The tensors' bytes tile the data section as their types and shapes say: in order, without overlap, and
    with only padding (under `alignment` bytes) between them and after the last (the parser checks none of it;
    a wrong type label that keeps the reads in bounds shows up here as unread bytes)."""
    spans = sorted((t.data_offset, t.data_offset + t.n_bytes, t.name) for t in reader.tensors)
    ends = [(start, name) for start, _, name in spans[1:]] + [(len(reader.data), "the end of the file")]
    for (_, end, name), (next_start, next_name) in zip(spans, ends, strict=True):
        if next_start < end:
            raise CheckpointError(f"{path}: GGUF tensor {name}'s bytes run into {next_name}")
        if next_start - end >= alignment:
            raise CheckpointError(
                f"{path}: GGUF tensor {name} leaves {next_start - end} bytes unread before {next_name} "
                "(its type or shape does not match its data)"
            )


def read_gguf(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """(Hugging Face-style config dict, dequantized float32 tensors under Hugging Face names). The gguf
    parser's failures on a broken file become a `CheckpointError` naming the file and the field or tensor."""
    import gguf

    path = str(path)
    try:
        reader = gguf.GGUFReader(path)
    except _GGUF_FAILURES as err:
        raise CheckpointError(f"{path}: not a valid GGUF file ({_one_line(err)})") from None

    def field(key: str, default: Any = None) -> Any:
        if key not in reader.fields:
            if default is None:
                raise CheckpointError(f"{path}: GGUF field {key} is missing")
            return default
        try:
            return reader.fields[key].contents()
        except _GGUF_FAILURES as err:
            raise CheckpointError(f"{path}: GGUF field {key} cannot be read ({_one_line(err)})") from None

    arch = field("general.architecture", "")
    if arch not in KEY_MAPS:
        raise CheckpointError(f"{path}: GGUF architecture {arch!r} is not supported; supported: {sorted(KEY_MAPS)}")
    _check_gguf_layout(path, reader, int(field("general.alignment", 32)))
    by_name = {t.name: t for t in reader.tensors}
    for name, t in by_name.items():
        if t.tensor_type.name in _GGUF_INTEGER_TYPES:
            raise CheckpointError(f"{path}: GGUF tensor {name} has integer type {t.tensor_type.name}; weights are floats")
    if "rope_freqs.weight" in by_name:
        raise CheckpointError(f"{path}: GGUF rope_freqs (Llama-3.1 rope scaling) is not supported; use the HF folder")
    if "token_embd.weight" not in by_name:
        raise CheckpointError(f"{path}: GGUF tensor token_embd.weight is missing")
    try:
        heads = int(field(f"{arch}.attention.head_count"))
        kv_heads = int(field(f"{arch}.attention.head_count_kv", heads))
        hidden = int(field(f"{arch}.embedding_length"))
        hf = {
            "model_type": arch,
            "vocab_size": int(field(f"{arch}.vocab_size", int(np.prod(by_name["token_embd.weight"].shape)) // hidden)),
            "hidden_size": hidden,
            "intermediate_size": int(field(f"{arch}.feed_forward_length")),
            "num_hidden_layers": int(field(f"{arch}.block_count")),
            "num_attention_heads": heads,
            "num_key_value_heads": kv_heads,
            "head_dim": int(field(f"{arch}.rope.dimension_count", hidden // heads)),
            "rope_theta": float(field(f"{arch}.rope.freq_base", 10_000.0)),
            "rms_norm_eps": float(field(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
            "max_position_embeddings": int(field(f"{arch}.context_length", 8192)),
            "tie_word_embeddings": "output.weight" not in by_name,
            "attention_bias": "blk.0.attn_q.bias" in by_name,
        }
    except CheckpointError:
        raise
    except (TypeError, ValueError, ZeroDivisionError) as err:
        raise CheckpointError(f"{path}: GGUF hyper-parameters are not usable sizes ({_one_line(err)})") from None
    tensors = {}
    for name, t in by_name.items():
        key = _gguf_name_to_hf(name, path)
        try:
            array = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
            # convert_hf_to_gguf permutes q/k rows for the llama architecture only (Qwen2 keeps HF's order).
            if arch == "llama" and re.search(r"\.(q_proj|k_proj)\.(weight|bias)$", key):
                array = _unpermute_rotary(array, heads if ".q_proj." in key else kv_heads)
        except _GGUF_FAILURES as err:
            raise CheckpointError(f"{path}: GGUF tensor {name} cannot be read ({_one_line(err)})") from None
        tensors[key] = _in_memory(array, path, name)
    return hf, tensors


def load_gguf(
    path: str | os.PathLike,
    *,
    seed: int = 0,
    mesh: Mesh | None = None,
    rules: Mapping[str, str] = LOGICAL_RULES,
    **overrides: Any,
) -> Transformer:
    """A model from a GGUF file (any quantization the `gguf` package dequantizes; Q4_1 for SmolLM2)."""
    hf, tensors = read_gguf(path)
    return build_model(_config_from_hf(hf, path, overrides), tensors, seed=seed, mesh=mesh, rules=rules)


# ---------------------------------------------------------------------------------------------------------
# Export


def hf_tensors(model: Transformer, dtype: str | None = None) -> Iterator[tuple[str, np.ndarray]]:
    """(Hugging Face name, array) for every base parameter, with LoRA adapters merged in."""
    cfg = model.config
    key_map = KEY_MAPS[cfg.model_type]
    target = np.dtype(ml_dtypes.bfloat16) if (dtype or cfg.param_dtype) == "bfloat16" else np.dtype(np.float32)
    for ours, array in merged_weights(model).items():
        rule, key = _rule_for(key_map, ours)
        yield key, to_hf(rule, np.asarray(jax.device_get(array)).astype(target))


def save_hf(model: Transformer, folder: str | os.PathLike, *, dtype: str | None = None, tokenizer: Any = None) -> None:
    """Write `model` (LoRA merged) as a Hugging Face folder that transformers loads unchanged:
    `config.json`, `model.safetensors` and, when given, the tokenizer files."""
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    hf = model.config.to_hf()
    hf["torch_dtype"] = dtype or model.config.param_dtype
    if tokenizer is not None:
        hf.update(
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        tokenizer.save_pretrained(folder)
    write_safetensors(folder / "model.safetensors", dict(hf_tensors(model, dtype)))
    io.atomic_write_json(folder / "config.json", hf)
