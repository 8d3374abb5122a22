"""The entry point and configs: presets, paper values, dispatch, one-line errors (subprocess), sweeps."""

import json
import os
import pathlib
import subprocess
import sys

import ml_collections
import pytest

from configs import base
from configs import eval as eval_config
from experiments import sweep
from promed_jax import main

REPO = pathlib.Path(__file__).resolve().parents[1]
STAGE_FILES = ("shapley", "mcts", "sft", "rl", "eval")
PAPER_VALUES = {
    "shapley.tau": 2.0,
    "shapley.exact_max_n": 10,
    "shapley.min_permutations": 3,
    "shapley.max_permutations": 50,
    "shapley.truncation_tol": 0.01,
    "shapley.convergence_tol": 0.01,
    "mcts.c_uct": 2.2,
    "mcts.decay": 0.9,
    "mcts.max_children": 8,
    "mcts.temperature": 0.7,
    "mcts.correct_bonus": 2.0,
    "mcts.iterations": 5,
    "grpo.num_generations": 4,
    "grpo.alpha": 2.0,
    "grpo.beta": 1.0,
    "grpo.gamma": 3.0,
    "grpo.clip_eps": 0.1,
    "grpo.kl_beta": 0.04,
    "grpo.kl_estimator": "k3",
    "grpo.learning_rate": 5e-6,
    "grpo.format_reward_start": 1.0,
    "grpo.format_reward_contains": 0.5,
    "grpo.trajectory_correct_reward": 4.0,
    "model.lora_rank": 8,
    "model.lora_alpha": 32.0,
    "model.lora_dropout": 0.1,
    "model.lora_targets": ("q_proj", "v_proj"),
    "sampling.temperature": 0.7,
    "sampling.max_new_tokens": 256,
    "sampling.repetition_penalty": 1.1,
    "sampling.no_repeat_ngram_size": 3,
    "sampling.max_dialogue_tokens": 8192,
    "consult.max_questions": 10,
    "backend.temperature": 0.7,
}


def _get(config, dotted):
    for part in dotted.split("."):
        config = config[part]
    return config


def _stage(name):
    return sweep.load_config_module(str(REPO / "configs" / f"{name}.py"))


def run_main(*args, cwd=REPO, timeout=300):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    return subprocess.run(
        [sys.executable, "-m", "promed_jax.main", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


# --- configs -------------------------------------------------------------------------------------------------


def test_every_paper_value_is_a_named_field():
    config = base.get_config()
    for dotted, value in PAPER_VALUES.items():
        assert _get(config, dotted) == value, dotted


@pytest.mark.parametrize("name", STAGE_FILES)
def test_every_stage_file_builds_every_preset(name):
    module = _stage(name)
    expected_mode = "pipeline" if name == "rl" else name
    for preset in (None, *base.PRESETS):
        config = module.get_config(preset)
        assert isinstance(config, ml_collections.ConfigDict) and config.mode == expected_mode
        assert set(config) >= {"model", "data", "patient", "backend", "shapley", "sampling", "mcts", "sft", "grpo"}
        assert set(config) >= {"mesh", "ckpt", "eval", "consult"}
    assert module.get_config(None).to_dict() == module.get_config("tiny").to_dict()


def test_presets_pick_model_and_data():
    tiny, smollm, qwen = (eval_config.get_config(p) for p in ("tiny", "smollm", "qwen7b"))
    assert (tiny.model.kind, tiny.data.kind) == ("tiny", "synthetic")
    assert (smollm.model.kind, smollm.data.kind, smollm.data.limit) == ("gguf", "files", 50)
    assert smollm.data.paths == ("../shared/data/medqa_dev_convo.jsonl",)
    assert (qwen.model.kind, qwen.model.dtype) == ("hf", "bfloat16")
    with pytest.raises(ValueError, match="unknown config preset 'big'"):
        base.get_config("big")


# --- dispatch --------------------------------------------------------------------------------------------------


def test_dispatch_table():
    from promed_jax.data import stats
    from promed_jax.mcts import run as mcts_run
    from promed_jax.rl import loop as rl_loop
    from promed_jax.training import run as sft_run

    assert main.resolve_stage("data") is stats.run
    assert main.resolve_stage("mcts") is mcts_run.run
    assert main.resolve_stage("sft") is sft_run.run
    assert main.resolve_stage("rl") is rl_loop.run
    assert not main.LATER
    with pytest.raises(main.UnknownMode, match="unknown config.mode 'train'"):
        main.resolve_stage("train")


def test_missing_module_is_named_by_dotted_path():
    def unbuilt(name):
        return main._unbuilt(ModuleNotFoundError(name=name), "promed_jax.evaluation.evaluate")

    assert unbuilt("promed_jax.evaluation") == "module promed_jax.evaluation.evaluate is not built yet (later issue)"
    assert unbuilt("promed_jax.evaluation.evaluate") == (
        "module promed_jax.evaluation.evaluate is not built yet (later issue)"
    )
    assert unbuilt("promed_jax.evaluation.eval") == "needs promed_jax.evaluation.eval, which is not built yet (later issue)"


# --- the command line (subprocess) ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (
            ["--config=configs/rl.py", "--config.grpo.nmu_generations=4"],
            ("error: unknown config field 'nmu_generations' in --config.grpo.nmu_generations=4; "
            'Did you mean "num_generations" instead of "nmu_generations"?'),
        ),
        (
            ["--config=configs/rl.py", "--config.grpo.num_generations=four"],
            "error: flag --config.grpo.num_generations=four: invalid literal for int() with base 10: 'four'",
        ),
        (
            ["--config=configs/eval.py:big"],
            ("error: flag --config=configs/eval.py:big: Error whilst parsing config file: "
            "ValueError: unknown config preset 'big'; known: tiny, smollm, qwen7b, llama8b"),
        ),
    ],
    ids=["typo", "wrong-type", "unknown-preset"],
)
def test_config_errors_are_one_line(args, expected):
    result = run_main(*args)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [expected]
    assert "Traceback" not in result.stderr


