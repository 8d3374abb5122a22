"""Evaluation: reactive, proactive and full-information modes (promed.md §1)."""

from __future__ import annotations

import ml_collections

from configs import base

# The real-model presets evaluate the first 50 cases of the test split: data.split='' means the eval stage's
# default, 'test' (promed_jax/data/sources.py), so no case that training reads is evaluated.
EVAL_CASES = 50


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = base.get_config(arg)
    c.mode = "eval"
    if c.data.kind == "files":
        c.data.limit = EVAL_CASES
    if c.model.kind == "tiny":
        c.eval.max_new_tokens = 32  # a random model only babbles; keep the CPU default quick
    elif c.model.kind == "gguf":
        c.eval.max_new_tokens = 128  # SmolLM2 on 2 CPU cores: three modes of 50 cases in about 15 minutes
    return c


def sweep(add) -> None:
    for max_questions in (0, 5, 10):
        add(**{"consult.max_questions": max_questions})
