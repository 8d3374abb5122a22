"""Every config field checked when a run starts, before any data or model loads: ranges and registered names.

`check_run(config, workdir)` raises the first problem it finds as one `ConfigError` naming the key
(`config shapley.tau must be > 0, got 0.0`), or a `WorkdirError` for a workdir that cannot hold outputs.
`RULES` holds one rule per field of `configs/base.py` (a test keeps it complete); rules that tie two fields
together, the names registered by the code, and output paths inside the workdir are checked after it. The
`data` section is checked by its owner, `data.sources.check_data_config`.
"""

from __future__ import annotations

import importlib
import math
import pathlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from promed_jax import registry
from promed_jax.errors import ConfigError, WorkdirError

# A rule returns what the value fails to be ("must be > 0"), or None when it is fine.
Rule = Callable[[Any], str | None]

OPTIMIZERS = ("adam", "adamw")
WEIGHTINGS = ("shapley", "uniform")  # shapley.cache.load_weights
SIG_MODES = ("exact", "paper")  # promed.md §2
DTYPES = ("float32", "bfloat16")
SFT_SOURCES = ("naive", "topic", "files")  # promed_jax.training.run.SOURCES


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def at_least(low: float, *, integer: bool = False) -> Rule:
    kind = "an integer" if integer else "a number"

    def rule(value: Any) -> str | None:
        ok = _number(value) and (isinstance(value, int) or not integer) and value >= low
        return None if ok else f"must be {kind} >= {low}"

    return rule


def above(low: float) -> Rule:
    return lambda value: None if _number(value) and value > low else f"must be > {low}"


def within(low: float, high: float, *, high_open: bool = False) -> Rule:
    bracket = ")" if high_open else "]"

    def rule(value: Any) -> str | None:
        ok = _number(value) and low <= value and (value < high if high_open else value <= high)
        return None if ok else f"must be in [{low}, {high}{bracket}"

    return rule


def above_at_most(low: float, high: float) -> Rule:
    return lambda value: None if _number(value) and low < value <= high else f"must be in ({low}, {high}]"


def one_of(names: Sequence[str]) -> Rule:
    shown = ", ".join(repr(n) for n in names)
    return lambda value: None if value in names else f"must be one of {shown}"


def registered(kind: str, module: str) -> Rule:
    """A name registered under `kind` once `module` (which registers them) is imported."""

    def rule(value: Any) -> str | None:
        importlib.import_module(module)
        return one_of(registry.names(kind))(value)

    return rule


def names_among(names: Sequence[str], *, allow_empty: bool = False) -> Rule:
    """A tuple of distinct names, each among `names`."""
    shown = ", ".join(repr(n) for n in names)

    def rule(value: Any) -> str | None:
        ok = isinstance(value, tuple | list) and all(v in names for v in value) and len(set(value)) == len(value)
        if ok and (value or allow_empty):
            return None
        return f"must be {'a' if allow_empty else 'a non-empty'} tuple of distinct names among {shown}"

    return rule


def non_empty_tuple(value: Any) -> str | None:
    return None if isinstance(value, tuple | list) and value else "must be a non-empty tuple"


def text(value: Any) -> str | None:
    return None if isinstance(value, str) and value.strip() else "must be a non-empty string"


def any_text(value: Any) -> str | None:
    return None if isinstance(value, str) else "must be a string"


def boolean(value: Any) -> str | None:
    return None if isinstance(value, bool) else "must be True or False"


def finite(value: Any) -> str | None:
    return None if _number(value) else "must be a finite number"


def positive_ints(value: Any) -> str | None:
    ok = isinstance(value, tuple | list) and all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value
    )
    return None if ok else "must be a tuple of integers >= 1"


def strings(value: Any) -> str | None:
    ok = isinstance(value, tuple | list) and all(isinstance(v, str) and v.strip() for v in value)
    return None if ok else "must be a tuple of non-empty strings"


def http_url(value: Any) -> str | None:
    ok = isinstance(value, str) and value.startswith(("http://", "https://"))
    return None if ok else "must be an http:// or https:// URL"


def _model_kinds() -> tuple[str, ...]:
    from promed_jax.models.loader import KINDS

    return KINDS


