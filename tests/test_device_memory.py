"""The memory check before a step's first call: XLA's estimate read right, a step over the budget is one line
naming the step, its batch and the settings that lower it (in the library and through the entry point), and
XLA's own RESOURCE_EXHAUSTED becomes the same kind of line."""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from promed_jax import device_memory
from promed_jax.device_memory import CheckedStep, step_bytes
from promed_jax.errors import ResourceError

MB4 = 1024 * 1024 * 4  # a [1024, 1024] float32


def test_step_bytes_counts_outputs_unless_donated_and_temporaries():
    x = jnp.ones((1024, 1024))
    plain = jax.jit(lambda x: x + 1).lower(x).compile()
    donated = jax.jit(lambda x: x + 1, donate_argnums=0).lower(x).compile()
    assert step_bytes(plain) >= MB4
    assert step_bytes(donated) < MB4  # the output lives in the donated input's buffer

    def chain(x):  # two [1024, 1024] intermediates are alive at once for the backward pass
        y = jnp.tanh(x @ x.T)
        return (y @ y * jnp.sin(y)).sum()

    assert step_bytes(jax.jit(jax.grad(chain)).lower(x).compile()) >= MB4 + MB4


def test_meminfo_is_read_in_bytes(tmp_path):
    info = tmp_path / "meminfo"
    info.write_text("MemTotal:       24000000 kB\nMemFree:  100 kB\nMemAvailable:   2000 kB\n")
    assert device_memory._meminfo_available(info) == 2000 * 1024
    info.write_text("MemTotal: 1 kB\n")
    assert device_memory._meminfo_available(info) is None


def _step():
    @jax.jit
    def step(state, batch):
        return state + batch["x"].sum(), {"loss": (batch["x"] ** 2).mean()}

    return step


def test_a_step_over_the_budget_is_one_line_before_it_runs():
    batch = {"x": np.ones((2, 4, 256), np.float32)}
    checked = CheckedStep(_step(), name="the test step", hint="lower it with fewer rows", budget=1)
    with pytest.raises(ResourceError) as e:
        checked(jnp.float32(0), batch)
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith("the test step at batch 2 x 4 x 256 needs ")
    assert message.endswith("is free; lower it with fewer rows")
    assert not checked.executables  # nothing ran, nothing kept


def test_within_the_budget_one_executable_per_batch_shape():
    checked = CheckedStep(_step(), name="s", hint="h", budget=2**40)
    for rows in (2, 2, 3):
        state, _ = checked(jnp.float32(0), {"x": np.ones((rows, 8), np.float32)})
        assert float(state) == rows * 8
    assert len(checked.executables) == 2
    unchecked = CheckedStep(_step(), name="s", hint="h", budget=0)  # 0: no check
    unchecked(jnp.float32(0), {"x": np.ones((2, 8), np.float32)})


def test_xla_running_out_of_memory_becomes_the_same_line():
    batch = {"x": np.ones((2, 8), np.float32)}
    checked = CheckedStep(_step(), name="the test step", hint="lower it", budget=0)

    def exhausted(state, batch):
        raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 39976155112 bytes.")

    checked.executables[checked._shape_key(batch)] = exhausted
    with pytest.raises(ResourceError, match=r"^the test step at batch 2 x 8 ran out of device memory; lower it$"):
        checked(jnp.float32(0), batch)

    def other(state, batch):
        raise jax.errors.JaxRuntimeError("INTERNAL: something else")

    checked.executables[checked._shape_key(batch)] = other
    with pytest.raises(jax.errors.JaxRuntimeError):  # not a memory error: a bug, kept as it is
        checked(jnp.float32(0), batch)


