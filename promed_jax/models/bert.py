"""A BERT sentence encoder in NNX (all-MiniLM-L6-v2: 6 post-LN layers, GELU, mean pooling, L2 norm).

Call: `encoder.encode(texts) -> float32 [N, D]`, unit rows. The model is `BertEncoder(ids [B, T], mask [B, T])
-> hidden [B, T, D]`; `embed` mean-pools the unmasked positions and L2-normalises, as sentence-transformers
does for this checkpoint (its `1_Pooling/config.json`: mean tokens). Batches are padded to length and size
buckets, so a handful of shapes is compiled once each. Weights come from the checkpoint's `model.safetensors`
through one declarative table (`WEIGHT_MAP`); every tensor is either mapped or named as unused, and a missing,
unmapped or mis-shaped tensor is a `CheckpointError`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
import re
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from promed_jax.errors import CheckpointError


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """The BERT hyper-parameters the encoder needs (HF `config.json` names in comments)."""

    vocab_size: int = 30522
    hidden: int = 384  # hidden_size
    layers: int = 6  # num_hidden_layers
    heads: int = 12  # num_attention_heads
    intermediate: int = 1536  # intermediate_size
    max_positions: int = 512  # max_position_embeddings
    type_vocab: int = 2  # type_vocab_size
    eps: float = 1e-12  # layer_norm_eps

    @classmethod
    def from_json(cls, path: str | pathlib.Path) -> BertConfig:
        c = json.loads(pathlib.Path(path).read_text())
        if c.get("hidden_act", "gelu") != "gelu" or c.get("position_embedding_type", "absolute") != "absolute":
            raise CheckpointError(f"{path}: only BERT with exact GELU and absolute positions is supported")
        return cls(
            vocab_size=c["vocab_size"],
            hidden=c["hidden_size"],
            layers=c["num_hidden_layers"],
            heads=c["num_attention_heads"],
            intermediate=c["intermediate_size"],
            max_positions=c["max_position_embeddings"],
            type_vocab=c["type_vocab_size"],
            eps=c["layer_norm_eps"],
        )


class BertLayer(nnx.Module):
    """Post-LN: x = LN(x + attn(x)); x = LN(x + W2 gelu(W1 x))."""

    def __init__(self, cfg: BertConfig, rngs: nnx.Rngs):
        d = cfg.hidden
        self.heads = cfg.heads
        self.q = nnx.Linear(d, d, rngs=rngs)
        self.k = nnx.Linear(d, d, rngs=rngs)
        self.v = nnx.Linear(d, d, rngs=rngs)
        self.o = nnx.Linear(d, d, rngs=rngs)
        self.attn_norm = nnx.LayerNorm(d, epsilon=cfg.eps, rngs=rngs)
        self.ff_in = nnx.Linear(d, cfg.intermediate, rngs=rngs)
        self.ff_out = nnx.Linear(cfg.intermediate, d, rngs=rngs)
        self.ff_norm = nnx.LayerNorm(d, epsilon=cfg.eps, rngs=rngs)

    def __call__(self, x: jax.Array, bias: jax.Array) -> jax.Array:
        """x: [B, T, D]; bias: [B, 1, 1, T] additive key mask."""
        b, t, d = x.shape
        split = lambda y: y.reshape(b, t, self.heads, d // self.heads)
        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(d // self.heads) + bias
        att = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, axis=-1), v).reshape(b, t, d)
        x = self.attn_norm(x + self.o(att))
        return self.ff_norm(x + self.ff_out(jax.nn.gelu(self.ff_in(x), approximate=False)))


class BertEncoder(nnx.Module):
    def __init__(self, cfg: BertConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        self.word = nnx.Embed(cfg.vocab_size, cfg.hidden, rngs=rngs)
        self.position = nnx.Embed(cfg.max_positions, cfg.hidden, rngs=rngs)
        self.token_type = nnx.Embed(cfg.type_vocab, cfg.hidden, rngs=rngs)
        self.emb_norm = nnx.LayerNorm(cfg.hidden, epsilon=cfg.eps, rngs=rngs)
        self.layers = nnx.List([BertLayer(cfg, rngs) for _ in range(cfg.layers)])

    def __call__(self, ids: jax.Array, mask: jax.Array) -> jax.Array:
        """ids, mask: int [B, T] (mask 1 = token, 0 = padding) -> hidden float32 [B, T, D]."""
        t = ids.shape[1]
        x = self.word(ids) + self.position(jnp.arange(t))[None] + self.token_type(jnp.zeros_like(ids))
        x = self.emb_norm(x)
        bias = jnp.where(mask[:, None, None, :] > 0, 0.0, jnp.finfo(jnp.float32).min)
        for layer in self.layers:
            x = layer(x, bias)
        return x


def embed(model: BertEncoder, ids: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean of the unmasked hidden states, L2-normalised: float32 [B, D]."""
    h = model(ids, mask)
    m = mask[..., None].astype(h.dtype)
    pooled = (h * m).sum(1) / jnp.maximum(m.sum(1), 1e-9)
    return pooled / jnp.maximum(jnp.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)


