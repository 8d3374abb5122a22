"""Shapley Information Gain (promed.md §2): the coalition game, the estimators, fact weights and SIG."""

from promed_jax.shapley.cache import ShapleyRecord, cache_path, load_weights, read_cache
from promed_jax.shapley.estimators import (
    MemoValue,
    antithetic,
    choose_estimator,
    exact,
    kernel_shap,
    permutation,
    tmc,
)
from promed_jax.shapley.game import CoalitionGame
from promed_jax.shapley.layout import ValuePrompt, coalition_ids, tokenize_value_prompt
from promed_jax.shapley.sig import Sig, exact_coverage, exact_sig, paper_coverage, sig_from_coverage
from promed_jax.shapley.weights import shapley_weights

__all__ = [
    "CoalitionGame",
    "MemoValue",
    "ShapleyRecord",
    "Sig",
    "ValuePrompt",
    "antithetic",
    "cache_path",
    "choose_estimator",
    "coalition_ids",
    "exact",
    "exact_coverage",
    "exact_sig",
    "kernel_shap",
    "load_weights",
    "paper_coverage",
    "permutation",
    "read_cache",
    "shapley_weights",
    "sig_from_coverage",
    "tmc",
    "tokenize_value_prompt",
]
