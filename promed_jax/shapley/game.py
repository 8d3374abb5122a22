"""The Shapley value game: v(S) for many coalitions of one case's facts in few jitted calls (promed.md §2).

v(S) is the mean log-probability of the gold answer tokens after the raw value prompt that lists only the
facts of S (teacher forcing). The prompt is tokenized once, piece by piece (`layout.ValuePrompt`); a
coalition's prompt is the concatenation of its pieces, so dropping a fact drops exactly its tokens
(`coalition_ids` is the definition, one prompt at a time).

Batched layout of one coalition row, in cache slots (a prefix tree over the facts, `plan.plan_levels`):

    [ header: P ] [ level 1: kept facts of [0, b1) ] ... [ leaf: kept facts of [b_m-1, n) + question[:-1] ] [ tail: A ]

The header is computed once at [1, P]. A level computes the kept tokens of its run of facts once per
distinct path above it (coalitions that agree on facts [0, b) share that node's keys and values); the
leaves, one per coalition, add the last run of facts, the question and the tail question[-1] + answer[:-1],
whose logits score the answer. Dropped facts' tokens are gathered out rather than masked (less compute),
positions count only kept tokens, and each row's mask sees only its own path, so every row sees exactly
its own prompt. Only the tail's logits are computed. The plan (`plan.py`) cuts each level into chunks of
few shapes and, under a memory budget, the coalitions into groups whose trees fit; this module runs it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from promed_jax.data.cases import Case
from promed_jax.errors import ConfigError
from promed_jax.models.transformer import KVCache, init_cache
from promed_jax.shapley import memory
from promed_jax.shapley.estimators import MemoValue
from promed_jax.shapley.layout import (
    ValuePrompt,
    answer_tail,
    chunk_sizes,
    coalition_ids,
    kept_facts,
    length_bucket,
    tokenize_value_prompt,
)
from promed_jax.shapley.plan import Batching, MemoryModel, TreePlan, plan_groups

__all__ = ["CoalitionGame", "ValuePrompt", "coalition_ids", "tokenize_value_prompt"]


def _layout(prefix_len: int, body_len: jax.Array, body_slots: int, tail_slots: int):
    """Slot validity bool[K, S] and positions int32[K, S] of the no-reuse rows (S = P + Lb + A)."""
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


def _header_cache(graphdef, params, prefix: jax.Array, *, slots: int) -> KVCache:
    """Keys and values of the shared header, computed once: prefix int32[1, P] -> KVCache [1, slots]."""
    model = nnx.merge(graphdef, params)
    p = prefix.shape[1]
    positions = jnp.arange(p, dtype=jnp.int32)[None]
    key_valid = (jnp.arange(slots) < p)[None]
    _, cache = model(
        prefix,
        positions,
        _attention_mask(key_valid, jnp.arange(p)),
        cache=init_cache(model.config, 1, slots),
        cache_index=jnp.int32(0),
        use_lora=False,
    )
    return cache


def _gather_rows(cache: KVCache, rows: jax.Array, *, slots: int) -> KVCache:
    """The parents' rows `rows` int32[R] for a level's nodes (a parent may have several children), padded
    with empty slots to the level's `slots`: KVCache [B, S] -> [R, slots]."""

    def gather(x: jax.Array) -> jax.Array:
        x = jnp.take(x, rows, axis=0)
        return jnp.pad(x, ((0, 0), (0, slots - x.shape[1]), (0, 0), (0, 0)))

    return jax.tree.map(gather, cache)


def _extend(graphdef, params, cache: KVCache, tokens, positions, key_valid, start) -> KVCache:
    """Writes tokens int32[R, L] into slots [start, start + L) of each row's cache [R, S]; key_valid bool[R, S]
    marks the slots each row's tokens see (its own path through the fact tree), positions int32[R, L]."""
    model = nnx.merge(graphdef, params)
    query_slots = start + jnp.arange(tokens.shape[1])
    _, cache = model(
        tokens, positions, _attention_mask(key_valid, query_slots), cache=cache, cache_index=start, use_lora=False
    )
    return cache