# --- weights -----------------------------------------------------------------------------------------

_T = np.transpose  # torch Linear weight [out, in] -> our kernel [in, out]
# checkpoint key pattern -> (our path, transform); {i} is the layer index.
WEIGHT_MAP: dict[str, tuple[str, Callable[[np.ndarray], np.ndarray] | None]] = {
    r"embeddings\.word_embeddings\.weight": ("word.embedding", None),
    r"embeddings\.position_embeddings\.weight": ("position.embedding", None),
    r"embeddings\.token_type_embeddings\.weight": ("token_type.embedding", None),
    r"embeddings\.LayerNorm\.weight": ("emb_norm.scale", None),
    r"embeddings\.LayerNorm\.bias": ("emb_norm.bias", None),
    r"encoder\.layer\.(\d+)\.attention\.self\.query\.weight": ("layers.{i}.q.kernel", _T),
    r"encoder\.layer\.(\d+)\.attention\.self\.query\.bias": ("layers.{i}.q.bias", None),
    r"encoder\.layer\.(\d+)\.attention\.self\.key\.weight": ("layers.{i}.k.kernel", _T),
    r"encoder\.layer\.(\d+)\.attention\.self\.key\.bias": ("layers.{i}.k.bias", None),
    r"encoder\.layer\.(\d+)\.attention\.self\.value\.weight": ("layers.{i}.v.kernel", _T),
    r"encoder\.layer\.(\d+)\.attention\.self\.value\.bias": ("layers.{i}.v.bias", None),
    r"encoder\.layer\.(\d+)\.attention\.output\.dense\.weight": ("layers.{i}.o.kernel", _T),
    r"encoder\.layer\.(\d+)\.attention\.output\.dense\.bias": ("layers.{i}.o.bias", None),
    r"encoder\.layer\.(\d+)\.attention\.output\.LayerNorm\.weight": ("layers.{i}.attn_norm.scale", None),
    r"encoder\.layer\.(\d+)\.attention\.output\.LayerNorm\.bias": ("layers.{i}.attn_norm.bias", None),
    r"encoder\.layer\.(\d+)\.intermediate\.dense\.weight": ("layers.{i}.ff_in.kernel", _T),
    r"encoder\.layer\.(\d+)\.intermediate\.dense\.bias": ("layers.{i}.ff_in.bias", None),
    r"encoder\.layer\.(\d+)\.output\.dense\.weight": ("layers.{i}.ff_out.kernel", _T),
    r"encoder\.layer\.(\d+)\.output\.dense\.bias": ("layers.{i}.ff_out.bias", None),
    r"encoder\.layer\.(\d+)\.output\.LayerNorm\.weight": ("layers.{i}.ff_norm.scale", None),
    r"encoder\.layer\.(\d+)\.output\.LayerNorm\.bias": ("layers.{i}.ff_norm.bias", None),
}
# Tensors a mean-pooling sentence encoder does not use: the position-id buffer and the CLS pooler.
UNUSED = (r"embeddings\.position_ids", r"pooler\.dense\.(weight|bias)")


