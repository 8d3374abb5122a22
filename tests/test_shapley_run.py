"""The shapley stage: cache records, resume after SIGKILL equals an uninterrupted run, plots."""

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from configs import shapley as shapley_config
from promed_jax import provenance
from promed_jax.data.cases import Case
from promed_jax.errors import CacheError, ConfigError
from promed_jax.models.loader import load_model
from promed_jax.shapley import cache as cache_lib
from promed_jax.shapley import run as run_lib
from promed_jax.shapley.estimators import MemoValue
from promed_jax.shapley.weights import shapley_weights
from promed_jax.text.prompts import SHAPLEY_PROMPT_VERSION

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_case(i: int, n: int = 2, source: str = "synthetic") -> Case:
    facts = tuple(f"fact {k} of case {i}" for k in range(n))
    return Case(f"{source}:{i}", source, "en", "info", "Which?", {"A": "x", "B": "y"}, ("A",), facts)


def record(case=None, model="tiny:seed0", version=SHAPLEY_PROMPT_VERSION):
    case = case or make_case(0)
    phi = np.linspace(-1, 1, case.n_facts)
    return cache_lib.ShapleyRecord(
        id=case.id,
        fingerprint=case.fingerprint,
        n=case.n_facts,
        phi=tuple(phi),
        w=tuple(shapley_weights(phi)),
        estimator="exact",
        n_evals=2**case.n_facts,
        model=model,
        prompt_version=version,
    )


def test_cache_round_trip_and_torn_line(tmp_path):
    path = cache_lib.cache_path(tmp_path, "synthetic")
    assert path == tmp_path / "shapley" / "synthetic.jsonl"
    path.parent.mkdir(parents=True)
    cases = [make_case(i) for i in range(3)]
    lines = [json.dumps(record(case).to_json()) for case in cases]
    path.write_text("\n".join(lines) + "\n" + lines[0][:20])  # killed while writing the 4th line
    records = cache_lib.read_cache(path)
    assert list(records) == ["synthetic:0", "synthetic:1", "synthetic:2"]
    assert records["synthetic:1"] == record(cases[1])
    assert list(json.loads(lines[0])) == list(cache_lib.FIELDS)
    assert path.read_text().endswith("}\n")  # the torn line is gone
    w = cache_lib.load_weights(tmp_path, cases[2:], prompt_version=SHAPLEY_PROMPT_VERSION)
    np.testing.assert_allclose(w["synthetic:2"], shapley_weights(np.array([-1.0, 1.0])))
    assert w["synthetic:2"][1] > 0.6
    uniform = cache_lib.load_weights(tmp_path, cases[2:], weighting="uniform")
    np.testing.assert_allclose(uniform["synthetic:2"], [0.5, 0.5])
    with pytest.raises(CacheError, match="no Shapley record for case synthetic:9"):
        cache_lib.load_weights(tmp_path, [make_case(9)])
    # A case of another file with a cached id is refused, not given the cached weights.
    with pytest.raises(CacheError, match=r"synthetic\.jsonl: case synthetic:1: the stored fingerprint .*another file"):
        cache_lib.load_weights(tmp_path, [make_case(1, n=3)])


def _nan(r):
    r["phi"][1] = float("nan")


def _inf(r):
    r["phi"][0] = float("inf")


def _negative_w(r):
    r["w"] = [1.5, -0.5]


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda r: r.pop("w"), "field 'w': missing"),
        (lambda r: r.pop("fingerprint"), "field 'fingerprint': missing"),
        (lambda r: r.update(extra=1), "field 'extra': unexpected field"),
        (lambda r: r.update(phi=[1.0]), "field 'phi': 1 values, expected n = 2"),
        (lambda r: r.update(n=3), "field 'phi': 2 values, expected n = 3"),
        (lambda r: r.update(n="2"), "field 'n': expected int, got str"),
        (lambda r: r.update(n=True), "field 'n': expected int, got bool"),
        (lambda r: r.update(n=0), "field 'n': 0 is below 1"),
        (_nan, "field 'phi\\[1\\]': nan is not finite"),
        (_inf, "field 'phi\\[0\\]': inf is not finite"),
        (lambda r: r.update(phi=[0.1, "x"]), "field 'phi\\[1\\]': expected a number, got str"),
        (_negative_w, "field 'w\\[1\\]': -0.5 is negative"),
        (lambda r: r.update(w=[0.5, 0.4]), "field 'w': sums to 0.9, not 1"),
        (lambda r: r.update(estimator="guess"), "field 'estimator': unknown estimator 'guess'"),
        (lambda r: r.update(n_evals=-1), "field 'n_evals': -1 is below 1"),
        (lambda r: r.update(fingerprint="xyz"), "field 'fingerprint': 'xyz' is not 16 hex digits"),
        (lambda r: r.update(model=""), "field 'model': empty text"),
        (lambda r: r.update(record().to_json()), "field 'id': case synthetic:0 appears twice"),
    ],
)
def test_cache_fields_are_validated_naming_file_line_and_field(tmp_path, edit, message):
    path = tmp_path / "c.jsonl"
    second = record(make_case(1)).to_json()
    edit(second)
    path.write_text(json.dumps(record().to_json()) + "\n" + json.dumps(second) + "\n")
    with pytest.raises(CacheError, match=f"^{re.escape(str(path))} line 2: {message}$"):
        cache_lib.read_cache(path)


