"""Stage 1a: SIG-guided MCTS over doctor turns, exporting scored dialogues (promed.md §3)."""

from __future__ import annotations

import ml_collections

from configs import base


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = base.get_config(arg)
    c.mode = "mcts"
    return c


def sweep(add) -> None:
    for c_uct in (1.0, 2.2, 4.0):
        add(**{"mcts.c_uct": c_uct})
