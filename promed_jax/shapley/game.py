"""The Shapley value game: v(S) for many coalitions of one case's facts in one jitted call (promed.md §2).

v(S) is the mean log-probability of the gold answer tokens after the raw value prompt that lists only the
facts of S (teacher forcing). The prompt is tokenized once, piece by piece (`ValuePrompt`); a coalition's
prompt is the concatenation of its pieces, so dropping a fact drops exactly its tokens (`coalition_ids` is
the definition, one prompt at a time).

Batched layout of one coalition row, in cache slots (a prefix tree over the facts, `plan_levels`):

    [ header: P ] [ level 1: kept facts of [0, b1) ] ... [ leaf: kept facts of [b_m-1, n) + question[:-1] ] [ tail: A ]

The header is computed once at [1, P]. A level computes the kept tokens of its run of facts once per
distinct path above it (coalitions that agree on facts [0, b) share that node's keys and values); the
leaves, one per coalition, add the last run of facts, the question and the tail question[-1] + answer[:-1],
whose logits score the answer. Dropped facts' tokens are gathered out rather than masked (less compute),
positions count only kept tokens, and each row's mask sees only its own path, so every row sees exactly
its own prompt. Only the tail's logits are computed. Nodes are sorted by length and cut into chunks of
power-of-two sizes whose widths are rounded up to a few buckets, so a dataset compiles a handful of times.
The split points minimize the tokens computed for the coalitions of each call; with all 2^n coalitions
each coalition computes about one fact, the question and the tail instead of half of all facts.
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


def _gather_rows(cache: KVCache, rows: jax.Array) -> KVCache:
    """The cache rows `rows` int32[R] of a level's nodes (a parent may have several children)."""
    return jax.tree.map(lambda x: jnp.take(x, rows, axis=0), cache)


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


