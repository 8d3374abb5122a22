"""PRNG keys named by what they sample, never by where a row sits in a batch or how many calls came before.

`row_key(seed, "mcts", case_id, simulation, slot)` is the same key whichever batch the row is sampled in and
whether or not the run was resumed, so a batch of trees equals the same trees searched alone and a resumed
run equals an uninterrupted one. Parts are ints or strings; a string is folded in through a stable 32-bit
hash of its UTF-8 bytes (blake2b), so keys do not depend on Python's per-process `hash` salt.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import jax
import numpy as np


def part_word(part: int | str) -> int:
    """The uint32 folded in for one part: an int modulo 2**32, a string through a stable hash."""
    if isinstance(part, bool):
        raise TypeError(f"row_key: a key part must be an int or a str, got bool {part!r}")
    if isinstance(part, int | np.integer):
        return int(part) % 2**32
    if isinstance(part, str):
        digest = hashlib.blake2b(part.encode("utf-8", "surrogatepass"), digest_size=4).digest()
        return int.from_bytes(digest, "little")
    raise TypeError(f"row_key: a key part must be an int or a str, got {type(part).__name__}")


def row_key(seed: int, *parts: int | str) -> jax.Array:
    """A typed PRNG key: `jax.random.key(seed)` with each part folded in, in order."""
    key = jax.random.key(int(seed) % 2**32)
    for part in parts:
        key = jax.random.fold_in(key, part_word(part))
    return key


def row_keys(seed: int, rows: Sequence[Sequence[int | str]]) -> jax.Array:
    """[len(rows)] typed keys, one `row_key(seed, *row)` per row (stacked for the sampler)."""
    if not rows:
        raise ValueError("row_keys: no rows")
    return jax.numpy.stack([row_key(seed, *row) for row in rows])
