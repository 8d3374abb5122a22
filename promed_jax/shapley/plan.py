"""The plan of a batch of coalitions: a prefix tree over the facts, its forwards, and the memory they take.

A call's coalitions share computation through a prefix tree (`plan_levels` picks its cut points by a cost
model of the forwards): the header is computed once; a level [a, b) computes the kept tokens of facts [a, b)
once per distinct path above it; the leaves, one per coalition, add the last run of facts and the question.
Every node keeps a cache row of the whole row's slots (`TreePlan.slots`: one shape for all the forwards of a
call, so few compiled executables, which stay in memory), so K coalitions of n facts keep about K·n keys
and values per layer. `plan_groups` bounds it: when the plan of all coalitions would take more than
`max_bytes` (`MemoryModel`), the coalitions are sorted (so that a group keeps its shared prefixes) and
halved until every group's plan fits; each group runs on its own. Of a few sort keys (`key_orders`) the
grouping that computes least (`plan_cost`) is kept, and a small group that does not fit tries narrower
forwards of its tree before the flat layout. The plan types are frozen: the game only reads them.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from promed_jax.errors import ConfigError
from promed_jax.models.config import ModelConfig
from promed_jax.shapley.layout import ValuePrompt, chunk_nodes, length_bucket, padded_rows


@dataclasses.dataclass(frozen=True)
class Batching:
    """How rows are cut into forwards: at most `batch_size` rows, padded to `min_batch`·2^j; `call_cost` is
    a forward's fixed cost in token slots (on 2 CPU cores about 30: ~50 ms), for the tree's cost model."""

    min_batch: int
    batch_size: int
    call_cost: float = 32.0

    def padded(self, k: int) -> int:
        return padded_rows(k, self.min_batch, self.batch_size)


@dataclasses.dataclass(frozen=True)
class Chunk:
    """The rows of a level computed together: nodes int[k] (indices into the level), `width` slots written (0:
    the rows are copies of their parents: all the level's facts dropped), `rows` = k padded, `step` the
    tokens of each forward (the width in forwards of `step` tokens and a last one of the rest: a wide chunk
    under a tight budget is computed piece by piece, exactly, since a query never sees later slots)."""

    nodes: np.ndarray
    width: int
    rows: int
    step: int


@dataclasses.dataclass(frozen=True)
class Level:
    """One level of the fact tree, facts [a, b); U nodes.

    parent: int32[U], each node's row in the previous level's cache array (0: the header); rows: bool[U, b],
    each node's restriction of the coalitions to facts [0, b) (the leaf level: the coalitions themselves);
    tokens: U arrays int32, the new token ids of each node (its kept facts of [a, b); the leaves add
    question[:-1]); start: the first cache slot this level writes; width: the slots its chunks may write;
    slots: the cache slots of its rows (the whole row with the tail, bucketed, at every level: rows cut at
    each level's end took less memory but compiled several times more shapes, whose executables stay);
    chunks: its forwards, in the order their rows are stacked into the level's cache.
    """

    a: int
    b: int
    parent: np.ndarray
    rows: np.ndarray
    tokens: tuple[np.ndarray, ...]
    start: int
    width: int
    slots: int
    chunks: tuple[Chunk, ...]

    @property
    def cache_rows(self) -> int:
        """Rows of this level's cache array (every chunk padded)."""
        return sum(c.rows for c in self.chunks)


@dataclasses.dataclass(frozen=True)
class TreePlan:
    """The levels of one call (the last is the leaves: one node per coalition, in the coalitions' order) and
    the header's cache slots (`header_slots`, its P tokens bucketed)."""

    levels: tuple[Level, ...]
    header_slots: int

    @property
    def slots(self) -> int:
        """A leaf row's slots: header + every level's width + the tail, bucketed."""
        return self.levels[-1].slots

    @property
    def peak_cache_slots(self) -> int:
        """Cache slots (rows x slots) alive at once: a level's input and its chunks, then the chunks and their
        concatenation (2x its rows); at the leaves, the input and a chunk's rows twice (gathered, written)."""
        before, peak = self.header_slots, 0
        for level in self.levels[:-1]:
            size = level.cache_rows * level.slots
            peak = max(peak, before + size, 2 * size)
            before = size
        return max(peak, before + 2 * max(c.rows for c in self.levels[-1].chunks) * self.slots)


@dataclasses.dataclass(frozen=True)
class MemoryModel:
    """Bytes of the game's arrays, from the model's shapes.

    kv_slot_bytes: keys and values of one cache slot of one row, all layers; the rest sizes one forward's
    transient activations (one layer's at a time).
    """

    kv_slot_bytes: int
    heads: int
    hidden: int
    intermediate: int
    vocab: int
    itemsize: int

    @classmethod
    def of(cls, config: ModelConfig) -> MemoryModel:
        itemsize = np.dtype(config.compute_dtype).itemsize
        return cls(
            kv_slot_bytes=2 * config.num_layers * config.num_kv_heads * config.head_dim * itemsize,
            heads=config.num_heads,
            hidden=config.hidden_size,
            intermediate=config.intermediate_size,
            vocab=config.vocab_size,
            itemsize=itemsize,
        )

    def forward_bytes(self, rows: int, tokens: int, slots: int, *, scored: bool = False) -> int:
        """One forward of rows x tokens against `slots` cache slots: float32 attention scores, their masked
        and normalized copies [rows, heads, tokens, slots], the mask, the MLP and residual activations, and
        with `scored` the float32 logits and log-probabilities [rows, tokens, vocab]."""
        per_token = 3 * self.heads * slots * 4 + slots + (3 * self.intermediate + 4 * self.hidden) * self.itemsize
        return rows * tokens * (per_token + (2 * self.vocab * 4 if scored else 0))

    def step(self, rows: int, slots: int, max_bytes: int) -> int:
        """The most tokens (a multiple of 8, at least 8) a forward of `rows` rows may take within `max_bytes`."""
        return max(8, max_bytes // self.forward_bytes(rows, 8, slots) * 8)

    def plan_bytes(self, plan: TreePlan, tail_slots: int) -> int:
        """The KV cache alive at the plan's peak plus its largest forward's activations."""
        forwards = [self.forward_bytes(c.rows, c.step, level.slots) for level in plan.levels for c in level.chunks]
        leaves = plan.levels[-1].chunks
        forwards += [self.forward_bytes(c.rows, tail_slots, plan.slots, scored=True) for c in leaves]
        return plan.peak_cache_slots * self.kv_slot_bytes + max(forwards)


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
    its kept facts.
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
            if b == n:  # a leaf adds the question and always runs (it scores the answer), as in _chunks
                lengths = np.maximum(lengths + leaf_tokens, 1)
            total = best[a] + level_cost(lengths, **sizes)
            if total < best[b]:
                best[b], previous[b] = total, a
    bounds = [n]
    while bounds[-1] > 0 and previous[bounds[-1]] > 0:
        bounds.append(int(previous[bounds[-1]]))
    return bounds[::-1]


def _cut(lengths: np.ndarray, batching: Batching, *, leaf: bool) -> list[tuple[np.ndarray, int]]:
    """A level's chunks (`chunk_nodes`) as (nodes, width); above the leaves, nodes with no new tokens (all
    facts of the level dropped) go in chunks of width 0: copies of their parents. Every leaf runs: it scores
    the answer."""
    if leaf:
        lengths = np.maximum(lengths, 1)
    empty = np.flatnonzero(lengths == 0)
    cut = [(empty[at : at + batching.batch_size], 0) for at in range(0, len(empty), batching.batch_size)]
    return cut + chunk_nodes(lengths, min_batch=batching.min_batch, batch_size=batching.batch_size)


def plan_tree(
    prompt: ValuePrompt,
    coalitions: np.ndarray,
    batching: Batching,
    *,
    share_facts: bool,
    tail_slots: int,
    memory: MemoryModel | None = None,
    max_forward_bytes: int | None = None,
) -> TreePlan:
    """The prefix tree of coalitions bool[K, n] (`plan_levels`; one leaf level with `share_facts` off). With
    `max_forward_bytes`, a chunk whose forward would take more is computed in steps that fit (`Chunk.step`)."""
    n = prompt.n
    bounds = [n]
    if share_facts:
        bounds = plan_levels(
            prompt.fact_lens,
            coalitions,
            leaf_tokens=prompt.question.size - 1,
            min_batch=batching.min_batch,
            batch_size=batching.batch_size,
            call_cost=batching.call_cost,
        )
    levels, start = [], prompt.prefix.size
    index = {b"": 0}  # row of each node of the previous level, keyed by its restriction's bytes
    no_tokens = np.zeros(0, np.int32)
    for a, b in zip([0, *bounds[:-1]], bounds, strict=True):
        leaf = b == n
        rows = coalitions if leaf else np.unique(coalitions[:, :b], axis=0)
        tokens = [np.concatenate([no_tokens, *(prompt.facts[i] for i in range(a, b) if r[i])]) for r in rows]
        if leaf:
            tokens = [np.concatenate([t, prompt.question[:-1]]) for t in tokens]
        parent = np.array([index[r[:a].tobytes()] for r in rows], dtype=np.int32)
        cut = _cut(np.array([t.size for t in tokens]), batching, leaf=leaf)
        width = max((w for _, w in cut), default=0)
        levels.append((a, b, parent, rows, tuple(tokens), start, width, cut))
        index, offset = {}, 0
        for nodes, _ in cut:
            index.update((rows[node].tobytes(), offset + j) for j, node in enumerate(nodes))
            offset += batching.padded(len(nodes))
        start += width

    slots = length_bucket(start + tail_slots)

    def chunk(nodes: np.ndarray, width: int) -> Chunk:
        rows = batching.padded(len(nodes))
        step = width if max_forward_bytes is None else min(width, memory.step(rows, slots, max_forward_bytes))
        return Chunk(nodes=nodes, width=width, rows=rows, step=step)

    return TreePlan(
        levels=tuple(Level(*fields, slots=slots, chunks=tuple(chunk(*c) for c in cut)) for *fields, cut in levels),
        header_slots=length_bucket(prompt.prefix.size),
    )


def plan_cost(plan: TreePlan, batching: Batching) -> float:
    """Token slots a plan's forwards compute (rows x width, padding included) plus `call_cost` per forward:
    the cost model of `plan_levels`, summed over the whole plan (a chunk computed in steps pays per step;
    chunks of width 0 are copies, free)."""
    return sum(
        batching.call_cost * -(-c.width // c.step) + c.rows * c.width
        for level in plan.levels
        for c in level.chunks
        if c.width
    )


def key_orders(fact_lens: np.ndarray) -> list[tuple[int, ...]]:
    """The fact orders `plan_groups` tries as its sort key (the first is the primary key), distinct ones only:
    the facts' own order (a group shares its leading facts, so the upper levels hold few nodes), and the same
    led by the longest fact, then by the two longest (a group then holds that fact present or absent, so its
    leaves are not all padded to the long fact's width: on a MedQA case whose last fact took 197 of its 402
    tokens, the facts' order alone computed 1.8x the tokens of one unbudgeted tree)."""
    n = len(fact_lens)
    natural = tuple(range(n))
    longest = [int(i) for i in np.argsort(-np.asarray(fact_lens), kind="stable")]
    orders = [natural]
    for k in (1, 2):
        led = tuple(longest[:k]) + tuple(i for i in natural if i not in longest[:k])
        if led not in orders:
            orders.append(led)
    return orders


def plan_groups(
    prompt: ValuePrompt,
    coalitions: np.ndarray,
    batching: Batching,
    *,
    share_facts: bool,
    tail_slots: int,
    memory: MemoryModel,
    max_bytes: int | None,
) -> list[tuple[np.ndarray, TreePlan]]:
    """(coalition indices int[k], their plan) per group, each plan within `max_bytes` (`MemoryModel.plan_bytes`).

    All coalitions in one plan when it fits (or `max_bytes` is None), as without a budget. Otherwise they
    are sorted lexicographically, so that a group's coalitions share their leading facts, and halved (at
    multiples of `batch_size`) until each group fits; a group of at most `batch_size` coalitions whose tree
    does not fit takes the cheapest plan that fits of its tree and the flat layout (the least memory: the
    header and its own chunks), with forwards of fewer rows (`_fit_small`). A forward may take a quarter of
    the budget (wider chunks are computed in steps); the rest bounds the cache. The sort is tried with each of `key_orders` as its key and
    the grouping of least `plan_cost` is kept (ties: the first). Raises ConfigError when even `min_batch`
    rows do not fit.
    """
    forward = None if max_bytes is None else max_bytes // 4
    options = {"share_facts": share_facts, "tail_slots": tail_slots, "memory": memory, "max_forward_bytes": forward}
    whole = plan_tree(prompt, coalitions, batching, **options)
    if max_bytes is None or memory.plan_bytes(whole, tail_slots) <= max_bytes:
        return [(np.arange(len(coalitions)), whole)]
    best, best_cost = None, np.inf
    for order in key_orders(prompt.fact_lens):
        keys = coalitions[:, list(order)]
        groups = _halve(prompt, coalitions, np.lexsort(keys.T[::-1]), batching, options, max_bytes)
        cost = sum(plan_cost(plan, batching) for _, plan in groups)
        if cost < best_cost:
            best, best_cost = groups, cost
    return best


def _halve(
    prompt: ValuePrompt, coalitions: np.ndarray, order: np.ndarray, batching: Batching, options: dict, max_bytes: int
) -> list[tuple[np.ndarray, TreePlan]]:
    """The groups of `plan_groups` for the coalitions sorted as `order`: halved until each plan fits."""
    memory, tail_slots = options["memory"], options["tail_slots"]
    groups, pending = [], [order]
    while pending:
        rows = pending.pop()
        plan = plan_tree(prompt, coalitions[rows], batching, **options)
        small = len(rows) <= batching.batch_size
        narrow = batching
        if small and memory.plan_bytes(plan, tail_slots) > max_bytes:
            plan, narrow = _fit_small(prompt, coalitions[rows], batching, options, max_bytes)
        need = memory.plan_bytes(plan, tail_slots)
        if need <= max_bytes:
            groups.append((rows, plan))
        elif small:
            raise ConfigError(
                f"shapley.max_cache_bytes={max_bytes}: one forward of {narrow.batch_size} coalitions of a "
                f"{prompt.n}-fact prompt ({plan.slots} slots) needs about {need} bytes; raise it"
            )
        else:
            half = len(rows) // 2
            if half > batching.batch_size:
                half = -(-half // batching.batch_size) * batching.batch_size
            pending += [rows[half:], rows[:half]]
    return groups


def _fit_small(
    prompt: ValuePrompt, coalitions: np.ndarray, batching: Batching, options: dict, max_bytes: int
) -> tuple[TreePlan, Batching]:
    """A group of at most `batch_size` coalitions whose tree does not fit: the cheapest (`plan_cost`) plan that
    fits among its tree and the flat layout, each with forwards of `batch_size` rows halved down to
    `min_batch` (on medqa_dev_convo:20, 402 tokens, a tree of 8-row forwards plans 1.2-1.5x fewer token slots
    than the flat layout of 16); none fitting: the flat layout of `min_batch` rows (the least memory), for the
    caller's error."""
    memory, tail_slots = options["memory"], options["tail_slots"]
    sizes, size = [], batching.batch_size
    while True:
        sizes.append(size)
        if size <= batching.min_batch:
            break
        size = max(batching.min_batch, size // 2)
    best = None
    for share in (True, False) if options["share_facts"] else (False,):
        for size in sizes:
            narrow = dataclasses.replace(batching, batch_size=size)
            plan = plan_tree(prompt, coalitions, narrow, **{**options, "share_facts": share})
            if memory.plan_bytes(plan, tail_slots) <= max_bytes and (
                best is None or plan_cost(plan, narrow) < plan_cost(best[0], best[1])
            ):
                best = (plan, narrow)
    return best if best is not None else (plan, narrow)