def _eval_modes() -> tuple[str, ...]:
    from promed_jax.evaluation.evaluate import EVAL_MODES

    return EVAL_MODES


def _lora_targets() -> tuple[str, ...]:
    from promed_jax.models.config import LORA_TARGETS

    return LORA_TARGETS


def _mcts_names(name: str) -> tuple[str, ...]:
    from promed_jax.mcts import environment

    return getattr(environment, name)


def lazy(make: Callable[[], Rule]) -> Rule:
    """A rule built on first use (its names live in a module that is slow to import)."""
    return lambda value: make()(value)


POSITIVE_INT = at_least(1, integer=True)
COUNT = at_least(0, integer=True)
SEED = at_least(0, integer=True)
NONNEGATIVE = at_least(0)
POSITIVE = above(0)
TEMPERATURE = at_least(0)

RULES: Mapping[str, Rule] = {
    "mode": text,
    "model.kind": lazy(lambda: one_of(_model_kinds())),
    "model.path": any_text,
    "model.dtype": one_of(DTYPES),
    "model.param_dtype": one_of(DTYPES),
    "model.remat": boolean,
    "model.seed": SEED,
    "model.lora_rank": COUNT,
    "model.lora_alpha": POSITIVE,
    "model.lora_dropout": within(0, 1, high_open=True),
    "model.lora_targets": lazy(lambda: names_among(_lora_targets())),
    "model.tiny.hidden_size": POSITIVE_INT,
    "model.tiny.intermediate_size": POSITIVE_INT,
    "model.tiny.num_layers": POSITIVE_INT,
    "model.tiny.num_heads": POSITIVE_INT,
    "model.tiny.num_kv_heads": POSITIVE_INT,
    "model.tiny.head_dim": POSITIVE_INT,
    "model.tiny.max_position_embeddings": POSITIVE_INT,
    "consult.max_questions": COUNT,
    "patient.kind": registered("patient", "promed_jax.consult.patients"),
    "patient.temperature": TEMPERATURE,
    "patient.max_tokens": POSITIVE_INT,
    "patient.threshold": within(0, 1),
    "patient.max_facts": POSITIVE_INT,
    "patient.contrast_weight": NONNEGATIVE,
    "patient.hub_weight": NONNEGATIVE,
    "patient.lexical_weight": NONNEGATIVE,
    "patient.semantic_threshold": within(-2, 4),
    "patient.margin": NONNEGATIVE,
    "patient.zh_threshold": within(0, 1),
    "backend.base_url": http_url,
    "backend.model": text,
    "backend.api_key_env": text,
    "backend.temperature": TEMPERATURE,
    "backend.timeout_s": POSITIVE,
    "backend.max_retries": COUNT,
    "shapley.estimator": registered("shapley_estimator", "promed_jax.shapley.estimators"),
    "shapley.exact_max_n": COUNT,
    "shapley.budget": COUNT,
    "shapley.budget_per_fact": POSITIVE_INT,
    "shapley.min_permutations": POSITIVE_INT,
    "shapley.max_permutations": POSITIVE_INT,
    "shapley.truncation_tol": NONNEGATIVE,
    "shapley.convergence_tol": NONNEGATIVE,
    "shapley.batch_permutations": POSITIVE_INT,
    "shapley.tau": POSITIVE,
    "shapley.weighting": one_of(WEIGHTINGS),
    "shapley.sig_mode": one_of(SIG_MODES),
    "shapley.max_cache_bytes": POSITIVE_INT,  # the game refuses one too small for a forward, naming the key
    "shapley.max_executables": COUNT,  # 0: drop them before every case
    "shapley.max_case_coalitions": at_least(4, integer=True),  # kernel_shap's endpoints and one pair
    "shapley.max_case_tokens": POSITIVE_INT,
    "shapley.batch_size": POSITIVE_INT,
    "shapley.seed": SEED,
    "shapley.plot": boolean,
    "sampling.temperature": TEMPERATURE,
    "sampling.top_p": above_at_most(0, 1),
    "sampling.top_k": COUNT,
    "sampling.max_new_tokens": POSITIVE_INT,
    "sampling.repetition_penalty": POSITIVE,
    "sampling.no_repeat_ngram_size": COUNT,
    "sampling.max_dialogue_tokens": POSITIVE_INT,
    "sampling.seed": SEED,
    "mcts.iterations": POSITIVE_INT,
    "mcts.c_uct": NONNEGATIVE,
    "mcts.max_children": POSITIVE_INT,
    "mcts.decay": within(0, 1),
    "mcts.temperature": TEMPERATURE,
    "mcts.correct_bonus": finite,
    "mcts.use_correct_bonus": boolean,
    "mcts.policy": registered("mcts_policy", "promed_jax.mcts.search"),
    "mcts.expansion": lazy(lambda: one_of(_mcts_names("EXPANSIONS"))),
    "mcts.leaf_value": lazy(lambda: one_of(_mcts_names("LEAF_VALUES"))),
    "mcts.batch_trees": POSITIVE_INT,
    "mcts.max_state_bytes": POSITIVE_INT,
    "mcts.seed": SEED,
    "mcts.top_k": COUNT,
    "mcts.min_reward": finite,
    "mcts.require_correct": boolean,
    "sft.learning_rate": POSITIVE,
    "sft.batch_size": POSITIVE_INT,
    "sft.grad_accum": POSITIVE_INT,  # divides sft.batch_size (check_sft)
    "sft.epochs": POSITIVE_INT,
    "sft.max_tokens": POSITIVE_INT,
    "sft.buckets": positive_ints,
    "sft.warmup_steps": COUNT,
    "sft.final_lr_fraction": within(0, 1),
    "sft.weight_decay": NONNEGATIVE,
    "sft.max_grad_norm": NONNEGATIVE,
    "sft.vocab_chunk": POSITIVE_INT,
    "sft.eval_fraction": within(0, 1, high_open=True),
    "sft.eval_every": POSITIVE_INT,
    "sft.source": one_of(SFT_SOURCES),
    "sft.dialogues": strings,  # non-empty with sft.source='files' (check_sft)
    "sft.naive_max_questions": COUNT,
    "sft.seed": SEED,
    "grpo.num_generations": POSITIVE_INT,
    "grpo.batch_cases": POSITIVE_INT,
    "grpo.steps": COUNT,
    "grpo.alpha": finite,
    "grpo.beta": finite,
    "grpo.gamma": finite,
    "grpo.format_reward_start": finite,
    "grpo.format_reward_contains": finite,
    "grpo.clip_eps": above_at_most(0, 1),  # the ratio's lower bound 1 - eps stays >= 0
    "grpo.clip_eps_high": NONNEGATIVE,  # 0: the same as grpo.clip_eps
    "grpo.log_ratio_clamp": POSITIVE,
    "grpo.kl_beta": NONNEGATIVE,
    "grpo.kl_estimator": registered("rl.kl", "promed_jax.rl"),
    "grpo.learning_rate": POSITIVE,
    "grpo.optimizer": one_of(OPTIMIZERS),
    "grpo.updates_per_batch": POSITIVE_INT,
    "grpo.advantage": registered("rl.advantage", "promed_jax.rl"),
    "grpo.reward": registered("rl.reward", "promed_jax.rl"),
    "grpo.trajectory_correct_reward": finite,
    "grpo.trajectory_sig_scale": finite,
    "grpo.loss_aggregation": registered("rl.aggregation", "promed_jax.rl"),
    "grpo.loss_norm_tokens": POSITIVE_INT,
    "grpo.init_checkpoint": any_text,  # resolved when the stage starts (it may be the pipeline's Stage 1 output)
    "grpo.minibatches": POSITIVE_INT,  # with grad_accum, divides batch_cases x num_generations (check_grpo)
    "grpo.grad_accum": POSITIVE_INT,
    "grpo.vocab_chunk": POSITIVE_INT,
    "grpo.max_grad_norm": NONNEGATIVE,
    "grpo.weight_decay": NONNEGATIVE,
    "grpo.eval_every": COUNT,
    "grpo.eval_cases": COUNT,
    "grpo.eval_split": one_of(("train", "dev", "test")),
    "grpo.seed": SEED,
    "mesh.shape": non_empty_tuple,
    "mesh.axis_names": non_empty_tuple,
    "ckpt.every_steps": POSITIVE_INT,
    "ckpt.max_to_keep": POSITIVE_INT,
    "ckpt.resume": boolean,
    "eval.modes": lazy(lambda: names_among(_eval_modes())),
    "eval.run": text,
    "eval.batch_size": POSITIVE_INT,
    "eval.temperature": TEMPERATURE,
    "eval.max_new_tokens": POSITIVE_INT,
    "eval.repetition_penalty": POSITIVE,
    "eval.no_repeat_ngram_size": COUNT,
    "eval.seed": SEED,
}
# The warm start's section has the SFT section's fields (and their rules) plus its tokenizer's size.
RULES = {
    **RULES,
    **{f"warm_start.{key[4:]}": rule for key, rule in RULES.items() if key.startswith("sft.")},
    "warm_start.vocab_size": at_least(260, integer=True),  # the byte alphabet and the special tokens
    "warm_start.cases": COUNT,
    "preset": one_of(("tiny", "smollm", "qwen7b", "llama8b")),
    "pipeline.init_checkpoint": any_text,
    "pipeline.eval_cases": POSITIVE_INT,
    "pipeline.eval_seed": SEED,
    "pipeline.stage1": boolean,
    "pipeline.share_dir": any_text,
}
SECTIONS_CHECKED_ELSEWHERE = ("data",)


