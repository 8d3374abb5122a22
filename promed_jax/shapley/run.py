"""The shapley stage: φ and w for every configured case, appended to the per-source cache as it goes.

`python -m promed_jax.main --config=configs/shapley.py[:preset] --workdir=DIR` writes
`DIR/shapley/<source>.jsonl` (promed.md §6) for the cases training reads (the train split unless `data.split`
says otherwise), resumes where a killed run stopped, and with `--config.shapley.plot=True` draws a bar chart of
each case's fact weights under `DIR/shapley/plots/`. A resumed run must be the same run: the cached records'
cases (fingerprints) and the folder's `run.json` (config, weights, prompt version: `promed_jax.provenance`) are
checked before anything is computed.
"""

from __future__ import annotations

import dataclasses
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

from promed_jax import provenance, registry
from promed_jax.data.cases import Case
from promed_jax.data.sources import cases_from_config
from promed_jax.errors import ConfigError
from promed_jax.io import JsonlWriter, atomic_write_bytes, output_lock
from promed_jax.models.loader import load_model
from promed_jax.shapley import cache as cache_lib
from promed_jax.shapley import estimators
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


def most_coalitions(name: str, n: int, options: Mapping[str, Any]) -> int:
    """An upper bound of the distinct coalitions estimator `name` asks for on an n-fact case."""
    if name == "exact":
        return 2**n
    if name == "tmc":
        walked = options["max_permutations"] * max(1, n - 1) + 2
        return min(walked, options.get("budget") or walked)
    if name == "kernel_shap":
        return max(options["budget"], 4)  # the endpoints and at least one complementary pair
    return options["budget"] + 2 * n  # permutation estimators walk whole permutations (antithetic: in pairs)


# kernel_shap keeps to any budget of at least 4 coalitions and had the lowest error per coalition of the
# sampling estimators on real games (README, Shapley values), so a case over the cap falls back to it.
CAPPED_ESTIMATOR = "kernel_shap"


@dataclasses.dataclass(frozen=True)
class CasePlan:
    """How one case's φ is estimated: the estimator, its options, and the warning when the cap changed them."""

    name: str
    options: Mapping[str, Any]
    coalitions: int  # at most this many distinct coalitions
    warning: str = ""


def plan_case(case_id: str, n: int, prompt_tokens: int, shapley: Mapping[str, Any]) -> CasePlan:
    """The configured estimator, or kernel_shap within the per-case cap when the configured one would exceed
    `shapley.max_case_coalitions` distinct coalitions or `shapley.max_case_tokens` tokens (coalitions times the
    whole prompt's `prompt_tokens`: an upper bound of what the game computes, before prefix sharing)."""
    name, _ = choose_estimator(n, exact_max_n=shapley["exact_max_n"], fallback=shapley["estimator"])
    options = estimator_options(name, shapley, n)
    planned = most_coalitions(name, n, options)
    cap = min(int(shapley["max_case_coalitions"]), int(shapley["max_case_tokens"]) // max(1, prompt_tokens))
    if planned <= cap:
        return CasePlan(name, options, planned)
    if cap < most_coalitions(CAPPED_ESTIMATOR, n, {"budget": 0}):
        raise ConfigError(
            f"shapley: case {case_id} ({n} facts, {prompt_tokens} prompt tokens) leaves {cap} coalitions under "
            f"shapley.max_case_coalitions={shapley['max_case_coalitions']} and shapley.max_case_tokens="
            f"{shapley['max_case_tokens']}, too few to estimate; raise them or leave it out (data.max_facts)"
        )
    warning = (
        f"shapley: case {case_id} ({n} facts, {prompt_tokens} prompt tokens): {name} would ask for up to "
        f"{planned} coalitions, over the per-case cap of {cap} (shapley.max_case_coalitions="
        f"{shapley['max_case_coalitions']}, shapley.max_case_tokens={shapley['max_case_tokens']}); "
        f"using {CAPPED_ESTIMATOR} with budget {cap} instead"
    )
    return CasePlan(CAPPED_ESTIMATOR, {"budget": cap}, cap, warning)


def estimate_case(value_fn: MemoValue, plan: CasePlan, seed: int) -> tuple[np.ndarray, int]:
    """(φ float64[n], distinct coalitions evaluated) of one case by its plan."""
    return registry.get(estimators.KIND, plan.name)(value_fn, value_fn.n, key=seed, **plan.options)


def shapley_values(
    game: CoalitionGame, case: Case, shapley: Mapping[str, Any], bar: tqdm | None = None
) -> tuple[np.ndarray, int, CasePlan]:
    """(φ float64[n], distinct coalitions evaluated, the plan) of one case: tokenized once, planned within the
    per-case caps (a capped plan's warning is logged), estimated with the case's own seed. `bar` counts the
    coalitions as they are computed, up to the plan's bound."""
    prompt = game.prompt(case)
    plan = plan_case(case.id, case.n_facts, prompt.length, shapley)
    if plan.warning:
        logging.warning("%s", plan.warning)
    if bar is not None:
        bar.reset(total=plan.coalitions)
    value_fn = game.value_fn(case, None if bar is None else bar.update, prompt=prompt)
    phi, n_evals = estimate_case(value_fn, plan, case_seed(shapley["seed"], case.id))
    return phi, n_evals, plan


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
        max_executables=config.shapley.max_executables,
    )