def test_cache_record_of_another_case_or_size_is_refused():
    records = {"synthetic:1": record(make_case(1))}
    cache_lib.check_cases(records, [make_case(1), make_case(2)], path="p")
    with pytest.raises(CacheError, match="^p: case synthetic:1: the stored fingerprint"):
        cache_lib.check_cases(records, [make_case(1, n=3)], path="p")
    forged = {"synthetic:1": dataclasses.replace(record(make_case(1)), n=3)}
    with pytest.raises(CacheError, match="^p: case synthetic:1: field 'n' is 3, the case has 2 facts$"):
        cache_lib.check_cases(forged, [make_case(1)], path="p")


def test_cache_refuses_another_model_or_prompt(tmp_path):
    with pytest.raises(CacheError, match="model 'gguf:x'.*use another workdir"):
        cache_lib.check_compatible([record(model="gguf:x")], model="tiny:seed0", prompt_version="v", path="p")
    with pytest.raises(CacheError, match="prompt 'shapley-v0'.*use another workdir"):
        cache_lib.check_compatible(
            [record(version="shapley-v0")], model="tiny:seed0", prompt_version=SHAPLEY_PROMPT_VERSION, path="p"
        )
    cache_lib.check_compatible([record()], model="tiny:seed0", prompt_version=SHAPLEY_PROMPT_VERSION, path="p")


def _symmetric_game(coalitions):  # symmetric and non-additive
    return coalitions.sum(1).astype(np.float32) ** 1.5


def test_estimator_choice_follows_config():
    game = MemoValue(_symmetric_game, 4)
    config = shapley_config.get_config().shapley
    plan = run_lib.plan_case("a:1", 4, 50, config)
    phi, n_evals = run_lib.estimate_case(game, plan, seed=1)
    assert plan == run_lib.CasePlan("exact", {}, 16) and n_evals == 16
    config = shapley_config.get_config().shapley
    config.exact_max_n = 3
    config.estimator = "kernel_shap"
    config.budget = 20
    plan = run_lib.plan_case("a:1", 4, 50, config)
    phi_ks, n_evals = run_lib.estimate_case(MemoValue(_symmetric_game, 4), plan, seed=1)
    assert plan.name == "kernel_shap" and not plan.warning and n_evals <= 20
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


@pytest.mark.parametrize(
    ("estimator", "n", "prompt_tokens", "caps", "expected"),
    [
        # 8(n+1) = 8008 coalitions at n = 1000: over the coalition cap, kernel_shap within it
        ("kernel_shap", 1000, 100, (4096, 10**9), ("kernel_shap", 4096, True)),
        # the token cap: 4,000 tokens per coalition leave 1,000,000 // 4,000 = 250
        ("kernel_shap", 40, 4000, (4096, 10**6), ("kernel_shap", 250, True)),
        # tmc walks up to 50 permutations of n - 1 new prefixes: 50 * 99 + 2 = 4952 > 4096
        ("tmc", 100, 100, (4096, 10**9), ("kernel_shap", 4096, True)),
        ("tmc", 80, 100, (4096, 10**9), ("tmc", 50 * 79 + 2, False)),  # within the cap: unchanged
        ("permutation", 11, 100, (96, 10**9), ("kernel_shap", 96, True)),  # 96 + 2 * 11 > 96
    ],
)
def test_a_case_over_the_per_case_cap_gets_kernel_shap_within_it(estimator, n, prompt_tokens, caps, expected):
    config = shapley_config.get_config().shapley
    config.estimator = estimator
    config.max_case_coalitions, config.max_case_tokens = caps
    plan = run_lib.plan_case("big:7", n, prompt_tokens, config)
    name, coalitions, capped = expected
    assert (plan.name, plan.coalitions) == (name, coalitions)
    assert bool(plan.warning) == capped
    if capped:
        assert plan.options == {"budget": expected[1]}
        assert plan.warning.startswith(f"shapley: case big:7 ({n} facts, {prompt_tokens} prompt tokens): {estimator}")
        assert f"using kernel_shap with budget {expected[1]} instead" in plan.warning


def test_a_case_the_caps_leave_too_few_coalitions_is_one_config_error():
    config = shapley_config.get_config().shapley
    config.max_case_tokens = 3 * 5000
    with pytest.raises(ConfigError, match=r"^shapley: case big:7 \(40 facts, 5000 prompt tokens\) leaves 3 "):
        run_lib.plan_case("big:7", 40, 5000, config)


