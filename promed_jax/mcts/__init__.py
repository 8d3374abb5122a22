"""promed_jax.mcts: SIG-guided search over doctor turns with mctx (promed.md §3), its export and selection."""

from promed_jax.mcts.environment import EXPANSIONS, LEAF_VALUES, DialogueEnv
from promed_jax.mcts.search import NodeState, finished_paths, paper_uct, policies, search_trees
from promed_jax.mcts.toy import ToyParams, toy_recurrent_fn, toy_root
from promed_jax.mcts.trajectories import (
    SearchSettings,
    Selection,
    TreeStats,
    read_dialogues,
    search_cases,
    select,
    validate,
)

__all__ = [
    "EXPANSIONS",
    "LEAF_VALUES",
    "DialogueEnv",
    "NodeState",
    "SearchSettings",
    "Selection",
    "ToyParams",
    "TreeStats",
    "finished_paths",
    "paper_uct",
    "policies",
    "read_dialogues",
    "search_cases",
    "search_trees",
    "select",
    "toy_recurrent_fn",
    "toy_root",
    "validate",
]
