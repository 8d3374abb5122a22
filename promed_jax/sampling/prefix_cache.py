"""KV caches of earlier prompts, keyed by their token ids, so that a prompt extending one prefills only its
new tokens (promed.md §3: within an MCTS tree every node's dialogue extends its parent's).

An entry holds the keys and values of one prompt, float[2, layers, n, kv_heads, head_dim] (the prompt's n
positions; the KV of token j depends on tokens <= j only, so any common prefix of an entry is reusable). Entries
are evicted least recently used first once `max_bytes` is exceeded (0: unbounded). Only prompts are stored,
not sampled continuations: a sampled turn is re-rendered and re-tokenized in the next prompt.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Sequence

import numpy as np


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    """The number of leading tokens `a` and `b` share."""
    n = min(len(a), len(b))
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if differ.size else n


@dataclasses.dataclass
class PrefixCache:
    """Prompt token ids -> their KV (see the module doc); `reused` / `computed` count prompt tokens taken from
    the cache / prefilled, for profiles."""

    max_bytes: int = 0
    nbytes: int = 0
    reused: int = 0
    computed: int = 0
    _entries: collections.OrderedDict = dataclasses.field(default_factory=collections.OrderedDict, repr=False)

    def longest(self, prompt: Sequence[int]) -> tuple[int, np.ndarray | None]:
        """(n, kv): the longest cached prefix of `prompt`, at most len(prompt) - 1 tokens (the last one is
        always prefilled: its logits give the first new token), and its KV; (0, None) when none."""
        ids = np.asarray(prompt, np.int64)
        best, best_key = 0, None
        for key, (tokens, _) in self._entries.items():
            n = common_prefix(tokens, ids)
            if n > best:
                best, best_key = n, key
        best = min(best, len(ids) - 1)
        if best_key is None or best == 0:
            return 0, None
        self._entries.move_to_end(best_key)
        return best, self._entries[best_key][1]

    def add(self, prompt: Sequence[int], kv: np.ndarray) -> None:
        """Store `kv` float[2, layers, len(prompt), kv_heads, head_dim]; evict the oldest beyond `max_bytes`."""
        key = tuple(int(t) for t in prompt)
        if key in self._entries:
            self._entries.move_to_end(key)
            return
        self._entries[key] = (np.asarray(key, np.int64), kv)
        self.nbytes += kv.nbytes
        self.shrink()

    def shrink(self) -> None:
        """Evict least recently used entries until the cache holds at most `max_bytes` (0: no bound)."""
        while self.max_bytes and self.nbytes > self.max_bytes and self._entries:
            _, (_, kv) = self._entries.popitem(last=False)
            self.nbytes -= kv.nbytes

    def __len__(self) -> int:
        return len(self._entries)