def test_missing_config_file_is_one_line():
    result = run_main("--config=configs/nope.py")
    assert result.returncode == 1
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: ") and "configs/nope.py" in line and "No such file" in line


def test_stage_not_built_yet_exits_2(monkeypatch, capsys, tmp_path):
    # every stage is built now; a stage named in LATER (the rule for new ones) still exits 2 with one line
    monkeypatch.setitem(main.LATER, "rl", "SIG-augmented policy optimisation (stage 2)")
    with pytest.raises(main.StageMissing, match="not built yet \\(later issue\\)"):
        main.resolve_stage("rl")
    code = main.main(["prog", f"--config={REPO}/configs/rl.py", "--config.mode=rl", f"--workdir={tmp_path}"])
    assert code == main.EXIT_NOT_BUILT
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: mode 'rl': SIG-augmented policy optimisation (stage 2) is not built yet (later issue)"
    )


def test_data_mode_prints_per_source_statistics(tmp_path):
    result = run_main("--config=configs/eval.py:tiny", "--config.mode=data", f"--workdir={tmp_path}")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[0].startswith("| source | lang | cases | options")
    assert lines[2].startswith("| synthetic | en | 64 | 4: 64 | 4.00 [4-4] |")
    assert (tmp_path / "data" / "stats.md").read_text().strip() == result.stdout.strip()


def test_bad_data_is_one_line_and_writes_nothing(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": 3, "options": {"A": "x"}, "question": "?", "atomic_facts": []}) + "\n")
    workdir = tmp_path / "workdir"
    result = run_main(
        "--config=configs/eval.py:smollm",
        "--config.mode=data",
        f"--config.data.paths=('{bad}',)",
        "--config.data.on_error=raise",
        f"--workdir={workdir}",
    )
    assert result.returncode == main.EXIT_BAD_INPUT
    assert result.stderr.strip().splitlines()[-1] == (
        "error: bad.jsonl line 1 (id 3): field 'options': 1 non-empty option(s); at least 2 are needed"
    )
    assert not workdir.exists()


# --- sweeps ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", STAGE_FILES)
def test_every_sweep_expands_to_valid_overrides(name):
    lines = sweep.command_lines(f"configs/{name}.py:tiny", "runs")
    assert lines and all(line.startswith(f"python -m promed_jax.main --config=configs/{name}.py:tiny --workdir=runs/")
                         for line in lines)
    assert len({line.split()[4] for line in lines}) == len(lines)  # distinct workdirs


def test_sweep_rejects_a_typo(tmp_path):
    path = tmp_path / "typo.py"
    path.write_text(
        "from configs import base\n"
        "def get_config(arg=None):\n    return base.get_config(arg)\n"
        "def sweep(add):\n    add(**{'grpo.nmu_generations': 8})\n"
    )
    with pytest.raises(KeyError, match="unknown config field 'grpo.nmu_generations'"):
        sweep.command_lines(str(path), "runs")
    path.write_text(path.read_text().replace("nmu_generations': 8", "num_generations': 'eight'"))
    with pytest.raises(TypeError, match="grpo.num_generations expects int"):
        sweep.command_lines(str(path), "runs")


# --- in-process: main(argv) returns the exit code --------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ([], "error: flag --config is required, e.g. --config=configs/eval.py:tiny"),
        ([f"--config={REPO}/configs/eval.py", "extra"], "error: unexpected arguments: extra"),
    ],
    ids=["no-config", "positional"],
)
def test_command_line_mistakes_in_process(args, expected, capsys):
    assert main.main(["promed_jax.main", *args]) == main.EXIT_BAD_INPUT
    assert capsys.readouterr().err.splitlines() == [expected]


def test_in_process_runs_do_not_share_flags(tmp_path, capsys):
    argv = ["promed_jax.main", f"--config={REPO}/configs/eval.py:tiny", "--config.mode=data", f"--workdir={tmp_path}"]
    assert main.main([*argv, "--config.data.synthetic_n=3"]) == 0
    assert main.main(argv) == 0  # the override of the first call does not leak into the second
    assert "| synthetic | en | 64 |" in capsys.readouterr().out