def run(config, workdir: str) -> dict[str, pathlib.Path]:
    """Computes and caches φ and w for every configured case not cached yet; returns the cache files.

    The stage holds `{workdir}/shapley.lock` throughout: a second run on the workdir fails at once."""
    with output_lock(pathlib.Path(workdir) / "shapley"):
        return _run(config, workdir)


def _run(config, workdir: str) -> dict[str, pathlib.Path]:
    shapley = config.shapley
    cases = cases_from_config(config.data, stage="shapley")
    by_source: dict[str, list[Case]] = {}
    for case in cases:
        by_source.setdefault(case.source, []).append(case)
    done: dict[str, dict[str, cache_lib.ShapleyRecord]] = {}
    for source, group in by_source.items():
        path = cache_lib.cache_path(workdir, source)
        done[source] = cache_lib.read_cache(path)
        cache_lib.check_cases(done[source], group, path=path)
    # The model is loaded even when every case is cached: its weights are what run.json is checked against.
    game = _make_game(config)
    weights = provenance.weights_hash(game.params)
    model_name = provenance.model_label(config.model, weights)
    folder = pathlib.Path(workdir) / "shapley"
    provenance.check_or_write(
        folder,
        provenance.make(config, "shapley", weights=weights, prompt_version=SHAPLEY_PROMPT_VERSION),
        has_results=any(path.stat().st_size for path in folder.glob("*.jsonl")),
        hint="use another workdir",
    )
    for source, group in by_source.items():
        path = cache_lib.cache_path(workdir, source)
        cache_lib.check_compatible(
            done[source].values(), model=model_name, prompt_version=SHAPLEY_PROMPT_VERSION, path=path
        )
        todo = [c for c in group if c.id not in done[source]]
        cached = len(group) - len(todo)
        logging.info("shapley: %s: %d cases, %d cached, %d to do", source, len(group), cached, len(todo))
        if not todo:
            continue
        with JsonlWriter(path) as writer:
            for case in tqdm(todo, desc=f"shapley {source}", unit="case"):
                # a bar within the case counts its coalitions, so a long case shows progress
                with tqdm(desc=case.id, unit="coalition", leave=False) as bar:
                    phi, n_evals, plan = shapley_values(game, case, shapley, bar)
                record = cache_lib.ShapleyRecord(
                    id=case.id,
                    fingerprint=case.fingerprint,
                    n=case.n_facts,
                    phi=tuple(phi.tolist()),
                    w=tuple(shapley_weights(phi, tau=shapley.tau).tolist()),
                    estimator=plan.name,
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
