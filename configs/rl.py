"""The whole of ProMed: data, Shapley cache, MCTS, SFT, SIG-augmented policy optimisation, evaluation.

`python -m promed_jax.main --config=configs/rl.py` is the README's main job; it runs the stages that exist.
"""

from __future__ import annotations

import ml_collections

from configs import base


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = base.get_config(arg)
    c.mode = "pipeline"
    return c


def sweep(add) -> None:
    """The paper's ablations (promed.md §4)."""
    add(**{"grpo.reward": "distributed", "shapley.weighting": "shapley"})
    add(**{"grpo.reward": "trajectory", "grpo.advantage": "group_std"})  # with GRPO's mean/std advantages
    add(**{"shapley.weighting": "uniform"})
    add(**{"grpo.reward": "no_distribution"})
    add(**{"grpo.reward": "outcome_only"})  # no SIG at all: correctness and format only
