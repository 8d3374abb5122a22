"""Stage 1b: SFT on the high-reward MCTS dialogues, loss on doctor tokens only (promed.md §3)."""

from __future__ import annotations

import ml_collections

from configs import base


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = base.get_config(arg)
    c.mode = "sft"
    return c


def sweep(add) -> None:
    for lr in (5e-6, 1e-5, 2e-5):
        add(**{"sft.learning_rate": lr})
