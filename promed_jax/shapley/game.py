"""The Shapley value game: v(S) for many coalitions of one case's facts in one jitted call (promed.md §2).

v(S) is the mean log-probability of the gold answer tokens after the raw value prompt that lists only the
facts of S (teacher forcing). The prompt is tokenized once, piece by piece (`ValuePrompt`); a coalition's
prompt is the concatenation of its pieces, so dropping a fact drops exactly its tokens (`coalition_ids` is
the definition, one prompt at a time).

Batched layout of one coalition row, in cache slots:

    [ header: P, shared ] [ kept facts + question[:-1], gathered, padded to Lb ] [ question[-1] + answer[:-1]: A ]

The header's keys and values are computed once at [1, P] and broadcast to the K rows (`reuse_prefix`), the
kept fact tokens are gathered into a short row instead of masking the dropped ones (less compute on CPU),
and positions count only kept tokens, so each row sees exactly its own prompt. Only the last segment's
logits are computed (the middle segment's logits are unused and compiled away). Rows are sorted by length
and cut into chunks of power-of-two sizes whose Lb is rounded up to a few buckets, so a dataset compiles a
handful of times.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from promed_jax.data.cases import Case
from promed_jax.models.transformer import KVCache, init_cache
from promed_jax.shapley.estimators import MemoValue
from promed_jax.text import prompts


@dataclasses.dataclass(frozen=True)
class ValuePrompt:
    """One case's value prompt, tokenized piece by piece.

    Attributes:
      prefix: int32[P]; the tokenizer's leading special tokens and the header (shared by every coalition).
      facts: n arrays int32[L_i]; each fact with its separator.
      question: int32[Q], Q ≥ 1; the question and the answer cue.
      answer: int32[A], A ≥ 1; the gold answer text (the teacher-forced targets).
    """

    prefix: np.ndarray
    facts: tuple[np.ndarray, ...]
    question: np.ndarray
    answer: np.ndarray

    @property
    def n(self) -> int:
        return len(self.facts)


def leading_special_ids(tokenizer) -> list[int]:
    """Tokens the tokenizer puts before any text (a BOS for Llama-3; nothing for ChatML tokenizers)."""
    plain = tokenizer("x", add_special_tokens=False)["input_ids"]
    full = tokenizer("x", add_special_tokens=True)["input_ids"]
    end = len(full) - len(plain)
    if end < 0 or full[end:][: len(plain)] != plain:
        return []
    return list(full[:end])


def tokenize_value_prompt(tokenizer, case: Case) -> ValuePrompt:
    """Tokenizes the pieces of `prompts.shapley_value_pieces` separately (raises naming the case if empty)."""
    header, facts, question, answer = prompts.shapley_value_pieces(
        language=case.language, facts=case.facts, question=case.question, answer=case.gold_text
    )

    def ids(text: str) -> np.ndarray:
        return np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=np.int32)

    prompt = ValuePrompt(
        prefix=np.concatenate([np.asarray(leading_special_ids(tokenizer), np.int32), ids(header)]),
        facts=tuple(ids(f) for f in facts),
        question=ids(question),
        answer=ids(answer),
    )
    if prompt.answer.size == 0:
        raise ValueError(f"case {case.id}: field answer: the gold option text {case.gold_text!r} is empty")
    if any(f.size == 0 for f in prompt.facts):
        raise ValueError(f"case {case.id}: field facts: a fact tokenizes to nothing")
    return prompt


def kept_facts(prompt: ValuePrompt, coalition: Sequence[bool]) -> list[np.ndarray]:
    """The token ids of the coalition's facts, in their original order."""
    return [f for f, keep in zip(prompt.facts, coalition, strict=True) if keep]


def coalition_ids(prompt: ValuePrompt, coalition: Sequence[bool]) -> tuple[np.ndarray, int]:
    """The definition of a coalition's prompt: (token ids int32[T], index of the first answer token)."""
    context = np.concatenate([prompt.prefix, *kept_facts(prompt, coalition), prompt.question])
    return np.concatenate([context, prompt.answer]), context.size