def _leaf_scores(graphdef, params, cache, tokens, positions, key_valid, start, tail, tail_positions, targets, valid):
    """float32[R]: the leaf tokens [R, Lb] at `start`, then the tail (question[-1] + answer[:-1], int32[A]) right
    after them, scored against the answer (targets int32[A], valid bool[A]). The leaf's logits are unused and
    compiled away; only the tail's are computed."""
    model = nnx.merge(graphdef, params)
    cache = _extend(graphdef, params, cache, tokens, positions, key_valid, start)
    r, a = tokens.shape[0], tail.shape[0]
    tail_start = start + tokens.shape[1]
    logits, _ = model(
        jnp.broadcast_to(tail, (r, a)),
        tail_positions,
        _attention_mask(key_valid, tail_start + jnp.arange(a)),
        cache=cache,
        cache_index=tail_start,
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

    The coalitions of a call share computation through a prefix tree over the facts (`plan.plan_tree`): the
    header is computed once at [1, P]; each level computes the kept tokens of a run of facts once per
    distinct path above it, and the leaves (one per coalition) compute only their last run of facts, the
    question and the answer. Each row's positions count only its kept tokens and its attention mask sees
    only its own path, so every row sees exactly its own prompt.

    Args:
      model: the `Transformer` (θ, used without LoRA).
      tokenizer: its tokenizer.
      batch_size: coalitions (or tree nodes) per forward at most (chunks are padded to a power of two).
      min_batch: the smallest chunk (a multiple of the mesh's data axis when sharded).
      mesh: optional; the coalition axis is sharded over its `data` axis; weights not yet on the mesh are
        replicated over it (a model loaded with `load_model(..., mesh=mesh)` keeps its own shardings).
      reuse_prefix: compute the header once and share fact prefixes (True), or compute every row's whole
        prompt in one cache-free forward (False; the reference the tests compare against, unbudgeted).
      share_facts: with `reuse_prefix`, share fact prefixes between coalitions through the tree (True) or
        compute each coalition's kept facts itself (False: the flat layout).
      call_cost: a forward's fixed cost in token slots, for planning the tree (`plan.plan_levels`).
      max_cache_bytes: the most bytes of KV cache and activations a call may hold (`plan.MemoryModel`, whole
        mesh); the coalitions are cut into groups that fit (`plan.plan_groups`). None: no bound.
      max_executables: compiled executables stay in memory (about 20 MB each for SmolLM2 on CPU) and each new
        shape adds one; when a new case starts (`value_fn`) with more than this many, every compiled executable
        is dropped (`memory.release`: shapes met again recompile); the C heap is trimmed before every case
        (freed memory glibc keeps otherwise: 1.7 GB after 8 SmolLM2 cases). None: keep them.
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
        share_facts: bool = True,
        call_cost: float = 32.0,
        max_cache_bytes: int | None = None,
        max_executables: int | None = 24,
    ):
        if max_cache_bytes is not None and max_cache_bytes <= 0:
            raise ConfigError(f"shapley.max_cache_bytes={max_cache_bytes}: must be positive")
        self.tokenizer = tokenizer
        self.pad_id = int(tokenizer.pad_token_id or 0)
        self.mesh = mesh
        self.reuse_prefix = reuse_prefix
        self.share_facts = share_facts
        self.max_cache_bytes = max_cache_bytes
        self.max_executables = max_executables
        self.memory = MemoryModel.of(model.config)
        data = 1 if mesh is None else mesh.shape["data"]
        min_batch = -(-max(min_batch, data) // data) * data
        self.batching = Batching(
            min_batch=min_batch, batch_size=max(min_batch, -(-batch_size // data) * data), call_cost=call_cost
        )
        graphdef, params = nnx.split(model)
        if mesh is not None and not _placed_on(params, mesh):
            params = jax.device_put(params, NamedSharding(mesh, PartitionSpec()))
        self.params = params
        self._header_fn = jax.jit(functools.partial(_header_cache, graphdef), static_argnames="slots")
        self._gather_fn = jax.jit(_gather_rows, static_argnames="slots")
        self._extend_fn = jax.jit(functools.partial(_extend, graphdef), donate_argnums=1)
        self._leaf_fn = jax.jit(functools.partial(_leaf_scores, graphdef))
        self._plain_fn = jax.jit(functools.partial(_scores_without_reuse, graphdef))
        self._compiled = (self._header_fn, self._gather_fn, self._extend_fn, self._leaf_fn, self._plain_fn)
        self._header_memo: dict[tuple[bytes, int], KVCache] = {}

    @property
    def min_batch(self) -> int:
        return self.batching.min_batch

    @property
    def batch_size(self) -> int:
        return self.batching.batch_size

    def prompt(self, case: Case) -> ValuePrompt:
        return tokenize_value_prompt(self.tokenizer, case)

    @property
    def executables(self) -> int:
        """Compiled executables the game holds now."""
        return sum(fn._cache_size() for fn in self._compiled)

    def value_fn(
        self, case: Case, progress: Callable[[int], object] | None = None, *, prompt: ValuePrompt | None = None
    ) -> MemoValue:
        """The memoized value function of one case, tokenized once (`prompt`: its `self.prompt(case)` if the
        caller has it already); `progress(k)` after each k coalitions."""
        memory.release(self._compiled, self.max_executables)
        prompt = self.prompt(case) if prompt is None else prompt
        return MemoValue(functools.partial(self.values, prompt, progress=progress), prompt.n)

    def values(
        self, prompt: ValuePrompt, coalitions: np.ndarray, progress: Callable[[int], object] | None = None
    ) -> np.ndarray:
        """bool[K, n] -> float32[K]: v of each coalition, in order; `progress(k)` after each group of k."""
        coalitions = np.asarray(coalitions, dtype=bool)
        if coalitions.ndim != 2 or coalitions.shape[1] != prompt.n:
            raise ValueError(f"coalitions must be bool[K, {prompt.n}], got shape {coalitions.shape}")
        if len(coalitions) == 0:
            return np.zeros(0, np.float32)
        if not self.reuse_prefix:
            out = self._values_without_reuse(prompt, coalitions)
            if progress is not None:
                progress(len(coalitions))
            return out
        out = np.empty(len(coalitions), np.float32)
        for i, (rows, plan) in enumerate(self.plans(prompt, coalitions)):
            if i:  # the last group's freed rows leave the process (glibc's arenas keep them otherwise)
                memory.trim_heap()
            out[rows] = self._run_tree(prompt, plan)
            if progress is not None:
                progress(len(rows))
        return out

    def plans(self, prompt: ValuePrompt, coalitions: np.ndarray) -> list[tuple[np.ndarray, TreePlan]]:
        """(coalition indices, their tree) of each group a call of `values` runs (`plan.plan_groups`)."""
        return plan_groups(
            prompt,
            coalitions,
            self.batching,
            share_facts=self.share_facts,
            tail_slots=answer_tail(prompt, self.pad_id)[0].size,
            memory=self.memory,
            max_bytes=self.max_cache_bytes,
        )

    # -- the prefix tree -------------------------------------------------------------------------------------

    def _run_tree(self, prompt: ValuePrompt, plan: TreePlan) -> np.ndarray:
        """float32[K]: the values of the plan's leaves, in their order."""
        tail, targets, valid = answer_tail(prompt, self.pad_id)
        p, levels = prompt.prefix.size, plan.levels
        leaf = levels[-1]
        fact_lens = prompt.fact_lens
        cache = self._header(prompt, plan.header_slots)
        out = np.empty(len(leaf.rows), np.float32)
        for depth, level in enumerate(levels):
            pieces = []
            for chunk in level.chunks:
                nodes, width, k_pad = chunk.nodes, chunk.width, chunk.rows
                k = len(nodes)
                parent = np.zeros(k_pad, np.int32)
                parent[:k] = level.parent[nodes]
                rows_cache = self._gather_fn(cache, parent, slots=level.slots)
                if self.mesh is not None:
                    rows_cache = jax.device_put(rows_cache, NamedSharding(self.mesh, PartitionSpec("data")))
                if width == 0:
                    pieces.append(rows_cache)
                    continue
                tokens = np.full((k_pad, width), self.pad_id, np.int32)
                key_valid = np.zeros((k_pad, level.slots), bool)
                key_valid[:, :p] = True
                lengths = np.full(k_pad, p, np.int64)  # tokens before this level's, per row
                for j, node in enumerate(nodes):
                    ids = level.tokens[node]
                    tokens[j, : ids.size] = ids
                    for above in levels[:depth]:
                        kept = int(level.rows[node][above.a : above.b] @ fact_lens[above.a : above.b])
                        key_valid[j, above.start : above.start + kept] = True
                        lengths[j] += kept
                    key_valid[j, level.start : level.start + ids.size] = True
                positions = (lengths[:, None] + np.arange(width)[None, :]).astype(np.int32)
                if level is leaf:
                    key_valid[:, level.start + width : level.start + width + tail.size] = True
                key_valid_rows = self._shard(key_valid)
                # All steps but the leaves' last write their tokens' keys and values; the last one scores.
                last = width if level is not leaf else width - ((width - 1) % chunk.step + 1)
                for at in range(0, last, chunk.step):
                    end = min(at + chunk.step, last)
                    rows_cache = self._extend_fn(
                        self.params,
                        rows_cache,
                        self._shard(tokens[:, at:end]),
                        self._shard(positions[:, at:end]),
                        key_valid_rows,
                        np.int32(level.start + at),
                    )
                if level is not leaf:
                    pieces.append(rows_cache)
                    continue
                args = (self._shard(tokens[:, last:]), self._shard(positions[:, last:]))
                lengths += np.array([level.tokens[node].size for node in nodes] + [0] * (k_pad - k))
                tail_positions = (lengths[:, None] + np.arange(tail.size)[None, :]).astype(np.int32)
                scores = self._leaf_fn(
                    self.params,
                    rows_cache,
                    *args,
                    key_valid_rows,
                    np.int32(level.start + last),
                    tail,
                    self._shard(tail_positions),
                    targets,
                    valid,
                )
                out[nodes] = np.asarray(scores)[:k]
            if level is not leaf:
                del cache  # the previous level's rows: freed before the concatenation doubles this level's
                cache = jax.tree.map(lambda *xs: jnp.concatenate(xs, axis=0), *pieces)
        return out

    def _header(self, prompt: ValuePrompt, slots: int) -> KVCache:
        key = (prompt.prefix.tobytes(), slots)
        if key not in self._header_memo:
            cache = self._header_fn(self.params, prompt.prefix[None], slots=slots)
            if self.mesh is not None:
                cache = jax.device_put(cache, NamedSharding(self.mesh, PartitionSpec()))
            self._header_memo[key] = cache
        return self._header_memo[key]

    # -- no reuse: each row's whole prompt in one forward (the reference) --------------------------------------

    def _values_without_reuse(self, prompt: ValuePrompt, coalitions: np.ndarray) -> np.ndarray:
        body_lens = coalitions @ prompt.fact_lens + prompt.question.size - 1
        order = np.argsort(body_lens, kind="stable")
        tail, targets, valid = answer_tail(prompt, self.pad_id)
        out = np.empty(len(coalitions), np.float32)
        start = 0
        for size in chunk_sizes(len(coalitions), self.min_batch, self.batch_size):
            rows = order[start : start + size]
            start += size
            k, k_pad = len(rows), self.batching.padded(len(rows))
            body = np.full((k_pad, length_bucket(int(body_lens[rows].max()))), self.pad_id, np.int32)
            for j, keep in enumerate(coalitions[rows]):
                ids = np.concatenate([*kept_facts(prompt, keep), prompt.question[:-1]])
                body[j, : ids.size] = ids
            lens = np.zeros(k_pad, np.int32)
            lens[:k] = body_lens[rows]
            scores = self._plain_fn(
                self.params, prompt.prefix, self._shard(body), self._shard(lens), tail, targets, valid
            )
            out[rows] = np.asarray(scores)[:k]
        return out

    def _shard(self, x: np.ndarray) -> jax.Array | np.ndarray:
        if self.mesh is None:
            return x
        return jax.device_put(x, NamedSharding(self.mesh, PartitionSpec("data")))
