"""MCTS over dialogues (promed_jax.mcts): the toy under every policy, batching, terminals, the synthetic clinic
against exhaustive enumeration of its candidate tree, eager expansion, rollouts, selection, and a SIGKILL
during the stage followed by a resume."""

import functools
import json
import os
import pathlib
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from promed_jax.consult.patients import FactSelectPatient
from promed_jax.data import synthetic
from promed_jax.errors import DataError
from promed_jax.mcts import search as search_lib
from promed_jax.mcts import toy, trajectories
from promed_jax.mcts.testing import CandidateDoctor, exhaustive_best
from promed_jax.sampling.keys import row_keys

REPO = pathlib.Path(__file__).resolve().parents[1]
POLICIES = ("paper_uct", "muzero", "gumbel_muzero")

# --- the toy ------------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("policy", "simulations", "decay"))
def _toy_run(params, root, keys, *, policy, simulations, decay):
    step = functools.partial(toy.toy_recurrent_fn, decay=decay, max_questions=10)
    return search_lib.search_trees(
        root, step, keys, policy=policy, num_simulations=simulations, c_uct=2.2, params=params
    )


def toy_search(weights, policy, *, simulations, bonus=0.0, revealed=None, tree_ids=None, decay=0.9):
    """B toy trees; tree b's key is row_key(0, "toy", tree_ids[b]) (default: b)."""
    weights = jnp.asarray(weights, jnp.float32)
    params = toy.ToyParams(weights=weights, bonus=jnp.full(weights.shape[:1], bonus, jnp.float32))
    root = toy.toy_root(params, weights.shape[1] + 1, None if revealed is None else jnp.asarray(revealed))
    keys = row_keys(0, [("toy", i) for i in (tree_ids or range(weights.shape[0]))])
    return _toy_run(params, root, keys, policy=policy, simulations=simulations, decay=decay)


def best_root_action(tree, b):
    """The most visited root slot, ties broken by the higher Q (Gumbel's halving leaves the final two tied)."""
    visits = np.asarray(tree.children_visits[b, 0])
    q = np.asarray(tree.qvalues(jnp.zeros(tree.node_visits.shape[0], jnp.int32))[b])
    return int(max(range(visits.shape[0]), key=lambda a: (visits[a], q[a])))


# 8 toy cases: the weights permuted, and in odd trees one fact known at the start
TOY_WEIGHTS = np.array(
    [np.roll([0.55, 0.25, 0.15, 0.05], b) if b < 4 else np.roll([0.05, 0.15, 0.25, 0.55], b) for b in range(8)],
    np.float32,
)
TOY_REVEALED = np.array([[b % 2 == 1 and i == b % 4 for i in range(4)] for b in range(8)])


@pytest.mark.parametrize("policy", POLICIES)
def test_toy_every_policy_prefers_the_heaviest_unrevealed_fact_and_batching_changes_nothing(policy):
    # decay 0.5: the heaviest fact first is worth 0.05-0.15 more than the next best start (at 0.9 only 0.01-0.03,
    # which Gumbel's sequential halving, deciding on means of few visits, can miss under its root noise)
    kw = {"simulations": 200, "decay": 0.5}
    together = toy_search(TOY_WEIGHTS, policy, revealed=TOY_REVEALED, **kw)
    heaviest = np.where(TOY_REVEALED, -1, TOY_WEIGHTS).argmax(-1)
    assert [best_root_action(together, b) for b in range(8)] == heaviest.tolist()
    for b in range(8):
        # tree b alone, with the key it has in the batch (named by the tree, not by its position)
        alone = toy_search(TOY_WEIGHTS[b : b + 1], policy, revealed=TOY_REVEALED[b : b + 1], tree_ids=[b], **kw)
        for field in ("children_visits", "children_index", "node_values", "children_rewards"):
            np.testing.assert_array_equal(
                np.asarray(getattr(together, field)[b]),
                np.asarray(getattr(alone, field)[0]),
                err_msg=f"tree {b} {field}",
            )


def test_toy_paper_uct_best_path_collects_facts_in_weight_order():
    tree = toy_search([[0.2, 0.5, 0.3]], "paper_uct", simulations=300, bonus=1.0)
    best_path, total, ret = max(search_lib.finished_paths(tree, 0), key=lambda p: p[2])
    assert best_path == [1, 2, 0, 3]  # facts by weight, then the answer (slot 3)
    assert total == pytest.approx(2.0)  # all the weight and the bonus
    assert ret == pytest.approx(0.5 + 0.9 * 0.3 + 0.81 * 0.2 + 0.729 * 1.0, abs=1e-6)


# --- scripted doctors on the synthetic clinic ---------------------------------------------------------------


class CountingPatient(FactSelectPatient):
    def __init__(self):
        super().__init__()
        object.__setattr__(self, "calls", [])

    def reply(self, requests):
        self.calls.append(len(requests))
        return super().reply(requests)