def length_bucket(length: int, minimum: int = 16) -> int:
    """Rounds up to 16, 32, 48, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320, ... (steps of about 2^(1/4),
    multiples of 16): at most ~19% padding, for about twice the compiled shapes of √2 steps."""
    bucket = minimum
    k = 0
    while bucket < length:
        k += 1
        bucket = int(-(-minimum * 2 ** (k / 4) // 16) * 16)
    return bucket


def chunk_sizes(k: int, min_batch: int, batch_size: int) -> list[int]:
    """Splits K rows into chunks of min_batch·2^j rows (at most batch_size), largest first, so that padding
    to those shapes wastes little (18 rows: 16 + 2, not 32); only a last chunk under min_batch is padded."""
    sizes = []
    while k > 0:
        size = min_batch
        while size * 2 <= min(k, batch_size):
            size *= 2
        sizes.append(min(size, k))
        k -= sizes[-1]
    return sizes


def _layout(prefix_len: int, body_len: jax.Array, body_slots: int, tail_slots: int):
    """Slot validity bool[K, S] and positions int32[K, S] of the rows (S = P + Lb + A)."""
    k = body_len.shape[0]
    body_index = jnp.arange(body_slots)[None, :]
    key_valid = jnp.concatenate(
        [
            jnp.ones((k, prefix_len), bool),
            body_index < body_len[:, None],
            jnp.ones((k, tail_slots), bool),
        ],
        axis=1,
    )
    positions = jnp.concatenate(
        [
            jnp.broadcast_to(jnp.arange(prefix_len), (k, prefix_len)),
            prefix_len + jnp.minimum(body_index, body_len[:, None]),
            prefix_len + body_len[:, None] + jnp.arange(tail_slots)[None, :],
        ],
        axis=1,
    ).astype(jnp.int32)
    return key_valid, positions


def _attention_mask(key_valid: jax.Array, query_slots: jax.Array) -> jax.Array:
    """bool[K, T, S]: a query attends the valid slots up to its own (slot order is token order)."""
    slots = jnp.arange(key_valid.shape[1])
    return (slots[None, None, :] <= query_slots[None, :, None]) & key_valid[:, None, :]


def _answer_logprob(logits: jax.Array, targets: jax.Array, valid: jax.Array) -> jax.Array:
    """Mean log-prob of the targets: logits float32[K, A, V], targets int32[A], valid bool[A] -> float32[K]."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    picked = jnp.take_along_axis(logp, jnp.broadcast_to(targets, logits.shape[:2])[..., None], axis=-1)[..., 0]
    return jnp.sum(picked * valid, axis=-1) / jnp.sum(valid)


def _prefix_cache(graphdef, params, prefix: jax.Array) -> KVCache:
    """Keys and values of the shared header, computed once: prefix int32[1, P] -> KVCache [1, P]."""
    model = nnx.merge(graphdef, params)
    p = prefix.shape[1]
    cache = init_cache(model.config, 1, p)
    positions = jnp.arange(p, dtype=jnp.int32)[None]
    mask = jnp.tril(jnp.ones((p, p), bool))[None]
    _, cache = model(prefix, positions, mask, cache=cache, cache_index=jnp.int32(0), use_lora=False)
    return cache


def _scores_reusing_prefix(graphdef, params, prefix_cache: KVCache, body, body_len, tail, targets, valid):
    """float32[K]: body int32[K, Lb], body_len int32[K], tail/targets int32[A], valid bool[A]."""
    model = nnx.merge(graphdef, params)
    k, lb = body.shape
    p, a = prefix_cache.size, tail.shape[0]
    key_valid, positions = _layout(p, body_len, lb, a)

    cache = prefix_cache.grow(k, lb + a)  # [1, P] -> [K, P + Lb + A] slots
    body_slots = p + jnp.arange(lb)
    _, cache = model(
        body,
        positions[:, p : p + lb],
        _attention_mask(key_valid, body_slots),
        cache=cache,
        cache_index=jnp.int32(p),
        use_lora=False,
    )
    tail_slots = p + lb + jnp.arange(a)
    logits, _ = model(
        jnp.broadcast_to(tail, (k, a)),
        positions[:, p + lb :],
        _attention_mask(key_valid, tail_slots),
        cache=cache,
        cache_index=jnp.int32(p + lb),
        use_lora=False,
    )
    return _answer_logprob(logits, targets, valid)


def _scores_without_reuse(graphdef, params, prefix, body, body_len, tail, targets, valid):
    """The same values from one cache-free forward over [K, P + Lb + A] (prefix recomputed per row)."""
    model = nnx.merge(graphdef, params)
    k, lb = body.shape
    p, a = prefix.shape[0], tail.shape[0]
    key_valid, positions = _layout(p, body_len, lb, a)
    tokens = jnp.concatenate([jnp.broadcast_to(prefix, (k, p)), body, jnp.broadcast_to(tail, (k, a))], axis=1)
    logits, _ = model(tokens, positions, _attention_mask(key_valid, jnp.arange(p + lb + a)), use_lora=False)
    return _answer_logprob(logits[:, p + lb :], targets, valid)


def _placed_on(params, mesh: Mesh) -> bool:
    """Whether every array already lives on `mesh` (a model loaded under its logical shardings)."""
    return all(
        isinstance(x.sharding, NamedSharding) and x.sharding.mesh == mesh
        for x in jax.tree.leaves(params)
        if isinstance(x, jax.Array)
    )


class CoalitionGame:
    """Batched coalition values of one frozen model: `game.value_fn(case)(bool[K, n]) -> float32[K]`.

    Args:
      model: the `Transformer` (θ, used without LoRA).
      tokenizer: its tokenizer.
      batch_size: coalitions per forward at most (chunks are padded to a power of two up to this).
      min_batch: the smallest chunk (a multiple of the mesh's data axis when sharded).
      mesh: optional; the coalition axis is sharded over its `data` axis; weights not yet on the mesh are
        replicated over it (a model loaded with `load_model(..., mesh=mesh)` keeps its own shardings).
      reuse_prefix: compute the header once per case at [1, P] (True) or once per row (False, for tests).
    """

    def __init__(
        self,
        model: nnx.Module,
        tokenizer,
        *,
        batch_size: int = 16,
        min_batch: int = 4,
        mesh: Mesh | None = None,
        reuse_prefix: bool = True,
    ):
        self.tokenizer = tokenizer
        self.pad_id = int(tokenizer.pad_token_id or 0)
        self.mesh = mesh
        self.reuse_prefix = reuse_prefix
        data = 1 if mesh is None else mesh.shape["data"]
        self.min_batch = -(-max(min_batch, data) // data) * data
        self.batch_size = max(self.min_batch, -(-batch_size // data) * data)
        graphdef, params = nnx.split(model)
        if mesh is not None and not _placed_on(params, mesh):
            params = jax.device_put(params, NamedSharding(mesh, PartitionSpec()))
        self.params = params
        self._prefix_fn = jax.jit(functools.partial(_prefix_cache, graphdef))
        self._reuse_fn = jax.jit(functools.partial(_scores_reusing_prefix, graphdef))
        self._plain_fn = jax.jit(functools.partial(_scores_without_reuse, graphdef))
        self._prefix_memo: dict[bytes, KVCache] = {}

    def prompt(self, case: Case) -> ValuePrompt:
        return tokenize_value_prompt(self.tokenizer, case)

    def value_fn(self, case: Case) -> MemoValue:
        """The memoized value function of one case (tokenized once)."""
        prompt = self.prompt(case)
        return MemoValue(functools.partial(self.values, prompt), prompt.n)

    def values(self, prompt: ValuePrompt, coalitions: np.ndarray) -> np.ndarray:
        """bool[K, n] -> float32[K]: v of each coalition, in order."""
        coalitions = np.asarray(coalitions, dtype=bool)
        if coalitions.ndim != 2 or coalitions.shape[1] != prompt.n:
            raise ValueError(f"coalitions must be bool[K, {prompt.n}], got shape {coalitions.shape}")
        fact_lens = np.array([f.size for f in prompt.facts], dtype=np.int64)
        body_lens = coalitions @ fact_lens + prompt.question.size - 1
        order = np.argsort(body_lens, kind="stable")
        tail, targets, valid = self._tail(prompt)
        out = np.empty(len(coalitions), np.float32)
        start = 0
        for size in chunk_sizes(len(coalitions), self.min_batch, self.batch_size):
            rows = order[start : start + size]
            out[rows] = self._chunk(prompt, coalitions[rows], body_lens[rows], tail, targets, valid)
            start += size
        return out

    def _tail(self, prompt: ValuePrompt):
        a = prompt.answer.size
        slots = -(-a // 8) * 8
        tail = np.full(slots, self.pad_id, np.int32)
        tail[:a] = np.concatenate([prompt.question[-1:], prompt.answer[:-1]])
        targets = np.zeros(slots, np.int32)
        targets[:a] = prompt.answer
        return tail, targets, np.arange(slots) < a

    def _chunk(self, prompt: ValuePrompt, coalitions, body_lens, tail, targets, valid) -> np.ndarray:
        k = len(coalitions)  # at most batch_size
        k_pad = self.min_batch
        while k_pad < k:
            k_pad *= 2
        k_pad = min(k_pad, self.batch_size)
        lb = length_bucket(int(body_lens.max()))
        body = np.full((k_pad, lb), self.pad_id, np.int32)
        question = prompt.question[:-1]
        for row, keep in enumerate(coalitions):
            ids = np.concatenate([*kept_facts(prompt, keep), question])
            body[row, : ids.size] = ids
        lens = np.zeros(k_pad, np.int32)
        lens[:k] = body_lens
        body, lens = self._shard(body), self._shard(lens)
        if self.reuse_prefix:
            scores = self._reuse_fn(self.params, self._prefix(prompt), body, lens, tail, targets, valid)
        else:
            scores = self._plain_fn(self.params, prompt.prefix, body, lens, tail, targets, valid)
        return np.asarray(scores)[:k]

    def _prefix(self, prompt: ValuePrompt) -> KVCache:
        key = prompt.prefix.tobytes()
        if key not in self._prefix_memo:
            cache = self._prefix_fn(self.params, prompt.prefix[None])
            if self.mesh is not None:
                cache = jax.device_put(cache, NamedSharding(self.mesh, PartitionSpec()))
            self._prefix_memo[key] = cache
        return self._prefix_memo[key]

    def _shard(self, x: np.ndarray) -> jax.Array | np.ndarray:
        if self.mesh is None:
            return x
        return jax.device_put(x, NamedSharding(self.mesh, PartitionSpec("data")))
