"""The shapley stage: cache records, resume after SIGKILL equals an uninterrupted run, plots."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from configs import shapley as shapley_config
from promed_jax.shapley import cache as cache_lib
from promed_jax.shapley import run as run_lib
from promed_jax.shapley.weights import shapley_weights
from promed_jax.text.prompts import SHAPLEY_PROMPT_VERSION

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def record(case_id="synthetic:0", n=2, model="tiny:seed0", version=SHAPLEY_PROMPT_VERSION):
    return cache_lib.ShapleyRecord(
        id=case_id,
        n=n,
        phi=tuple(np.linspace(-1, 1, n)),
        w=tuple(shapley_weights(np.linspace(-1, 1, n))),
        estimator="exact",
        n_evals=2**n,
        model=model,
        prompt_version=version,
    )


def test_cache_round_trip_and_torn_line(tmp_path):
    path = cache_lib.cache_path(tmp_path, "synthetic")
    assert path == tmp_path / "shapley" / "synthetic.jsonl"
    path.parent.mkdir(parents=True)
    lines = [json.dumps(record(f"synthetic:{i}").to_json()) for i in range(3)]
    path.write_text("\n".join(lines) + "\n" + lines[0][:20])  # killed while writing the 4th line
    records = cache_lib.read_cache(path)
    assert list(records) == ["synthetic:0", "synthetic:1", "synthetic:2"]
    assert records["synthetic:1"] == record("synthetic:1")
    assert set(json.loads(lines[0])) == set(cache_lib.FIELDS)
    assert path.read_text().endswith("}\n")  # the torn line is gone
    w = cache_lib.load_weights(tmp_path, "synthetic", ["synthetic:2"], prompt_version=SHAPLEY_PROMPT_VERSION)
    np.testing.assert_allclose(w["synthetic:2"], shapley_weights(np.array([-1.0, 1.0])))
    assert w["synthetic:2"][1] > 0.6
    uniform = cache_lib.load_weights(tmp_path, "synthetic", ["synthetic:2"], weighting="uniform")
    np.testing.assert_allclose(uniform["synthetic:2"], [0.5, 0.5])
    with pytest.raises(KeyError, match="no Shapley record for case synthetic:9"):
        cache_lib.load_weights(tmp_path, "synthetic", ["synthetic:9"])


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda r: r.pop("w"), "line 2: record synthetic:1: missing field\\(s\\) w"),
        (lambda r: r.update(phi=[1.0]), "line 2: record synthetic:1: field phi must be a list of 2 numbers"),
        (lambda r: r.update(id="synthetic:0"), "line 2: case synthetic:0 appears twice"),
    ],
)
def test_cache_errors_name_file_line_and_field(tmp_path, edit, message):
    path = tmp_path / "c.jsonl"
    second = record("synthetic:1").to_json()
    edit(second)
    path.write_text(json.dumps(record().to_json()) + "\n" + json.dumps(second) + "\n")
    with pytest.raises(ValueError, match=message):
        cache_lib.read_cache(path)


def test_cache_refuses_another_model_or_prompt(tmp_path):
    with pytest.raises(ValueError, match="model 'gguf:x'.*use another workdir"):
        cache_lib.check_compatible([record(model="gguf:x")], model="tiny:seed0", prompt_version="v", path="p")
    with pytest.raises(ValueError, match="prompt 'shapley-v0'.*use another workdir"):
        cache_lib.check_compatible(
            [record(version="shapley-v0")], model="tiny:seed0", prompt_version=SHAPLEY_PROMPT_VERSION, path="p"
        )
    cache_lib.check_compatible([record()], model="tiny:seed0", prompt_version=SHAPLEY_PROMPT_VERSION, path="p")


def test_estimator_choice_follows_config():
    def game(coalitions):  # symmetric and non-additive
        return coalitions.sum(1).astype(np.float32) ** 1.5

    config = shapley_config.get_config().shapley
    phi, n_evals, name = run_lib.estimate_case(game, 4, config, seed=1)
    assert name == "exact" and n_evals == 16
    config = shapley_config.get_config().shapley
    config.exact_max_n = 3
    config.estimator = "kernel_shap"
    config.budget = 20
    phi_ks, n_evals, name = run_lib.estimate_case(game, 4, config, seed=1)
    assert name == "kernel_shap" and n_evals <= 20
    assert phi_ks.sum() == pytest.approx(phi.sum(), abs=1e-5)  # efficiency
    np.testing.assert_allclose(phi_ks, phi, atol=0.1)  # a symmetric game: φ = 2 each
    assert run_lib.case_seed(0, "a:1") == run_lib.case_seed(0, "a:1") != run_lib.case_seed(0, "a:2")


def test_budget_scales_with_facts_unless_set():
    config = shapley_config.get_config().shapley
    assert config.estimator == "kernel_shap" and config.budget == 0 and config.exact_max_n == 10
    assert run_lib.case_budget(config, 11) == config.budget_per_fact * 12
    assert run_lib.estimator_options("kernel_shap", config, 20) == {"budget": config.budget_per_fact * 21}
    config.budget = 100
    assert run_lib.case_budget(config, 11) == run_lib.case_budget(config, 30) == 100


def shapley_command(workdir, *overrides):
    return [
        sys.executable,
        "-m",
        "promed_jax.main",
        "--config=configs/shapley.py",
        f"--workdir={workdir}",
        "--config.data.synthetic_n=60",
        *overrides,
    ]


@pytest.mark.slow
def test_sigkill_then_resume_equals_uninterrupted(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    killed = tmp_path / "killed"
    path = cache_lib.cache_path(killed, "synthetic")
    proc = subprocess.Popen(
        shapley_command(killed), cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            if path.exists() and path.read_bytes().count(b"\n") >= 20:
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.01)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    partial = path.read_bytes().count(b"\n")
    assert 20 <= partial < 60

    resumed = subprocess.run(shapley_command(killed), cwd=REPO, env=env, capture_output=True, text=True, check=False)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    uninterrupted = tmp_path / "whole"
    whole = subprocess.run(
        shapley_command(uninterrupted), cwd=REPO, env=env, capture_output=True, text=True, check=False
    )
    assert whole.returncode == 0, whole.stderr[-2000:]

    got = cache_lib.read_cache(path)
    want = cache_lib.read_cache(cache_lib.cache_path(uninterrupted, "synthetic"))
    assert list(got) == list(want) and len(got) == 60
    for case_id, rec in want.items():
        assert got[case_id].estimator == rec.estimator and got[case_id].n_evals == rec.n_evals
        np.testing.assert_allclose(got[case_id].phi, rec.phi, atol=1e-6)
        np.testing.assert_allclose(got[case_id].w, rec.w, atol=1e-6)
        np.testing.assert_allclose(sum(rec.w), 1.0, atol=1e-9)


def test_run_in_process_with_plots(tmp_path):
    config = shapley_config.get_config()
    config.data.synthetic_n = 3
    config.shapley.plot = True
    paths = run_lib.run(config, str(tmp_path))
    records = cache_lib.read_cache(paths["synthetic"])
    assert len(records) == 3
    for case_id, rec in records.items():
        assert rec.estimator == "exact" and rec.n_evals == 2**rec.n and rec.model == "tiny:seed0"
        png = tmp_path / "shapley" / "plots" / "synthetic" / f"{case_id.replace(':', '_')}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # A second run finds everything cached and computes nothing.
    before = paths["synthetic"].read_bytes()
    run_lib.run(config, str(tmp_path))
    assert paths["synthetic"].read_bytes() == before
