"""Fact weights from Shapley values: w = softmax(φ / τ) (promed.md §2)."""

from __future__ import annotations

import numpy as np


def shapley_weights(phi: np.ndarray, *, tau: float = 2.0) -> np.ndarray:
    """float[n] -> float64[n] summing to 1.

    One fact gets weight 1; degenerate φ (a non-finite entry, or all entries equal) gives uniform weights,
    since no fact can then be said to matter more than another.
    """
    phi = np.asarray(phi, dtype=np.float64)
    if phi.ndim != 1 or phi.size == 0:
        raise ValueError(f"phi must be a non-empty vector, got shape {phi.shape}")
    if tau <= 0:
        raise ValueError(f"tau must be positive, got {tau}")
    n = phi.size
    if n == 1 or not np.all(np.isfinite(phi)) or np.all(phi == phi[0]):
        return np.full(n, 1.0 / n)
    z = phi / tau
    e = np.exp(z - z.max())
    return e / e.sum()