def _get(config: Mapping[str, Any], key: str) -> Any:
    for part in key.split("."):
        config = config[part]
    return config


def _fail(key: str, requirement: str, value: Any) -> ConfigError:
    return ConfigError(f"config {key} {requirement}, got {value!r}")


def check_fields(config: Mapping[str, Any]) -> None:
    """Each field of `RULES` present in `config` against its rule; raises the first failure."""
    for key, rule in RULES.items():
        try:
            value = _get(config, key)
        except (KeyError, AttributeError):
            continue  # a stage config may leave a section out
        requirement = rule(value)
        if requirement:
            raise _fail(key, requirement, value)


def check_model(model: Mapping[str, Any]) -> None:
    """What the loader needs: a path for `hf`, a `.gguf` file for `gguf`, heads that divide the tiny model."""
    path = model["path"]
    if model["kind"] == "hf" and not path:
        raise ConfigError(
            "config model.kind='hf' needs model.path (a local Hugging Face folder); "
            "set --config.model.path=/path/to/the/checkpoint"
        )
    if path and not pathlib.Path(path).expanduser().exists():
        raise ConfigError(f"config model.path {path!r}: no such file or folder")
    if path and pathlib.Path(path).expanduser().is_file() and not pathlib.Path(path).expanduser().stat().st_size:
        raise ConfigError(f"config model.path {path!r} is an empty file")
    if model["kind"] == "gguf" and path and pathlib.Path(path).suffix != ".gguf":
        raise _fail("model.path", "must be a .gguf file when model.kind='gguf'", path)
    tiny = model["tiny"]
    if tiny["num_heads"] % tiny["num_kv_heads"]:
        raise _fail("model.tiny.num_heads", f"must be a multiple of model.tiny.num_kv_heads={tiny['num_kv_heads']}",
                    tiny["num_heads"])
    if tiny["head_dim"] % 2:
        raise _fail("model.tiny.head_dim", "must be even (rotary embeddings)", tiny["head_dim"])