def test_the_stage_warns_and_keeps_the_cap_on_a_long_case(tmp_path, caplog):
    """End to end: a 30-fact case under a cap of 24 coalitions gets kernel_shap with 24, and a warning."""
    path = write_mediq(tmp_path / "long.jsonl", {"1": [f"Finding number {i} is present." for i in range(30)]})
    config = file_config(path)
    config.shapley.max_case_coalitions = 24
    with caplog.at_level("WARNING"):
        paths = run_lib.run(config, str(tmp_path / "wd"))
    (rec,) = cache_lib.read_cache(paths["long"]).values()
    assert rec.estimator == "kernel_shap" and rec.n == 30 and 4 <= rec.n_evals <= 24
    assert any("case long:1 (30 facts" in m and "budget 24 instead" in m for m in caplog.messages)


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
        assert rec.estimator == "exact" and rec.n_evals == 2**rec.n and rec.model.startswith("tiny:seed0@sha256:")
        png = tmp_path / "shapley" / "plots" / "synthetic" / f"{case_id.replace(':', '_')}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # A second run finds everything cached and computes nothing.
    before = paths["synthetic"].read_bytes()
    run_lib.run(config, str(tmp_path))
    assert paths["synthetic"].read_bytes() == before


def write_mediq(path, facts_by_id):
    """A MediQ-format file with one case per id (2-fact cases keep the tiny model's games cheap)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [
        json.dumps(
            {
                "id": case_id,
                "question": "Which diagnosis?",
                "context": ["A patient comes in."],
                "options": {"A": "flu", "B": "cold"},
                "answer_idx": "A",
                "atomic_facts": list(facts),
            }
        )
        for case_id, facts in facts_by_id.items()
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def file_config(path):
    config = shapley_config.get_config()
    config.data.kind = "files"
    config.data.paths = (str(path),)
    config.data.split = "all"
    return config


def test_resume_refuses_another_files_cases_and_another_run(tmp_path, monkeypatch):
    dev = write_mediq(tmp_path / "dev" / "medqa.jsonl", {1: ("fever", "cough"), 2: ("rash", "itch")})
    workdir = str(tmp_path / "work")
    paths = run_lib.run(file_config(dev), workdir)
    assert list(paths) == ["medqa"] and list(cache_lib.read_cache(paths["medqa"])) == ["medqa:1", "medqa:2"]
    run_json = tmp_path / "work" / "shapley" / "run.json"
    written = json.loads(run_json.read_text())
    assert written["stage"] == "shapley" and written["config"]["shapley.tau"] == 2.0
    assert "shapley.batch_size" not in written["config"] and written["weights"].startswith("sha256:")
    assert written["git_commits"] == [provenance.git_commit()]
    before = paths["medqa"].read_bytes()

    # Not part of the provenance: another batch size resumes (and finds everything cached).
    config = file_config(dev)
    config.shapley.batch_size = 4
    run_lib.run(config, workdir)
    assert paths["medqa"].read_bytes() == before
    # Part of it: another tau is refused, naming the field.
    config.shapley.tau = 1.0
    with pytest.raises(CacheError, match=r"run\.json: this run differs .*: shapley\.tau 2\.0 -> 1\.0; use another"):
        run_lib.run(config, workdir)

    # The same config with other weights (a trained θ) is refused.
    def trained(section, **kwargs):
        model, tokenizer = load_model(section, **kwargs)
        model.embed[...] = model.embed[...] + 1e-3
        return model, tokenizer

    with monkeypatch.context() as patch:
        patch.setattr(run_lib, "load_model", trained)
        with pytest.raises(CacheError, match=r"differs from the one that wrote it: model weights 'sha256:\w+' -> 'sha"):
            run_lib.run(file_config(dev), workdir)

    # The test file of another split has the same stem, so the same ids: its cases are refused by fingerprint.
    test = write_mediq(tmp_path / "test" / "medqa.jsonl", {1: ("chest pain", "dyspnea", "sweating")})
    with pytest.raises(CacheError, match=r"medqa\.jsonl: case medqa:1: the stored fingerprint \w+ is not the"):
        run_lib.run(file_config(test), workdir)
    assert paths["medqa"].read_bytes() == before

    # A new commit is recorded, not refused.
    run_json.write_text(json.dumps({**written, "git_commits": ["0ld"]}))
    run_lib.run(file_config(dev), workdir)
    assert json.loads(run_json.read_text())["git_commits"] == ["0ld", provenance.git_commit()]
    # Results whose provenance is unknown are refused.
    run_json.unlink()
    with pytest.raises(CacheError, match=r"shapley holds results but no run\.json.*; use another workdir$"):
        run_lib.run(file_config(dev), workdir)
