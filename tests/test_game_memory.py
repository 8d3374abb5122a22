"""The Shapley game's memory is bounded: a made-up 48-fact case through the shapley stage's estimator path
(kernel_shap at 8(n+1) = 392 coalitions) in a subprocess that reads its own peak RSS.

The child runs the estimator twice on fresh memos. The first run compiles every shape (the executables stay
in memory: that is not what the budget bounds); the second, after `malloc_trim` and a reset of the peak
(`/proc/self/clear_refs`), measures the KV cache and activations the calls hold at once. Today's game
(3e097ad, no budget: every tree level keeps ~390 rows of 1,232 slots) grew by 613 MiB in that
second run, this tree's game without a budget by 684 MiB; under `max_cache_bytes` = 64 MiB it grew by
168-271 MiB over the versions of this change (the process peaks at 2.6-4.2x the plan's estimate on this
small model: the allocator's retention across XLA's threads and its temporaries), so the bound is 6x the
budget: 384 MiB, well under what the unbudgeted tree takes.
"""

import json
import os
import subprocess
import sys

CHILD = r"""
import ctypes, json, pathlib, sys
from flax import nnx
from configs import shapley as shapley_config
from promed_jax.data.cases import Case
from promed_jax.models.config import ModelConfig
from promed_jax.models.transformer import Transformer
from promed_jax.shapley import run as run_lib
from promed_jax.shapley.game import CoalitionGame
from promed_jax.text.tokenizer import build_tiny_tokenizer

def rss_kb(field):
    line = next(l for l in pathlib.Path("/proc/self/status").read_text().splitlines() if l.startswith(field + ":"))
    return int(line.split()[1])

budget = json.loads(sys.argv[1])
tokenizer = build_tiny_tokenizer()
model = Transformer(ModelConfig.tiny(vocab_size=len(tokenizer), max_position_embeddings=4096), rngs=nnx.Rngs(0))
words = "pain cough fever chest arm breath father heart attack nausea rash weight".split()
facts = tuple(
    f"Finding {i}: the patient reports {words[i % 12]} and {words[(3 * i) % 12]} since day {i}." for i in range(48)
)
case = Case(id="test:48", source="test", language="en", initial_info="A patient.", question="What is it?",
            options={"A": "pneumonia", "B": "asthma"}, answer=("A",), facts=facts)
options = {} if budget is None else {"max_cache_bytes": budget}
game = CoalitionGame(model, tokenizer, batch_size=16, **options)
shapley = shapley_config.get_config().shapley
plan = run_lib.plan_case(case.id, 48, game.prompt(case).length, shapley)
run_lib.estimate_case(game.value_fn(case), plan, seed=0)  # compiles every shape
ctypes.CDLL("libc.so.6").malloc_trim(0)
pathlib.Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
base = rss_kb("VmRSS")
phi, n_evals = run_lib.estimate_case(game.value_fn(case), plan, seed=0)
print(json.dumps({"base_kb": base, "peak_kb": rss_kb("VmHWM"), "n_evals": n_evals, "estimator": plan.name,
                  "prompt_tokens": sum(len(ids) for ids in game.prompt(case).facts)}))
"""
BUDGET = 64 * 2**20
BOUND = 6 * BUDGET


def run_child(budget: int | None, root: str | None = None) -> dict:
    """The child's report; `root`: the source tree to import (default: this one)."""
    root = root or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    done = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(budget)],
        check=False,
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_48_fact_case_stays_under_the_budget():
    result = run_child(BUDGET)
    assert result["estimator"] == "kernel_shap" and result["n_evals"] == 8 * 49
    assert result["prompt_tokens"] > 900  # long rows: the unbudgeted tree holds ~390 of them per level
    grown = (result["peak_kb"] - result["base_kb"]) * 1024
    assert grown < BOUND, f"RSS grew by {grown / 2**20:.0f} MiB (budget {BUDGET / 2**20:.0f} MiB)"


def test_trim_gives_freed_heap_memory_back():
    """glibc keeps freed chunks between live ones; `memory.trim_heap` returns their pages (the RSS creep of a
    long Shapley run: 1.7 GB after 8 SmolLM2 cases). 400 chunks of 64 KiB (under the mmap threshold, so on the
    heap) are freed between 400 live ones: free() cannot shrink the heap past the live ones, the trim can."""
    import ctypes

    from promed_jax.shapley import memory

    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    size, count = 64 * 1024, 800
    chunks = [libc.malloc(size) for _ in range(count)]
    for chunk in chunks:
        ctypes.memset(chunk, 1, size)  # resident
    for chunk in chunks[::2]:
        libc.free(chunk)
    before = memory.rss_mb()
    assert memory.trim_heap()
    after = memory.rss_mb()
    for chunk in chunks[1::2]:
        libc.free(chunk)
    assert before - after > 10, f"RSS {before:.0f} -> {after:.0f} MB after freeing 25 MB between live chunks"