def segment_bucket(length: int) -> int:
    """Slots for a segment of `length` new tokens: a multiple of 8 up to 64 (fact runs and leaves are short,
    and padding them costs as much as computing them), `length_bucket` above."""
    return -(-max(length, 1) // 8) * 8 if length <= 64 else length_bucket(length)


def padded_rows(k: int, min_batch: int, batch_size: int) -> int:
    """Rows a chunk of k rows is padded to: min_batch·2^j, at most batch_size (few compiled shapes)."""
    k_pad = min_batch
    while k_pad < k:
        k_pad *= 2
    return min(k_pad, batch_size)


def chunk_nodes(lengths: np.ndarray, *, min_batch: int, batch_size: int) -> list[tuple[np.ndarray, int]]:
    """How the game cuts a level's nodes into forwards: the nodes with new tokens (length > 0) sorted by
    length, in chunks of `chunk_sizes`; each chunk is (node indices, slots written = its longest, rounded up)."""
    order = np.argsort(lengths, kind="stable")
    order = order[lengths[order] > 0]
    chunks, at = [], 0
    for size in chunk_sizes(len(order), min_batch, batch_size):
        nodes = order[at : at + size]
        chunks.append((nodes, segment_bucket(int(lengths[nodes[-1]]))))
        at += size
    return chunks


def level_cost(lengths: np.ndarray, *, min_batch: int, batch_size: int, call_cost: float) -> float:
    """Slots one level's forwards compute, padded as the game pads them (`chunk_nodes`, rows rounded up by
    `padded_rows`), plus `call_cost` per forward for its fixed cost; nodes of length 0 are free copies."""
    return sum(
        call_cost + padded_rows(len(nodes), min_batch, batch_size) * width
        for nodes, width in chunk_nodes(lengths, min_batch=min_batch, batch_size=batch_size)
    )


def plan_levels(
    fact_lens: np.ndarray,
    coalitions: np.ndarray,
    *,
    leaf_tokens: int = 0,
    min_batch: int = 1,
    batch_size: int = 16,
    call_cost: float = 32.0,
) -> list[int]:
    """Where to cut the fact list into the levels of a prefix tree, for these coalitions.

    A level [a, b) has one node per distinct restriction of the coalitions to facts [0, b) whose facts in
    [a, b) are not all dropped (those copy their parent); a node computes the kept tokens of [a, b) once for
    all the coalitions below it. The leaves (b = n) are the coalitions, each also computing `leaf_tokens`
    more (the question). Returns boundaries 0 < b_1 < ... < b_m = n minimizing `level_cost` summed over the
    levels: a shortest path over the boundaries. [n] alone is the flat layout, each coalition computing all
    its kept facts. `call_cost` is a forward's fixed cost in slots (on 2 CPU cores about 30: ~50 ms).
    """
    n = coalitions.shape[1]
    if n == 0:
        return [0]
    sizes = {"min_batch": min_batch, "batch_size": batch_size, "call_cost": call_cost}
    lens = np.asarray(fact_lens, dtype=np.int64)
    best = np.full(n + 1, np.inf)
    best[0] = 0.0
    previous = np.zeros(n + 1, dtype=np.int64)
    for b in range(1, n + 1):
        nodes = coalitions[:, :b] if b == n else np.unique(coalitions[:, :b], axis=0)
        # tokens of every node over [a, b) for all a at once: suffix sums of the kept lengths
        suffix = np.cumsum((nodes * lens[:b])[:, ::-1], axis=1)[:, ::-1]  # [U, b]: column a = tokens in [a, b)
        for a in range(b):
            lengths = suffix[:, a]
            if b == n:  # a leaf adds the question and always runs (it scores the answer), as in _chunk_level
                lengths = np.maximum(lengths + leaf_tokens, 1)
            total = best[a] + level_cost(lengths, **sizes)
            if total < best[b]:
                best[b], previous[b] = total, a
    bounds = [n]
    while bounds[-1] > 0 and previous[bounds[-1]] > 0:
        bounds.append(int(previous[bounds[-1]]))
    return bounds[::-1]


def _placed_on(params, mesh: Mesh) -> bool:
    """Whether every array already lives on `mesh` (a model loaded under its logical shardings)."""
    return all(
        isinstance(x.sharding, NamedSharding) and x.sharding.mesh == mesh
        for x in jax.tree.leaves(params)
        if isinstance(x, jax.Array)
    )


@dataclasses.dataclass
class _Level:
    """One level of the fact tree, facts [a, b), planned on the host; U nodes.

    parent: int[U], each node's row in the previous level's cache array (0: the header); rows: bool[U, b],
    each node's restriction of the coalitions to facts [0, b) (the leaf level: the coalitions themselves);
    tokens: the new token ids of each node (its kept facts of [a, b); the leaves add question[:-1]);
    start: the first cache slot this level writes; chunks: (node indices, slots written) per forward.
    """

    a: int
    b: int
    parent: np.ndarray
    rows: np.ndarray
    tokens: list[np.ndarray]
    start: int
    width: int = 0  # slots this level's chunks may write (the largest segment bucket)
    chunks: list[tuple[np.ndarray, int]] = dataclasses.field(default_factory=list)


class CoalitionGame:
    """Batched coalition values of one frozen model: `game.value_fn(case)(bool[K, n]) -> float32[K]`.

    The coalitions of a call share computation through a prefix tree over the facts (`plan_levels`): the
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
        prompt in one cache-free forward (False; the reference the tests compare against).
      share_facts: with `reuse_prefix`, share fact prefixes between coalitions through the tree (True) or
        compute each coalition's kept facts itself (False: the flat layout).
      call_cost: a forward's fixed cost in token slots, for planning the tree (`plan_levels`).
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
    ):
        self.tokenizer = tokenizer
        self.pad_id = int(tokenizer.pad_token_id or 0)
        self.mesh = mesh
        self.reuse_prefix = reuse_prefix
        self.share_facts = share_facts
        self.call_cost = call_cost
        data = 1 if mesh is None else mesh.shape["data"]
        self.min_batch = -(-max(min_batch, data) // data) * data
        self.batch_size = max(self.min_batch, -(-batch_size // data) * data)
        graphdef, params = nnx.split(model)
        if mesh is not None and not _placed_on(params, mesh):
            params = jax.device_put(params, NamedSharding(mesh, PartitionSpec()))
        self.params = params
        self._header_fn = jax.jit(functools.partial(_header_cache, graphdef), static_argnames="slots")
        self._gather_fn = jax.jit(_gather_rows)
        self._extend_fn = jax.jit(functools.partial(_extend, graphdef), donate_argnums=1)
        self._leaf_fn = jax.jit(functools.partial(_leaf_scores, graphdef))
        self._plain_fn = jax.jit(functools.partial(_scores_without_reuse, graphdef))
        self._header_memo: dict[tuple[bytes, int], KVCache] = {}

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
        if len(coalitions) == 0:
            return np.zeros(0, np.float32)
        if not self.reuse_prefix:
            return self._values_without_reuse(prompt, coalitions)
        return self._values_tree(prompt, coalitions)

    # -- the prefix tree -------------------------------------------------------------------------------------

    def _padded(self, k: int) -> int:
        return padded_rows(k, self.min_batch, self.batch_size)

    def _plan(self, prompt: ValuePrompt, coalitions: np.ndarray) -> list[_Level]:
        n = prompt.n
        fact_lens = np.array([f.size for f in prompt.facts], dtype=np.int64)
        bounds = [n]
        if self.share_facts:
            bounds = plan_levels(
                fact_lens,
                coalitions,
                leaf_tokens=prompt.question.size - 1,
                min_batch=self.min_batch,
                batch_size=self.batch_size,
                call_cost=self.call_cost,
            )
        levels, start = [], prompt.prefix.size
        index = {b"": 0}  # row of each node of the previous level, keyed by its restriction's bytes
        for a, b in zip([0, *bounds[:-1]], bounds, strict=True):
            rows = coalitions if b == n else np.unique(coalitions[:, :b], axis=0)
            no_tokens = np.zeros(0, np.int32)
            tokens = [np.concatenate([no_tokens, *(prompt.facts[i] for i in range(a, b) if r[i])]) for r in rows]
            if b == n:
                tokens = [np.concatenate([t, prompt.question[:-1]]) for t in tokens]
            parent = np.array([index[r[:a].tobytes()] for r in rows], dtype=np.int32)
            level = _Level(a=a, b=b, parent=parent, rows=rows, tokens=tokens, start=start)
            self._chunk_level(level, leaf=b == n)
            levels.append(level)
            index, offset = {}, 0
            for nodes, _ in level.chunks:
                index.update((rows[node].tobytes(), offset + j) for j, node in enumerate(nodes))
                offset += self._padded(len(nodes))
            start += level.width
        return levels

    def _chunk_level(self, level: _Level, *, leaf: bool) -> None:
        """Cuts a level's nodes into chunks (`chunk_nodes`); above the leaves, nodes with no new tokens (all
        facts of the level dropped) go in chunks of width 0: copies of their parents. Every leaf runs: it
        scores the answer."""
        lengths = np.array([t.size for t in level.tokens])
        if leaf:
            lengths = np.maximum(lengths, 1)
        empty = np.flatnonzero(lengths == 0)
        level.chunks = [(empty[at : at + self.batch_size], 0) for at in range(0, len(empty), self.batch_size)]
        level.chunks += chunk_nodes(lengths, min_batch=self.min_batch, batch_size=self.batch_size)
        level.width = max((width for _, width in level.chunks), default=0)

    def _values_tree(self, prompt: ValuePrompt, coalitions: np.ndarray) -> np.ndarray:
        levels = self._plan(prompt, coalitions)
        tail, targets, valid = self._tail(prompt)
        p, leaf = prompt.prefix.size, levels[-1]
        slots = length_bucket(leaf.start + leaf.width + tail.size)
        fact_lens = np.array([f.size for f in prompt.facts], dtype=np.int64)
        cache = self._header(prompt, slots)
        out = np.empty(len(coalitions), np.float32)
        for depth, level in enumerate(levels):
            pieces = []
            for nodes, width in level.chunks:
                k, k_pad = len(nodes), self._padded(len(nodes))
                parent = np.zeros(k_pad, np.int32)
                parent[:k] = level.parent[nodes]
                rows_cache = self._gather_fn(cache, parent)
                if self.mesh is not None:
                    rows_cache = jax.device_put(rows_cache, NamedSharding(self.mesh, PartitionSpec("data")))
                if width == 0:
                    pieces.append(rows_cache)
                    continue
                tokens = np.full((k_pad, width), self.pad_id, np.int32)
                key_valid = np.zeros((k_pad, slots), bool)
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
                args = (self._shard(tokens), self._shard(positions))
                if level is not leaf:
                    pieces.append(
                        self._extend_fn(self.params, rows_cache, *args, self._shard(key_valid), np.int32(level.start))
                    )
                    continue
                key_valid[:, level.start + width : level.start + width + tail.size] = True
                lengths += np.array([level.tokens[node].size for node in nodes] + [0] * (k_pad - k))
                tail_positions = (lengths[:, None] + np.arange(tail.size)[None, :]).astype(np.int32)
                scores = self._leaf_fn(
                    self.params,
                    rows_cache,
                    *args,
                    self._shard(key_valid),
                    np.int32(level.start),
                    tail,
                    self._shard(tail_positions),
                    targets,
                    valid,
                )
                out[nodes] = np.asarray(scores)[:k]
            if level is not leaf:
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
        fact_lens = np.array([f.size for f in prompt.facts], dtype=np.int64)
        body_lens = coalitions @ fact_lens + prompt.question.size - 1
        order = np.argsort(body_lens, kind="stable")
        tail, targets, valid = self._tail(prompt)
        out = np.empty(len(coalitions), np.float32)
        start = 0
        for size in chunk_sizes(len(coalitions), self.min_batch, self.batch_size):
            rows = order[start : start + size]
            start += size
            k, k_pad = len(rows), self._padded(len(rows))
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

    def _tail(self, prompt: ValuePrompt):
        a = prompt.answer.size
        slots = -(-a // 8) * 8
        tail = np.full(slots, self.pad_id, np.int32)
        tail[:a] = np.concatenate([prompt.question[-1:], prompt.answer[:-1]])
        targets = np.zeros(slots, np.int32)
        targets[:a] = prompt.answer
        return tail, targets, np.arange(slots) < a

    def _shard(self, x: np.ndarray) -> jax.Array | np.ndarray:
        if self.mesh is None:
            return x
        return jax.device_put(x, NamedSharding(self.mesh, PartitionSpec("data")))
