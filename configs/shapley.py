"""Stage: Shapley values and weights of every case's facts (promed.md §2), cached per source."""

from __future__ import annotations

import ml_collections

from configs import base


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = base.get_config(arg)
    c.mode = "shapley"
    return c


def sweep(add) -> None:
    """Estimators compared against exact enumeration."""
    for estimator in ("tmc", "kernel_shap", "antithetic", "permutation"):
        add(**{"shapley.estimator": estimator})