def clinic(n=8):
    cases = synthetic.make_cases(n, seed=3)
    rng = np.random.default_rng(1)
    return cases, [rng.dirichlet(np.ones(c.n_facts)) for c in cases]


# One setting for the searches of 8 trees (and 1), so that they share one compiled search per batch size.
SETTINGS = trajectories.SearchSettings(iterations=200, max_children=8, max_questions=2, max_new_tokens=32)


def test_batch_of_8_dialogue_trees_equals_8_alone():
    cases, weights = clinic()
    together, _, _ = trajectories.search_cases(cases, weights, CandidateDoctor(), CountingPatient(), SETTINGS)
    for b in range(8):
        (alone,), _, _ = trajectories.search_cases(
            cases[b : b + 1], weights[b : b + 1], CandidateDoctor(), CountingPatient(), SETTINGS
        )
        assert [{**r, "tree": 0} for r in together[b]] == alone


def test_one_doctor_and_one_patient_call_per_simulation_and_none_below_terminals():
    cases, weights = clinic()
    doctor, patient = CandidateDoctor(), CountingPatient()
    settings = SETTINGS
    records, _, env = trajectories.search_cases(cases, weights, doctor, patient, settings)
    assert doctor.calls <= settings.iterations and len(patient.calls) <= settings.iterations
    # doctor turns sampled = tree edges expanded from live nodes: every other simulation was spent below a
    # terminal node (the doctor asserts it never sees an ended dialogue) and cost nothing
    expanded = sum(len(t) - 1 for t in env.tables)
    assert doctor.turns == expanded == sum(c.doctor_turns for c in env.calls)
    assert sum(patient.calls) == sum(c.patient_replies for c in env.calls)
    assert expanded < settings.iterations * len(
        cases
    )  # 200 simulations; a tree has at most 1 + 8 + 64 + 512 live nodes
    assert all(
        r["llm_calls"] == {"doctor_turns": env.calls[b].doctor_turns, "patient_replies": env.calls[b].patient_replies}
        for b, rs in enumerate(records)
        for r in rs
    )


def test_synthetic_clinic_search_reaches_the_exhaustive_optimum():
    cases, weights = clinic()
    doctor, patient = CandidateDoctor(width=2, pick="cycle"), FactSelectPatient()
    settings = SETTINGS
    records, stats, _ = trajectories.search_cases(cases, weights, doctor, patient, settings)
    for case, w, mine, stat in zip(cases, weights, records, stats, strict=True):
        most_sig, best_return = exhaustive_best(case, w, doctor, patient, settings.max_questions)
        assert max(r["total_sig"] for r in mine) == pytest.approx(most_sig), case.id
        assert max(r["return"] for r in mine) == pytest.approx(best_return), case.id
        assert stat.best_total_sig == pytest.approx(most_sig)
        best = max(mine, key=lambda r: r["return"])
        assert best["messages"][0]["role"] == "user" and best["messages"][1]["role"] == "assistant"
        assert len(best["turn_sig"]) == len([m for m in best["messages"] if m["role"] == "assistant"])


def test_eager_expansion_masks_duplicates_and_rollout_finishes_dialogues():
    cases, weights = clinic(2)
    doctor = CandidateDoctor(width=1)  # 2 candidates per state: 8 eager samples hold duplicates
    settings = trajectories.SearchSettings(
        iterations=6, max_children=8, max_questions=2, max_new_tokens=32, expansion="eager", leaf_value="rollout"
    )
    records, _, env = trajectories.search_cases(cases, weights, doctor, FactSelectPatient(), settings)
    root = env.tables[0][0]
    assert sum(not m for m in root.masked) == len(set(root.candidates) - {""}) <= 2
    for rs in records:
        assert rs and all(r["end"] for r in rs)
        assert any(r["rollout_turns"] > 0 for r in rs)  # tree path + rollout exported
    assert doctor.turns == sum(c.doctor_turns for c in env.calls)


def test_selection_and_reader():
    rows = [
        {
            "case_id": "a",
            "messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}],
            "reward": r,
            "correct": c,
        }
        for r, c in ((1.0, True), (3.0, True), (2.0, False), (3.0, True))
    ]
    rows[3] = {**rows[3], "messages": [*rows[3]["messages"][:1], {"role": "assistant", "content": "z"}]}
    chosen = trajectories.select(rows, trajectories.Selection(top_k=2, min_reward=0.5, require_correct=True))
    assert [r["reward"] for r in chosen] == [3.0, 3.0] and chosen[0] is rows[1]
    assert trajectories.select(rows, trajectories.Selection(top_k=0, min_reward=2.5, require_correct=False)) == [
        rows[1],
        rows[3],
    ]
    with pytest.raises(DataError, match=r"f line 1: field 'messages\[1\].role' is 'user'"):
        trajectories.validate({"case_id": "a", "messages": [{"role": "user", "content": "x"}] * 2}, "f line 1")
    with pytest.raises(DataError, match="field 'case_id' is missing"):
        trajectories.validate({"messages": []}, "f line 2")


