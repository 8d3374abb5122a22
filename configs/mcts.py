"""Stage 1a: SIG-guided MCTS over doctor turns, exporting scored dialogues (promed.md §3).

Presets: `tiny` (the CPU default: a random model on the synthetic clinic, short turns), `smollm` (SmolLM2 on the
first 32 MedQA training cases, searched 32 at a time), `qwen7b` / `llama8b` (the paper's doctors, 32 trees per
batch). Run the shapley stage on the same workdir first: the search reads its fact weights.
"""

from __future__ import annotations

import ml_collections

from configs import base

SMOLLM_CASES = 32


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = base.get_config(arg)
    c.mode = "mcts"
    if c.model.kind == "tiny":
        c.sampling.max_new_tokens = 32  # a random model only babbles; keep the CPU default quick
    elif c.model.kind == "gguf":
        c.data.limit = SMOLLM_CASES
        c.mcts.batch_trees = SMOLLM_CASES  # one sampler call of 32 rows per simulation
        c.sampling.max_new_tokens = 128  # SmolLM2's questions are short; answers longer than this are cut
    else:
        c.mcts.batch_trees = 32
    return c


def sweep(add) -> None:
    """The exploration constant, the selection rules, the expansions and the leaf values."""
    for c_uct in (1.0, 2.2, 4.0):
        add(**{"mcts.c_uct": c_uct})
    for policy in ("muzero", "gumbel_muzero"):
        add(**{"mcts.policy": policy})
    add(**{"mcts.expansion": "eager"})
    add(**{"mcts.leaf_value": "rollout"})
