"""The Stage 2 loop (promed_jax.rl.loop): SIGKILL and resume reach an uninterrupted run's parameters; the
case order, the start folder and the sweep."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from promed_jax.errors import CheckpointError
from promed_jax.rl import loop

REPO = pathlib.Path(__file__).resolve().parents[1]

# A tiny Stage 2 run on the synthetic clinic with uniform Shapley weights written into the workdir's cache.
RUN = textwrap.dedent(
    """
    import sys

    import jax.numpy as jnp

    from configs import rl
    from promed_jax import main, registry
    from promed_jax.rl import rewards


    # The random tiny doctor writes no protocol marker, so every paper reward is 0 and nothing would train.
    # This reward pays the doctor's even token ids, so advantages differ and every batch moves the adapters.
    @registry.register("rl.reward", "test_even_ids")
    def even_ids(turns, turn_ids, role_mask, correct, *, config):
        token, parts = rewards.distributed(turns, turn_ids, role_mask, correct, config=config)
        return token + jnp.where(role_mask, (turn_ids * 7 + jnp.arange(role_mask.shape[1])) % 2, 0.0), parts

    from promed_jax.data.sources import cases_from_config
    from promed_jax.io import JsonlWriter
    from promed_jax.shapley.cache import ShapleyRecord, cache_path

    workdir = sys.argv[1]
    c = rl.get_config("tiny")
    c.mode = "rl"
    c.data.synthetic_n = 8
    c.grpo.steps = 3
    c.grpo.batch_cases = 1
    c.grpo.num_generations = 2
    c.grpo.eval_every = 0
    c.grpo.learning_rate = 1e-2  # large enough that every batch moves the adapters
    c.grpo.reward = "test_even_ids"
    c.grpo.updates_per_batch = 2
    c.sampling.max_new_tokens = 8
    c.consult.max_questions = 1
    c.ckpt.every_steps = 1
    path = cache_path(workdir, "synthetic")
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        with JsonlWriter(path) as w:
            for case in cases_from_config(c.data, stage="rl"):
                n = case.n_facts
                w.write(ShapleyRecord(case.id, case.fingerprint, n, (0.0,) * n, (1 / n,) * n, "exact", 1, "t", "t").to_json())
    main.run(c, workdir)
    """
)


def _start(workdir: pathlib.Path, cache: pathlib.Path) -> subprocess.Popen:
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "JAX_COMPILATION_CACHE_DIR": str(cache),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
    }
    env.pop("XLA_FLAGS", None)  # one CPU device, as a plain run
    return subprocess.Popen(
        [sys.executable, "-c", RUN, str(workdir)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _finish(proc: subprocess.Popen) -> None:
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]


def _weights(workdir: pathlib.Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(workdir / "rl" / "model" / "model.safetensors")


def _checkpoints(workdir: pathlib.Path) -> list[int]:
    folder = workdir / "rl" / "checkpoints"
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.exists() else []


@pytest.mark.slow
def test_sigkill_then_resume_gives_the_uninterrupted_parameters(tmp_path):
    cache = tmp_path / "xla"
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    _finish(_start(straight, cache))

    proc = _start(killed, cache)
    deadline = time.monotonic() + 600
    while not _checkpoints(killed) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert _checkpoints(killed) and max(_checkpoints(killed)) < 6, "the run was not killed mid-way"  # 3 x 2 steps
    assert not (killed / "rl" / "model").exists()
    _finish(_start(killed, cache))

    a, b = _weights(straight), _weights(killed)
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    metrics = [line for line in (killed / "rl" / "metrics.jsonl").read_text().splitlines() if line]
    records = [json.loads(line) for line in metrics]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(r["grad_norm"] > 1e-3 and r["kl_last"] > 0 for r in records)  # the parameters moved


def test_batch_cases_cover_each_epoch_once_and_depend_on_the_batch_alone():
    first_epoch = [i for b in range(4) for i in loop.batch_indices(8, 2, b, seed=3)]
    assert sorted(first_epoch) == list(range(8))
    assert loop.batch_indices(8, 3, 2, seed=3) == loop.batch_indices(8, 3, 2, seed=3)
    # Batch 2 of 3 straddles the first two epochs.
    assert len(loop.batch_indices(8, 3, 2, seed=3)) == 3
    assert loop.batch_indices(8, 2, 0, seed=3) != loop.batch_indices(8, 2, 0, seed=4)


def test_start_folder(tmp_path):
    assert loop.start_folder("", tmp_path) is None
    stage1 = tmp_path / "sft" / "model"
    stage1.mkdir(parents=True)
    (stage1 / "config.json").write_text("{}")
    assert loop.start_folder("", tmp_path) == stage1
    assert loop.start_folder(str(tmp_path), tmp_path / "elsewhere") == stage1
    assert loop.start_folder(str(tmp_path / "sft"), tmp_path) == stage1
    with pytest.raises(CheckpointError, match="grpo.init_checkpoint"):
        loop.start_folder(str(tmp_path / "nothing"), tmp_path)


def test_each_sweep_point_is_another_ablation():
    from configs import rl

    points = []
    rl.sweep(lambda **fields: points.append(tuple(sorted(fields.items()))))
    assert len(set(points)) == len(points) >= 5
    config = rl.get_config()
    for point in points:
        for key, _ in point:
            section, field = key.split(".")
            assert field in config[section]
