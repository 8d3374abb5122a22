"""Keys named by what they sample: stable across processes, distinct across parts, independent of batch place."""

import subprocess
import sys

import jax
import numpy as np
import pytest

from promed_jax.sampling.keys import part_word, row_key, row_keys


def data(key):
    return np.asarray(jax.random.key_data(key))


def test_same_parts_same_key_and_each_part_matters():
    base = data(row_key(0, "mcts", "medqa:1", 3, 2))
    assert np.array_equal(base, data(row_key(0, "mcts", "medqa:1", 3, 2)))
    others = [
        row_key(1, "mcts", "medqa:1", 3, 2),
        row_key(0, "rl", "medqa:1", 3, 2),
        row_key(0, "mcts", "medqa:2", 3, 2),
        row_key(0, "mcts", "medqa:1", 4, 2),
        row_key(0, "mcts", "medqa:1", 3, 1),
        row_key(0, "mcts", "medqa:1", 2, 3),  # order matters
    ]
    for other in others:
        assert not np.array_equal(base, data(other))


def test_row_keys_stack_equals_single_keys_in_any_order():
    rows = [("a", 0), ("b", 1), ("c", 2)]
    stacked = data(row_keys(5, rows))
    reordered = data(row_keys(5, rows[::-1]))
    for i, row in enumerate(rows):
        assert np.array_equal(stacked[i], data(row_key(5, *row)))
        assert np.array_equal(reordered[len(rows) - 1 - i], stacked[i])


def test_string_parts_do_not_depend_on_the_process_hash_seed():
    code = "from promed_jax.sampling.keys import part_word; print(part_word('medqa_dev_convo:224'))"
    words = {
        subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True, env={"PYTHONHASHSEED": s, **_env()}
        ).stdout.strip()
        for s in ("1", "2")
    }
    assert words == {str(part_word("medqa_dev_convo:224"))}


def _env():
    import os

    return {k: v for k, v in os.environ.items() if k != "PYTHONHASHSEED"}


def test_bad_parts_are_refused():
    with pytest.raises(TypeError):
        row_key(0, 1.5)
    with pytest.raises(TypeError):
        row_key(0, True)
    with pytest.raises(ValueError):
        row_keys(0, [])