def check_shapley(shapley: Mapping[str, Any]) -> None:
    if shapley["max_permutations"] < shapley["min_permutations"]:
        raise _fail("shapley.max_permutations", f">= shapley.min_permutations={shapley['min_permutations']} is "
                    "needed", shapley["max_permutations"])


def check_grpo(grpo: Mapping[str, Any]) -> None:
    rows = grpo["batch_cases"] * grpo["num_generations"]
    parts = grpo["minibatches"] * grpo["grad_accum"]
    if rows % parts:
        raise _fail(
            "grpo.minibatches",
            f"x grpo.grad_accum={grpo['grad_accum']} must divide grpo.batch_cases x grpo.num_generations = {rows}",
            grpo["minibatches"],
        )


def check_sft(sft: Mapping[str, Any], *, section: str = "sft") -> None:
    """The SFT section (or the warm start's, `section`, which has its fields)."""
    s = section
    if sft["batch_size"] % sft["grad_accum"]:
        raise _fail(f"{s}.batch_size", f"must be a multiple of {s}.grad_accum={sft['grad_accum']}", sft["batch_size"])
    if sft["source"] == "files" and not sft["dialogues"]:
        raise ConfigError(f"config {s}.source='files' needs {s}.dialogues (dialogue files of the export schema)")
    for path in sft["dialogues"] if sft["source"] == "files" else ():
        if not pathlib.Path(path).expanduser().is_file():
            raise ConfigError(f"config {s}.dialogues: no such file {path!r}")