def _map_name(name: str) -> tuple[str, Callable | None] | None:
    for pattern, (path, transform) in WEIGHT_MAP.items():
        m = re.fullmatch(pattern, name)
        if m:
            return path.format(i=m.group(1)) if m.groups() else path, transform
    if any(re.fullmatch(p, name) for p in UNUSED):
        return None
    raise CheckpointError(f"BERT checkpoint: tensor {name} has no entry in the weight map")


def load_encoder(folder: str | pathlib.Path) -> BertEncoder:
    """The encoder with the weights of `folder/model.safetensors` (config from `folder/config.json`)."""
    from promed_jax.models.checkpoints import read_safetensors

    folder = pathlib.Path(folder)
    cfg = BertConfig.from_json(folder / "config.json")
    model = nnx.eval_shape(lambda: BertEncoder(cfg, nnx.Rngs(0)))  # shapes only: every value is read below
    params = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    params = {".".join(map(str, k)): v for k, v in params.items()}
    seen = set()
    for name, array in read_safetensors(folder / "model.safetensors").items():
        mapped = _map_name(name)
        if mapped is None:
            continue
        path, transform = mapped
        if path not in params:
            raise CheckpointError(f"{folder}: tensor {name} maps to {path}, which the model lacks")
        value = transform(array) if transform else array
        if value.shape != params[path].shape:
            raise CheckpointError(f"{folder}: tensor {name} has shape {value.shape}, {path} needs {params[path].shape}")
        params[path].set_value(jnp.asarray(value, jnp.float32))
        seen.add(path)
    missing = sorted(set(params) - seen)
    if missing:
        raise CheckpointError(f"{folder}: the checkpoint lacks {len(missing)} parameter(s), first {missing[0]}")
    return model


# --- batched, jitted encoding ------------------------------------------------------------------------

LENGTH_BUCKETS = (16, 32, 64, 128, 256)
BATCH_BUCKETS = (8, 32, 64, 128)


def _bucket(n: int, buckets: Sequence[int]) -> int:
    return next((b for b in buckets if b >= n), -(-n // buckets[-1]) * buckets[-1])


@functools.partial(jax.jit, static_argnums=0)
def _embed_jit(graphdef, params, ids, mask):
    return embed(nnx.merge(graphdef, params), ids, mask)


class SentenceEncoder:
    """Texts -> unit vectors, with the checkpoint's own tokenizer; shapes padded to buckets (compiled once)."""

    def __init__(self, folder: str | pathlib.Path, *, max_length: int = 256):
        from transformers import BertTokenizerFast

        self.folder = pathlib.Path(folder)
        self.tokenizer = BertTokenizerFast.from_pretrained(str(self.folder))
        self.max_length = max_length
        self.graphdef, self.params = nnx.split(load_encoder(self.folder))
        self.dim = self.params["word"]["embedding"].shape[1]

    def token_ids(self, texts: Sequence[str]) -> list[list[int]]:
        return self.tokenizer(list(texts), truncation=True, max_length=self.max_length)["input_ids"]

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """float32 [N, D], unit rows; N = 0 gives [0, D]."""
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        ids = self.token_ids(texts)
        order = np.argsort([len(x) for x in ids], kind="stable")
        out = np.zeros((len(ids), self.dim), np.float32)
        for start in range(0, len(order), BATCH_BUCKETS[-1]):
            rows = order[start : start + BATCH_BUCKETS[-1]]
            t = _bucket(max(len(ids[i]) for i in rows), LENGTH_BUCKETS)
            tok = np.zeros((_bucket(len(rows), BATCH_BUCKETS), t), np.int32)
            mask = np.zeros_like(tok)
            for r, i in enumerate(rows):
                tok[r, : len(ids[i])] = ids[i]
                mask[r, : len(ids[i])] = 1
            out[rows] = np.asarray(_embed_jit(self.graphdef, self.params, tok, mask))[: len(rows)]
        return out