# --- the stage: SIGKILL, then resume ------------------------------------------------------------------------

_STAGE = """
import os, pathlib, signal, sys
from promed_jax.mcts import run as mcts_run
from promed_jax.consult.patients import FactSelectPatient
sys.path.insert(0, {tests!r})
from test_mcts import stage_config
from promed_jax.mcts.testing import CandidateDoctor

export = pathlib.Path({workdir!r}) / "mcts" / "synthetic.jsonl"

class Killed(CandidateDoctor):
    def chat(self, conversations, **kw):
        # the first doctor call after a batch's lines were written: inside the next batch's search
        if {kill} and export.exists() and export.stat().st_size:
            os.kill(os.getpid(), signal.SIGKILL)
        return super().chat(conversations, **kw)

backends = mcts_run.Backends(doctor=Killed(), patient=FactSelectPatient(), weights="scripted")
mcts_run.run_search(stage_config(), {workdir!r}, backends)
"""


def stage_config():
    from configs import mcts as mcts_config

    config = mcts_config.get_config("tiny")
    config.data.synthetic_n = 6
    config.mcts.batch_trees = 2
    config.mcts.iterations = 6
    config.mcts.max_children = 8  # the eager test's shapes: one compiled search for both
    config.consult.max_questions = 2
    config.mcts.require_correct = False
    return config


def write_weights(workdir):
    from promed_jax.shapley import cache
    from promed_jax.text import prompts

    path = cache.cache_path(workdir, "synthetic")
    path.parent.mkdir(parents=True)
    rng = np.random.default_rng(0)
    with open(path, "w") as f:
        for case in synthetic.make_cases(6, seed=0):
            w = rng.dirichlet(np.ones(case.n_facts))
            f.write(
                json.dumps(
                    cache.ShapleyRecord(
                        case.id,
                        case.fingerprint,
                        case.n_facts,
                        tuple(w.tolist()),
                        tuple(w.tolist()),
                        "exact",
                        16,
                        "scripted",
                        prompts.SHAPLEY_PROMPT_VERSION,
                    ).to_json()
                )
                + "\n"
            )


def run_stage(workdir, kill=False):
    script = _STAGE.format(tests=str(REPO / "tests"), workdir=str(workdir), kill=kill)
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "JAX_PLATFORMS": "cpu"}
    return subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True, check=False, timeout=300
    )


def scripted_backends():
    from promed_jax.mcts import run as mcts_run

    return mcts_run.Backends(doctor=CandidateDoctor(), patient=FactSelectPatient(), weights="scripted")


@pytest.mark.slow
def test_sigkill_during_search_then_resume_gives_the_same_export(tmp_path):
    from promed_jax.mcts import run as mcts_run

    whole, killed = tmp_path / "whole", tmp_path / "killed"
    for workdir in (whole, killed):
        write_weights(workdir)
    mcts_run.run_search(stage_config(), str(whole), scripted_backends())
    # 3 batches (rollout leaf values, the default): the child is killed inside the second batch's search
    cut = run_stage(killed, kill=True)
    assert cut.returncode == -signal.SIGKILL, cut.stderr[-2000:]
    partial = (killed / "mcts" / "synthetic.jsonl").read_bytes()
    assert partial and whole.joinpath("mcts", "synthetic.jsonl").read_bytes().startswith(partial)
    assert not (killed / "mcts" / "selected.jsonl").exists()
    mcts_run.run_search(stage_config(), str(killed), scripted_backends())
    for name in ("synthetic.jsonl", "selected.jsonl"):
        assert (killed / "mcts" / name).read_bytes() == (whole / "mcts" / name).read_bytes()
    lines = [json.loads(x) for x in (whole / "mcts" / "synthetic.jsonl").read_text().splitlines()]
    assert {r["batch"] for r in lines} == {0, 1, 2}
    assert json.loads((whole / "mcts" / "selection.json").read_text())["exported"] == len(lines)


def test_torn_batch_is_dropped_on_resume(tmp_path):
    from promed_jax.mcts import run as mcts_run

    cases = synthetic.make_cases(4, seed=0)
    batches = [cases[:2], cases[2:]]
    line = {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}
    path = tmp_path / "s.jsonl"
    rows = [
        {**line, "case_id": cases[0].id, "fingerprint": cases[0].fingerprint, "batch": 0, "batch_lines": 1},
        {**line, "case_id": cases[2].id, "fingerprint": cases[2].fingerprint, "batch": 1, "batch_lines": 3},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert mcts_run.finished_batches(path, batches) == 1
    assert [json.loads(x)["batch"] for x in path.read_text().splitlines()] == [0]