def check_sft_source(sft: Mapping[str, Any], data: Mapping[str, Any], *, section: str = "sft") -> None:
    """The topic doctor asks about real cases' facts: it needs case files (the naive doctor plays the clinic)."""
    if sft["source"] == "topic" and data["kind"] != "files":
        raise ConfigError(
            f"config {section}.source='topic' needs data.kind='files' (real cases), got "
            f"data.kind={data['kind']!r}; use {section}.source='naive' for the synthetic clinic"
        )


def check_eval_modes(ev: Mapping[str, Any], data: Mapping[str, Any]) -> None:
    """The random-N doctor asks about the synthetic clinic's table: it needs the clinic."""
    if "random" in ev["modes"] and data["kind"] != "synthetic":
        raise ConfigError(
            f"config eval.modes: 'random' (the random-N doctor) asks about the synthetic clinic's findings and "
            f"needs data.kind='synthetic', got data.kind={data['kind']!r}"
        )


def check_mesh(mesh: Mapping[str, Any]) -> None:
    """Sizes and names a mesh can be built from (`sharding.make_mesh`), on this process's devices."""
    import jax

    from promed_jax.sharding import LOGICAL_RULES

    shape, names = tuple(mesh["shape"]), tuple(mesh["axis_names"])
    if len(shape) != len(names):
        raise _fail("mesh.shape", f"must have one size per name in mesh.axis_names={names}", shape)
    if not all(isinstance(s, int) and (s >= 1 or s == -1) for s in shape) or shape.count(-1) > 1:
        raise _fail("mesh.shape", "must hold sizes >= 1 and at most one -1 (the remaining devices)", shape)
    axes = sorted(set(LOGICAL_RULES.values()))
    if any(n not in axes for n in names) or len(set(names)) != len(names):
        raise _fail("mesh.axis_names", f"must be distinct names among {', '.join(map(repr, axes))}", names)
    fixed = math.prod(s for s in shape if s != -1)
    devices = jax.device_count()
    if fixed > devices:
        raise _fail("mesh.shape", f"needs {fixed} devices; {devices} available", shape)


def output_dir(workdir: str | pathlib.Path, *parts: str, key: str) -> pathlib.Path:
    """`workdir/parts...`, which must resolve inside the workdir (a config key names the parts)."""
    root = pathlib.Path(workdir).expanduser().resolve()
    path = root.joinpath(*parts).resolve()
    if path == root or not path.is_relative_to(root):
        raise ConfigError(f"config {key} must name a folder inside the workdir {root}, got {parts[-1]!r}")
    return path


def check_workdir(workdir: str | pathlib.Path) -> None:
    """The workdir, or its nearest existing parent, is a writable folder (it is created on first write)."""
    path = pathlib.Path(workdir).expanduser().absolute()
    if path.exists() and not path.is_dir():
        raise WorkdirError(f"workdir {path} is a file, not a folder")
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        raise WorkdirError(f"workdir {path}: {existing} is a file, not a folder")


def check_run(config: Mapping[str, Any], workdir: str | pathlib.Path) -> None:
    """Everything a run can be refused for before it reads data or loads a model."""
    from promed_jax.data.sources import check_data_config

    check_workdir(workdir)
    check_fields(config)
    check_data_config(config["data"])
    check_model(config["model"])
    check_shapley(config["shapley"])
    check_grpo(config["grpo"])
    check_sft(config["sft"])
    check_sft_source(config["sft"], config["data"])
    if "warm_start" in config:
        check_sft(config["warm_start"], section="warm_start")
        check_sft_source(config["warm_start"], config["data"], section="warm_start")
    check_eval_modes(config["eval"], config["data"])
    check_mesh(config["mesh"])
    output_dir(workdir, "eval", config["eval"]["run"], key="eval.run")