def test_the_sft_job_over_the_budget_ends_as_one_error_line(tmp_path, monkeypatch, capsys):
    from promed_jax import main

    monkeypatch.setattr(device_memory, "available_bytes", lambda device=None: 1024)
    args = [
        "--config=configs/sft.py",
        "--config.data.synthetic_n=4",
        "--config.sft.naive_max_questions=1",
        "--config.sft.batch_size=2",
        "--config.sft.epochs=1",
        "--config.sft.eval_fraction=0.0",
        "--config.mesh.shape=(1,)",
        f"--workdir={tmp_path}",
    ]
    assert main.main(["promed_jax.main", *args]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: the SFT step at batch 1 x 2 x ")
    assert "needs" in err[-1] and "model.remat=True" in err[-1]
    assert "Traceback" not in "\n".join(err)


def test_the_smollm_sft_preset_rematerialises_its_blocks():
    # 8 x 1,024 tokens without remat asked XLA for 40 GB (experiments/sft_memory.py prints the estimates)
    from configs import sft as sft_config

    assert sft_config.get_config("smollm").model.remat


def _sft_step_bytes(layers: int, remat: bool) -> int:
    from flax import nnx

    from promed_jax.models import ModelConfig, Transformer
    from promed_jax.sharding import make_mesh
    from promed_jax.training import state as S
    from promed_jax.training.sft import make_sft_loss

    cfg = ModelConfig.tiny(
        vocab_size=128,
        num_heads=9,
        num_kv_heads=3,
        head_dim=8,
        num_layers=layers,
        remat=remat,
        lora_rank=4,
        lora_alpha=8.0,
        lora_dropout=0.1,
    )
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    mesh = make_mesh((1,), ("data",))
    opt = S.OptimizerConfig(learning_rate=1e-3, total_steps=10)
    tx = S.make_optimizer(opt)
    graphdef, params, frozen = S.split_for_training(model, lora=True)
    state = S.place_state(S.init_state(params, frozen, tx, seed=0), mesh)
    rows, t = 4, 256
    step = S.compile_step(S.make_train_step(make_sft_loss(128), graphdef, tx, S.schedule(opt)), state, mesh, rows)
    batch = {
        "tokens": np.zeros((1, rows, t), np.int32),
        "targets": np.zeros((1, rows, t), np.int32),
        "weights": np.ones((1, rows, t), bool),
        "valid": np.ones((1, rows, t), bool),
    }
    return step_bytes(step.lower(state, batch).compile())


def test_remat_keeps_one_layers_attention_not_every_layers():
    # A layer's attention scores here are [4, 3, 3, 256, 256] float32: 9 MiB. Without remat each layer more keeps
    # a few of them for the backward pass; with remat (the scanned blocks) a layer more keeps its input only.
    per_layer = {remat: (_sft_step_bytes(6, remat) - _sft_step_bytes(2, remat)) / 4 for remat in (False, True)}
    scores = 4 * 9 * 256 * 256 * 4
    assert per_layer[False] > 2 * scores
    assert per_layer[True] < scores / 4


_REUSE_PROBE = """
import ctypes, resource, sys, threading
from promed_jax.device_memory import reuse_host_buffers
assert reuse_host_buffers() if sys.argv[1] == "reuse" else True
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
size = 256 * 2**20  # one block far above glibc's mmap threshold (128 KiB to 32 MiB)
out = {}

def first():  # a step on one thread: its buffer, written, then freed
    p = libc.malloc(size)
    ctypes.memset(p, 1, size)
    libc.free(p)

def second():  # the next step on another thread: how many fresh pages its buffer costs
    before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
    p = libc.malloc(size)
    ctypes.memset(p, 2, size)
    out["faults"] = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before
    libc.free(p)

for fn in (first, second):
    t = threading.Thread(target=fn)
    t.start()
    t.join()
print(out["faults"])
"""


def test_reused_host_buffers_cost_no_fresh_pages():
    """`reuse_host_buffers`: a large block freed on one thread is reused by the next allocation on another
    instead of being unmapped and mapped again (each of its 65,536 pages faulting on first touch). In
    subprocesses: the setting is process-wide."""
    import os
    import resource
    import subprocess
    import sys

    if not hasattr(resource, "RUSAGE_THREAD"):
        pytest.skip("RUSAGE_THREAD is Linux's")
    env = {**os.environ, "PYTHONPATH": str(pathlib.Path(__file__).resolve().parents[1])}
    faults = {
        mode: int(
            subprocess.run(
                [sys.executable, "-c", _REUSE_PROBE, mode], env=env, check=True, capture_output=True, text=True
            ).stdout
        )
        for mode in ("plain", "reuse")
    }
    pages = 256 * 2**20 // 4096
    assert faults["plain"] > pages // 2  # glibc's default: a fresh mapping
    assert faults["reuse"] < pages // 100


def test_cpu_available_bytes_trims_the_heap_first(monkeypatch):
    """With freed buffers kept for reuse (`reuse_host_buffers`), MemAvailable leaves out the heap's free
    memory, which is ours: `available_bytes` on the CPU trims the heap before it reads MemAvailable."""
    from promed_jax.shapley import memory

    calls = []
    monkeypatch.setattr(memory, "trim_heap", lambda: calls.append("trim") or True)
    monkeypatch.setattr(device_memory, "_meminfo_available", lambda: calls.append("read") or 1234)
    assert device_memory.available_bytes(jax.devices("cpu")[0]) == 1234
    assert calls == ["trim", "read"]
