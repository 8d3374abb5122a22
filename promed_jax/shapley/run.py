"""The shapley stage: φ and w for every configured case, appended to the per-source cache as it goes.

`python -m promed_jax.main --config=configs/shapley.py[:preset] --workdir=DIR` writes
`DIR/shapley/<source>.jsonl` (promed.md §6), resumes where a killed run stopped, and with
`--config.shapley.plot=True` draws a bar chart of each case's fact weights under `DIR/shapley/plots/`.
"""

from __future__ import annotations

import io
import pathlib
import re
import zlib
from collections.abc import Mapping
from typing import Any

import numpy as np
from absl import logging
from matplotlib.figure import Figure
from tqdm import tqdm

from promed_jax import assets
from promed_jax.data.cases import Case
from promed_jax.data.sources import cases_from_config
from promed_jax.io import JsonlWriter, atomic_write_bytes
from promed_jax.models.loader import load_model
from promed_jax.shapley import cache as cache_lib
from promed_jax.shapley.estimators import MemoValue, choose_estimator
from promed_jax.shapley.game import CoalitionGame
from promed_jax.shapley.weights import shapley_weights
from promed_jax.sharding import make_mesh
from promed_jax.text.prompts import SHAPLEY_PROMPT_VERSION


def case_budget(shapley: Mapping[str, Any], n: int) -> int:
    """Distinct coalitions a sampling estimator may spend on an n-fact case: `budget` if set, else
    `budget_per_fact`·(n + 1)."""
    return int(shapley["budget"]) if shapley["budget"] > 0 else int(shapley["budget_per_fact"]) * (n + 1)


def estimator_options(name: str, shapley: Mapping[str, Any], n: int) -> dict[str, Any]:
    """The keyword options the config gives an estimator for an n-fact case."""
    if name == "exact":
        return {}
    if name == "tmc":
        return {
            "min_permutations": shapley["min_permutations"],
            "max_permutations": shapley["max_permutations"],
            "truncation_tol": shapley["truncation_tol"],
            "convergence_tol": shapley["convergence_tol"],
            "batch_permutations": shapley["batch_permutations"],
        }
    return {"budget": case_budget(shapley, n)}


def case_seed(seed: int, case_id: str) -> int:
    """A per-case seed that does not depend on which cases ran before (so a resumed run is identical)."""
    return zlib.crc32(f"{seed}:{case_id}".encode())


def estimate_case(value_fn: MemoValue, n: int, shapley: Mapping[str, Any], seed: int) -> tuple[np.ndarray, int, str]:
    """(φ float64[n], distinct coalitions evaluated, estimator name) by the configured chooser."""
    name, estimator = choose_estimator(n, exact_max_n=shapley["exact_max_n"], fallback=shapley["estimator"])
    phi, n_evals = estimator(value_fn, n, key=seed, **estimator_options(name, shapley, n))
    return phi, n_evals, name


def describe_model(model: Mapping[str, Any]) -> str:
    """A short name of θ for the cache: kind, file or folder, and the seed of a random tiny model."""
    if model["kind"] == "tiny":
        return f"tiny:seed{model['seed']}"
    if model["kind"] == "gguf" and not model["path"]:
        return f"gguf:{assets.SMOLLM2_GGUF}"
    return f"{model['kind']}:{pathlib.Path(model['path']).name}"


def plot_weights(case: Case, record: cache_lib.ShapleyRecord, path: pathlib.Path) -> None:
    """A horizontal bar chart of the fact weights (PNG), written atomically."""
    labels = [f if len(f) <= 60 else f[:57] + "..." for f in case.facts]
    fig = Figure(figsize=(9, 0.4 * case.n_facts + 1.2))  # no pyplot: no GUI backend, no global state
    ax = fig.subplots()
    ax.barh(range(case.n_facts), record.w, color="tab:blue")
    ax.set_yticks(range(case.n_facts), labels, fontsize=8)
    ax.invert_yaxis()
    ax.axvline(1.0 / case.n_facts, color="gray", linestyle=":", linewidth=1)
    ax.set_xlabel("fact weight w = softmax(φ/τ)")
    ax.set_title(f"{case.id} ({record.estimator}, {record.n_evals} coalitions)", fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    atomic_write_bytes(path, buf.getvalue())


def _plot_path(workdir: str, case: Case) -> pathlib.Path:
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", case.id)
    return pathlib.Path(workdir) / "shapley" / "plots" / case.source / f"{safe}.png"


def _make_game(config) -> CoalitionGame:
    mesh = None
    if "data" in config.mesh.axis_names:
        mesh = make_mesh(config.mesh.shape, config.mesh.axis_names)
    model, tokenizer = load_model(config.model, mesh=mesh)
    model.materialize_head()
    return CoalitionGame(
        model,
        tokenizer,
        batch_size=config.shapley.batch_size,
        mesh=mesh,
        max_cache_bytes=config.shapley.max_cache_bytes,
    )


def run(config, workdir: str) -> dict[str, pathlib.Path]:
    """Computes and caches φ and w for every configured case not cached yet; returns the cache files."""
    shapley = config.shapley
    cases = cases_from_config(config.data)
    by_source: dict[str, list[Case]] = {}
    for case in cases:
        by_source.setdefault(case.source, []).append(case)
    model_name = describe_model(config.model)
    todo: dict[str, list[Case]] = {}
    for source, group in by_source.items():
        path = cache_lib.cache_path(workdir, source)
        done = cache_lib.read_cache(path)
        cache_lib.check_compatible(done.values(), model=model_name, prompt_version=SHAPLEY_PROMPT_VERSION, path=path)
        todo[source] = [c for c in group if c.id not in done]
        logging.info("shapley: %s: %d cases, %d cached, %d to do", source, len(group), len(done), len(todo[source]))
    if any(todo.values()):
        game = _make_game(config)
    for source, group in todo.items():
        if not group:
            continue
        with JsonlWriter(cache_lib.cache_path(workdir, source)) as writer:
            for case in tqdm(group, desc=f"shapley {source}", unit="case"):
                phi, n_evals, name = estimate_case(
                    game.value_fn(case), case.n_facts, shapley, case_seed(shapley.seed, case.id)
                )
                record = cache_lib.ShapleyRecord(
                    id=case.id,
                    n=case.n_facts,
                    phi=tuple(phi.tolist()),
                    w=tuple(shapley_weights(phi, tau=shapley.tau).tolist()),
                    estimator=name,
                    n_evals=n_evals,
                    model=model_name,
                    prompt_version=SHAPLEY_PROMPT_VERSION,
                )
                writer.write(record.to_json())
                if shapley.plot:
                    plot_weights(case, record, _plot_path(workdir, case))
    paths = {source: cache_lib.cache_path(workdir, source) for source in by_source}
    for source, path in paths.items():
        print(f"shapley: {source}: {len(by_source[source])} cases -> {path}")
    return paths
