"""Malformed inputs through the entry point: each is exit 1 and one `error:` line naming the key, file, record
or field, with no traceback and nothing half-written in the workdir.

Most rows call `main.main` in-process (seconds for the table); a few run `python -m promed_jax.main`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import struct
import subprocess
import sys
import time
from collections.abc import Callable

import pytest

from configs import base
from promed_jax import config_check, main

REPO = pathlib.Path(__file__).resolve().parents[1]
CASE = {
    "id": 7,
    "question": "Which drug was given?",
    "options": {"A": "Gentamicin", "B": "Ceftriaxone"},
    "answer_idx": "B",
    "context": ["A 21-year-old man has fever.", "He has knee pain.", "The culture grows diplococci."],
    "atomic_facts": ["He has knee pain.", "The culture grows diplococci."],
}
TINY_HF_CONFIG = {
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 128,
    "max_position_embeddings": 256,
}


@dataclasses.dataclass(frozen=True)
class Row:
    """One malformed input: the stage config, its overrides ({tmp} is the test's folder, {wd} the workdir),
    what the error line must contain, and the files to write first (relative to {tmp})."""

    name: str
    config: str
    overrides: tuple[str, ...]
    expect: tuple[str, ...]
    files: Callable[[pathlib.Path], None] | None = None


def _write(rel: str, data: bytes | str) -> Callable[[pathlib.Path], None]:
    def setup(tmp: pathlib.Path) -> None:
        path = tmp / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))

    return setup


def _all(*setups: Callable[[pathlib.Path], None]) -> Callable[[pathlib.Path], None]:
    def setup(tmp: pathlib.Path) -> None:
        for s in setups:
            s(tmp)

    return setup


def _line(record: dict) -> str:
    return json.dumps(record, ensure_ascii=True) + "\n"


def _safetensors(header: bytes) -> bytes:
    return struct.pack("<Q", len(header)) + header


DEEP = "[" * 100_000 + "]" * 100_000
DATA = ("--config.mode=data", "--config.data.kind=files", "--config.data.on_error=raise")
FILE = "--config.data.paths=('{tmp}/cases.jsonl',)"
SHAPLEY_CACHE = "wd/shapley/synthetic.jsonl"
ONE_CASE = ("--config.data.synthetic_n=2",)
HF = ("--config.model.kind=hf", "--config.model.path={tmp}/ckpt")

CONFIG_ROWS = [
    Row("tau-0", "shapley", ("--config.shapley.tau=0",), ("config shapley.tau must be > 0, got 0.0",)),
    Row("tau-nan", "shapley", ("--config.shapley.tau=nan",), ("config shapley.tau must be > 0, got nan",)),
    Row("estimator", "shapley", ("--config.shapley.estimator=bogus",), ("config shapley.estimator", "'kernel_shap'")),
    Row("patient-kind", "eval", ("--config.patient.kind=bogus",), ("config patient.kind", "'fact_select'", "'bogus'")),
    Row("model-kind", "eval", ("--config.model.kind=bogus",), ("config model.kind must be one of 'tiny', 'hf'",)),
    Row("qwen7b-no-path", "eval", (), ("model.kind='hf' needs model.path", "--config.model.path=")),
    Row("llama8b-no-path", "eval", (), ("model.kind='hf' needs model.path", "--config.model.path=")),
    Row("exact-max-n", "shapley", ("--config.shapley.exact_max_n=-1",), ("config shapley.exact_max_n", "got -1")),
    Row("max-new-tokens", "eval", ("--config.eval.max_new_tokens=0",), ("config eval.max_new_tokens", "got 0")),
    Row("repetition-penalty", "rl", ("--config.sampling.repetition_penalty=0.0",),
        ("config sampling.repetition_penalty must be > 0",)),
    Row("optimizer", "rl", ("--config.grpo.optimizer=sgd",), ("config grpo.optimizer", "'adam'", "'sgd'")),
    Row("timeout", "eval", ("--config.backend.timeout_s=0.0",), ("config backend.timeout_s must be > 0",)),
    Row("decay", "rl", ("--config.mcts.decay=1.5",), ("config mcts.decay must be in [0, 1], got 1.5",)),
    Row("mcts-policy", "mcts", ("--config.mcts.policy=uct",),
        ("config mcts.policy must be one of 'gumbel_muzero', 'muzero', 'paper_uct', got 'uct'",)),
    Row("mcts-expansion", "mcts", ("--config.mcts.expansion=greedy",), ("config mcts.expansion", "'lazy'", "'greedy'")),
    Row("mcts-batch-trees", "mcts", ("--config.mcts.batch_trees=0",), ("config mcts.batch_trees", "got 0")),
    Row("max-to-keep", "rl", ("--config.ckpt.max_to_keep=0",), ("config ckpt.max_to_keep", "got 0")),
    Row("dtype", "eval", ("--config.model.dtype=float64",), ("config model.dtype", "'bfloat16'", "'float64'")),
    Row("budget-minus-5", "shapley", ("--config.shapley.budget=-5",), ("config shapley.budget must be", "got -5")),
    Row("per-fact-budget-0", "shapley", ("--config.shapley.budget_per_fact=0",),
        ("config shapley.budget_per_fact must be an integer >= 1, got 0",)),
    Row("shapley-batch-0", "shapley", ("--config.shapley.batch_size=0",), ("config shapley.batch_size", "got 0")),
    Row("max-questions", "eval", ("--config.consult.max_questions=-1",), ("config consult.max_questions", "got -1")),
    Row("threshold", "eval", ("--config.patient.threshold=-1",), ("config patient.threshold must be in [0, 1]",)),
    Row("weighting", "rl", ("--config.shapley.weighting=bogus",), ("config shapley.weighting", "'uniform'")),
    Row("sig-mode", "rl", ("--config.shapley.sig_mode=bogus",), ("config shapley.sig_mode", "'paper'")),
    Row("grpo-reward", "rl", ("--config.grpo.reward=bogus",), ("config grpo.reward", "'trajectory'")),
    Row("grpo-advantage", "rl", ("--config.grpo.advantage=bogus",), ("config grpo.advantage", "'group_std'")),
    Row("kl-estimator", "rl", ("--config.grpo.kl_estimator=k9",), ("config grpo.kl_estimator", "'k3'")),
    Row("loss-aggregation", "rl", ("--config.grpo.loss_aggregation=bogus",), ("config grpo.loss_aggregation",)),
    Row("eval-batch-0", "eval", ("--config.eval.batch_size=0",), ("config eval.batch_size", "got 0")),
    Row("eval-batch-minus-1", "eval", ("--config.eval.batch_size=-1",), ("config eval.batch_size", "got -1")),
    Row("eval-modes", "eval", ("--config.eval.modes=('reactive','bogus')",), ("config eval.modes", "'proactive'")),
    Row("eval-modes-empty", "eval", ("--config.eval.modes=()",), ("config eval.modes must be a non-empty tuple",)),
    Row("eval-run-escape", "eval", ("--config.eval.run=../../escape",),
        ("config eval.run must name a folder inside the workdir", "'../../escape'")),
    Row("eval-run-absolute", "eval", ("--config.eval.run={tmp}/abs",), ("config eval.run must name a folder inside",)),
    Row("eval-run-empty", "eval", ("--config.eval.run=",), ("config eval.run must be a non-empty string",)),
    Row("mesh-names", "shapley", ("--config.mesh.axis_names=('bogus',)",), ("config mesh.axis_names", "'data'")),
    Row("mesh-lengths", "shapley", ("--config.mesh.shape=(2,4)",), ("config mesh.shape must have one size per name",)),
    Row("mesh-devices", "shapley", ("--config.mesh.shape=(64,)",), ("config mesh.shape needs 64 devices",)),
    Row("min-max-permutations", "shapley", ("--config.shapley.max_permutations=2",),
        ("config shapley.max_permutations", "shapley.min_permutations=3")),
    Row("lora-dropout", "rl", ("--config.model.lora_dropout=1.0",), ("config model.lora_dropout must be in [0, 1)",)),
    Row("lora-targets", "rl", ("--config.model.lora_targets=('q_proj','x_proj')",), ("config model.lora_targets",)),
    Row("heads", "eval", ("--config.model.tiny.num_heads=3",), ("config model.tiny.num_heads", "num_kv_heads=2")),
    Row("top-p", "eval", ("--config.sampling.top_p=0.0",), ("config sampling.top_p must be in (0, 1]",)),
    Row("temperature", "eval", ("--config.eval.temperature=-0.5",), ("config eval.temperature", "got -0.5")),
    Row("seed", "shapley", ("--config.shapley.seed=-1",), ("config shapley.seed must be an integer >= 0",)),
    Row("base-url", "eval", ("--config.backend.base_url=ftp://x",), ("config backend.base_url", "'ftp://x'")),
    Row("data-kind", "eval", ("--config.data.kind=bogus",), ("config data.kind must be one of",)),
    Row("data-no-paths", "eval", ("--config.data.kind=files",), ("config data.kind='files' but data.paths is empty",)),
    Row("unknown-mode", "eval", ("--config.mode=train",), ("unknown config.mode 'train'",)),
    Row("typo", "rl", ("--config.grpo.nmu_generations=4",), ("unknown config field 'nmu_generations'",)),
    Row("wrong-type", "rl", ("--config.grpo.num_generations=four",), ("--config.grpo.num_generations=four",)),
    Row("model-path-missing", "eval", (*HF[:1], "--config.model.path={tmp}/nope"),
        ("config model.path", "nope", "no such file or folder")),
    Row("model-path-not-gguf", "eval", ("--config.model.kind=gguf", "--config.model.path={tmp}/m.txt"),
        ("config model.path must be a .gguf file",), _write("m.txt", "x")),
    Row("gguf-empty", "eval", ("--config.model.kind=gguf", "--config.model.path={tmp}/m.gguf"),
        ("config model.path", "m.gguf", "is an empty file"), _write("m.gguf", b"")),
]
# Rows whose config file is a preset: (name, config file with preset).
PRESET_CONFIGS = {"qwen7b-no-path": "eval.py:qwen7b", "llama8b-no-path": "shapley.py:llama8b"}

WORKDIR_ROWS = [
    Row("workdir-is-a-file", "eval", ("--workdir={tmp}/wd",), ("workdir", "wd is a file, not a folder"),
        _write("wd", "x")),
    Row("workdir-parent-is-a-file", "eval", ("--workdir={tmp}/f/wd",), ("workdir", "f is a file, not a folder"),
        _write("f", "x")),
]

DATA_ROWS = [
    Row("data-missing", "eval", (*DATA, FILE), ("case file not found", "cases.jsonl")),
    Row("data-broken-json", "eval", (*DATA, FILE), ("cases.jsonl line 1", "broken JSON"), _write("cases.jsonl", "{x\n")),
    Row("data-missing-field", "eval", (*DATA, FILE), ("cases.jsonl line 1 (id 7)", "'question'", "missing"),
        _write("cases.jsonl", _line({k: v for k, v in CASE.items() if k != "question"}))),
    Row("data-one-option", "eval", (*DATA, FILE), ("cases.jsonl line 1 (id 7)", "'options'"),
        _write("cases.jsonl", _line({**CASE, "options": {"B": "Ceftriaxone"}}))),
    Row("data-nested-line", "eval", (*DATA, FILE), ("cases.jsonl line 1", "nested too deep"),
        _write("cases.jsonl", '{"id": 1, "options": ' + DEEP + "}\n")),
    Row("data-nested-array", "eval", (*DATA, "--config.data.paths=('{tmp}/cases.json',)"),
        ("cases.json", "nested too deep"), _write("cases.json", "[" + DEEP + "]")),
    Row("data-not-utf8", "eval", (*DATA, FILE), ("cases.jsonl line 1", "not UTF-8"),
        _write("cases.jsonl", b'{"id": "\xff"}\n')),
    Row("data-surrogate-id", "eval", (*DATA, FILE), ("cases.jsonl line 2", "field 'id'", "lone surrogate"),
        _write("cases.jsonl", _line(CASE) + _line({**CASE, "id": "x\ud800"}))),
    Row("data-surrogate-fact", "eval", (*DATA, FILE), ("line 1 (id 7)", "field 'atomic_facts[1]'", "lone surrogate"),
        _write("cases.jsonl", _line({**CASE, "atomic_facts": ["a", "b\udc00"]}))),
    Row("data-no-valid-case", "eval", (DATA[1], "--config.data.on_error=skip", FILE),
        ("config data: no case selected from cases.jsonl",),
        _write("cases.jsonl", _line({k: v for k, v in CASE.items() if k != "question"}))),
    Row("data-number", "eval", (*DATA, FILE), ("cases.jsonl", "neither a JSON array nor JSON lines"),
        _write("cases.jsonl", "3\n")),
]

CACHE_ROWS = [
    Row("cache-list", "shapley", ONE_CASE, ("synthetic.jsonl: line 1 is a JSON list, not an object",),
        _write(SHAPLEY_CACHE, "[1, 2]\n")),
    Row("cache-string", "shapley", ONE_CASE, ("synthetic.jsonl: line 1 is a JSON str, not an object",),
        _write(SHAPLEY_CACHE, '"phi"\n')),
    Row("cache-garbage-last-line", "shapley", ONE_CASE, ("synthetic.jsonl: line 1 is not valid JSON",),
        _write(SHAPLEY_CACHE, "{garbage\n")),
    Row("cache-nested", "shapley", ONE_CASE, ("synthetic.jsonl: line 1 is JSON nested too deep",),
        _write(SHAPLEY_CACHE, DEEP + "\n")),
    Row("eval-results-without-provenance", "eval", (*ONE_CASE, "--config.eval.modes=('reactive',)"),
        ("eval/default holds results but no run.json",), _write("wd/eval/default/reactive.jsonl", "3\n")),
]

def _tiny_hf_folder_without_tokenizer(tmp: pathlib.Path) -> None:
    from promed_jax.models.checkpoints import save_hf
    from promed_jax.models.loader import load_model

    model, _ = load_model(base.get_config().model)
    save_hf(model, tmp / "ckpt")


CHECKPOINT_ROWS = [
    Row("pickle-file", "eval", ("--config.model.kind=hf", "--config.model.path={tmp}/pytorch_model.bin"),
        ("pytorch_model.bin", "pickle checkpoints are refused"), _write("pytorch_model.bin", b"\x80\x04K\x01.")),
    Row("pickle-folder", "eval", HF, ("ckpt", "pytorch_model.bin", "refused"),
        _all(_write("ckpt/config.json", json.dumps(TINY_HF_CONFIG)), _write("ckpt/pytorch_model.bin", b"\x80."))),
    Row("no-config-json", "eval", HF, ("ckpt: no config.json",), _write("ckpt/model.safetensors", b"")),
    Row("unsupported-architecture", "eval", HF, ("ckpt/config.json", "gpt2"),
        _write("ckpt/config.json", json.dumps({**TINY_HF_CONFIG, "model_type": "gpt2"}))),
    Row("no-tokenizer", "eval", HF, ("ckpt: no tokenizer could be loaded from the folder",),
        _tiny_hf_folder_without_tokenizer),
    Row("broken-safetensors", "eval", HF, ("model.safetensors: not a valid safetensors file",),
        _all(_write("ckpt/config.json", json.dumps(TINY_HF_CONFIG)),
             _write("ckpt/model.safetensors", _safetensors(b"notjs")))),
]

ROWS = CONFIG_ROWS + WORKDIR_ROWS + DATA_ROWS + CACHE_ROWS + CHECKPOINT_ROWS


def _argv(row: Row, tmp: pathlib.Path) -> list[str]:
    config = REPO / "configs" / PRESET_CONFIGS.get(row.name, f"{row.config}.py:tiny")
    args = [f"--config={config}", f"--workdir={tmp}/wd", *row.overrides]
    return [arg.format(tmp=tmp) for arg in args]


def _workdir(argv: list[str]) -> pathlib.Path:
    return pathlib.Path([a for a in argv if a.startswith("--workdir=")][-1].removeprefix("--workdir="))


def _snapshot(folder: pathlib.Path) -> dict[str, bytes]:
    if not folder.is_dir():
        return {}
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_one_error_line(rc: int, stderr: str, row: Row) -> None:
    assert rc == main.EXIT_BAD_INPUT, stderr[-2000:]
    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr[-2000:]
    for part in row.expect:
        assert part in errors[0], (part, errors[0])


def assert_nothing_half_written(before: dict[str, bytes], after: dict[str, bytes]) -> None:
    """Files the row wrote first are unchanged; new ones are complete (not empty, no temporaries, whole
    JSON lines)."""
    for name, data in before.items():
        assert after.get(name) == data, f"{name} changed"
    for name, data in after.items():
        if name in before:
            continue
        assert data and ".tmp" not in name, f"{name} left half-written"
        if name.endswith(".jsonl"):
            assert data.endswith(b"\n") and all(json.loads(line) for line in data.splitlines()), name


def _stage_must_not_start(*args, **kwargs):
    raise AssertionError("a config or workdir error must be refused before the stage reads data or loads a model")


@pytest.mark.parametrize("row", ROWS, ids=[row.name for row in ROWS])
def test_malformed_input_is_one_error_line(row, tmp_path, capsys, monkeypatch):
    if row.files:
        row.files(tmp_path)
    if row in CONFIG_ROWS + WORKDIR_ROWS:
        monkeypatch.setattr(main, "run_stage", _stage_must_not_start)
        monkeypatch.setattr(main, "run_pipeline", _stage_must_not_start)
    argv = _argv(row, tmp_path)
    workdir = _workdir(argv)
    before = _snapshot(workdir)
    rc = main.main(["promed_jax.main", *argv])
    assert_one_error_line(rc, capsys.readouterr().err, row)
    assert_nothing_half_written(before, _snapshot(workdir))


def test_the_table_is_large_enough():
    assert len(ROWS) >= 40 and len({row.name for row in ROWS}) == len(ROWS)


def test_a_lone_surrogate_in_a_record_written_by_a_stage_is_one_line_and_leaves_whole_records(tmp_path, capsys,
                                                                                           monkeypatch):
    """A record that reaches the writer with a lone surrogate (the loader refuses them in data files; here the
    stage's record builder is made to produce one) is refused whole: the earlier record stays, nothing torn."""
    from promed_jax.evaluation import evaluate

    real = evaluate.record
    monkeypatch.setattr(evaluate, "record", lambda d, **kw: {**real(d, **kw), "end": f"{d.case.id}\ud800"})
    row = Row("surrogate-record", "eval", ("--config.data.synthetic_n=1", "--config.eval.modes=('reactive',)"),
              ("reactive.jsonl: record 'synthetic:0'", "field 'end' holds a lone surrogate"))
    rc = main.main(["promed_jax.main", *_argv(row, tmp_path)])
    assert_one_error_line(rc, capsys.readouterr().err, row)
    # the run's provenance and its lock, but no results file: no record was written
    assert sorted(_snapshot(tmp_path / "wd")) == ["eval/default.lock", "eval/default/run.json"]


SUBPROCESS_ROWS = ("tau-0", "workdir-is-a-file", "cache-list")


@pytest.mark.parametrize("name", SUBPROCESS_ROWS)
def test_malformed_input_through_the_command_line(name, tmp_path):
    row = next(row for row in ROWS if row.name == name)
    if row.files:
        row.files(tmp_path)
    argv = _argv(row, tmp_path)
    before = _snapshot(_workdir(argv))
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    result = subprocess.run(
        [sys.executable, "-m", "promed_jax.main", *argv], cwd=REPO, env=env, capture_output=True, text=True,
        timeout=300, check=False,
    )
    assert_one_error_line(result.returncode, result.stderr, row)
    assert_nothing_half_written(before, _snapshot(_workdir(argv)))


def test_an_unexpected_exception_keeps_its_traceback(tmp_path, monkeypatch):
    def broken(config, workdir):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(main, "resolve_stage", lambda mode: broken)
    with pytest.raises(ZeroDivisionError, match="a bug"):
        main.main(["promed_jax.main", f"--config={REPO}/configs/eval.py:tiny", "--config.mode=data",
                   f"--workdir={tmp_path}"])


def test_every_config_field_has_a_rule():
    def leaves(config, prefix=""):
        for key, value in config.items():
            if hasattr(value, "items"):
                yield from leaves(value, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}"

    fields = {f for f in leaves(base.get_config()) if f.split(".")[0] not in config_check.SECTIONS_CHECKED_ELSEWHERE}
    assert fields - set(config_check.RULES) == set()
    assert set(config_check.RULES) - fields == set()


@pytest.mark.parametrize("preset", base.PRESETS)
@pytest.mark.parametrize("stage", ("shapley", "mcts", "sft", "rl", "eval"))
def test_the_shipped_configs_pass_the_field_rules(stage, preset):
    from experiments import sweep

    config = sweep.load_config_module(str(REPO / "configs" / f"{stage}.py")).get_config(preset)
    config_check.check_fields(config)
    config_check.check_shapley(config.shapley)
    config_check.check_mesh(config.mesh)


# A run of the entry point that stops after taking its lock, until the file named first exists: the second run
# then meets a lock that is certainly held, without any timing.
_GATED_RUN = """
import pathlib, sys, time
from promed_jax import main
from promed_jax.data import synthetic

make_cases = synthetic.make_cases


def gated(*args, **kwargs):
    go, deadline = pathlib.Path(sys.argv[1]), time.monotonic() + 300
    while not go.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    return make_cases(*args, **kwargs)


synthetic.make_cases = gated
sys.exit(main.main(["promed_jax.main", *sys.argv[2:]]))
"""


def test_two_runs_on_one_workdir_the_second_fails_at_once_naming_the_first(tmp_path, capsys):
    argv = [f"--config={REPO}/configs/shapley.py:tiny", "--config.data.synthetic_n=2", f"--workdir={tmp_path}/wd"]
    go, lock = tmp_path / "go", tmp_path / "wd" / "shapley.lock"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "", "PYTHONPATH": str(REPO)}
    first = subprocess.Popen([sys.executable, "-c", _GATED_RUN, str(go), *argv], cwd=REPO, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        while not (lock.exists() and lock.read_text() == f"{first.pid}\n"):
            assert first.poll() is None, first.communicate()
            time.sleep(0.05)
        row = Row("second-run", "shapley", (), (f"shapley is in use by another run (pid {first.pid}",))
        assert_one_error_line(main.main(["promed_jax.main", *argv]), capsys.readouterr().err, row)
        go.touch()
        _, stderr = first.communicate(timeout=300)
    finally:
        first.kill()
    assert first.returncode == 0, stderr[-3000:]
    lines = (tmp_path / "wd" / "shapley" / "synthetic.jsonl").read_text().splitlines()
    assert sorted(json.loads(line)["id"] for line in lines) == ["synthetic:0", "synthetic:1"]
    assert main.main(["promed_jax.main", *argv]) == 0  # the lock went with the first run
