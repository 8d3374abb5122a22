"""What produced a stage's output, in a `run.json` beside it, compared on every resume (promed.md §6).

A stage output grows over resumed runs: the Shapley cache folder `{workdir}/shapley/` and each evaluation run
`{workdir}/eval/<run>/`. Its `run.json` (written atomically) holds

- `config`: the resolved config fields that determine the results (`STAGE_FIELDS`, below);
- `weights`: a hash of the loaded model parameters (`weights_hash`), so that a trained θ and a random θ of one
  config differ;
- `prompt_version`: the versions of the prompts the stage renders;
- `git_commits`: the commits of the code that wrote into the output ("unknown" outside git; "+dirty" with
  uncommitted changes to tracked files), oldest first.

Resume compares `config`, `weights` and `prompt_version` and refuses any difference with one line naming it. A
new commit is appended, not refused: code changes that change results bump a prompt version or a config field,
and a refusal on every commit would throw away hours of Shapley values for a README edit.

Provenance fields per stage. Left out everywhere, since results do not depend on them: batch sizes and chunking
(`shapley.batch_size`, `eval.batch_size`, memory budgets), plots, `mesh`, `model.remat`, and the data selection
(`data.paths`, `sources`, `ids`, `split`, `split_fractions`, `min_facts`, `max_facts`, `limit`): a record
belongs to one case, whose fingerprint it carries (`Case.fingerprint`), whatever else is selected.
`model.kind`, `path`, `seed` and the tiny sizes are covered by `weights`.

- shapley: `model.dtype`, `model.param_dtype`; the estimator and its options (`shapley.estimator`,
  `exact_max_n`, `budget`, `budget_per_fact`, `min_permutations`, `max_permutations`, `truncation_tol`,
  `convergence_tol`, `batch_permutations`, `seed`), the per-case caps that can replace it
  (`max_case_coalitions`, `max_case_tokens`) and `shapley.tau` (w is stored). Not `shapley.weighting`
  (applied when weights are read) nor `sig_mode` (a reward setting).
- eval: `model.dtype`, `model.param_dtype` and the LoRA settings (`lora_rank`, `lora_alpha`, `lora_targets`:
  α scales trained adapters); `data.initial_info` (what the doctor is told, not in the fingerprint); the protocol
  (`consult.max_questions`); the patient (`patient.*`, `backend.model`, `backend.temperature`); the doctor's
  decoding (`sampling.top_p`, `top_k`, `max_dialogue_tokens`; `eval.temperature`, `max_new_tokens`,
  `repetition_penalty`, `no_repeat_ngram_size`, `seed`).
- sft: model numerics and LoRA settings (rank, alpha, dropout, targets: what is trained); what the naive
  doctor's dialogues depend on (`data.initial_info`, `consult.max_questions`, the fact_select patient's
  `patient.kind`, `threshold`, `max_facts`); every `sft.*` field that changes the trained parameters. Not
  `sft.vocab_chunk` (chunking) nor `sft.eval_every` (when the eval loss is logged); `ckpt.*` and `mesh` change
  where and how often, not what. The weights hash is the model the run starts from.
- mcts: as eval for the model, initial information, protocol and patient; the SIG reading
  (`shapley.weighting`, `sig_mode`; the weights themselves come from the Shapley cache, whose records carry
  their model); the doctor's decoding (`sampling.*` but the seed and temperature, which `mcts.seed` and
  `mcts.temperature` replace); the search (`mcts.*` but the memory budget and the SFT selection, which is
  applied after the search and written with its own settings). `mcts.batch_trees` is in: results do not
  depend on it, but each line's `batch` does.
- rl: model numerics and LoRA settings; the protocol, the patient and the judge; the Shapley weighting and SIG
  mode (the weights themselves are the cache's, checked per case); the rollouts' decoding (`sampling.*` but
  its seed: rollout keys come from `grpo.seed`); every `grpo.*` field but `vocab_chunk` (chunking only); the
  held-out evaluation's decoding (`eval.*` as for eval). The weights hash is the start model's.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib
import re
import subprocess
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from flax import nnx

from promed_jax import assets
from promed_jax.data.cases import Case
from promed_jax.data.sources import REPO_ROOT
from promed_jax.errors import CacheError
from promed_jax.io import atomic_write_json

RUN_FILE = "run.json"
FINGERPRINT = re.compile(r"[0-9a-f]{16}")  # `Case.fingerprint`
_MODEL_NUMERICS = ("model.dtype", "model.param_dtype")
# The consultation every dialogue-producing stage runs: initial information, protocol, and the patient (and
# judge) it talks to.
_CONSULTATION = (
    "data.initial_info",
    "consult.max_questions",
    "patient.kind",
    "patient.temperature",
    "patient.max_tokens",
    "patient.threshold",
    "patient.max_facts",
    "patient.contrast_weight",
    "patient.hub_weight",
    "patient.lexical_weight",
    "patient.semantic_threshold",
    "patient.margin",
    "patient.zh_threshold",
    "backend.model",
    "backend.temperature",
)
# The SIG reading of a dialogue (the weights themselves are the Shapley cache's, whose records carry their model).
_SIG = ("shapley.weighting", "shapley.sig_mode")
# The doctor's sampling in search and rollouts (its seed and, for MCTS, its temperature come from the stage).
_DOCTOR_SAMPLING = (
    "sampling.top_p",
    "sampling.top_k",
    "sampling.max_new_tokens",
    "sampling.repetition_penalty",
    "sampling.no_repeat_ngram_size",
    "sampling.max_dialogue_tokens",
)
# Evaluation's greedy doctor, also run by Stage 2's held-out evaluation.
_EVAL_DECODING = (
    "eval.temperature",
    "eval.max_new_tokens",
    "eval.repetition_penalty",
    "eval.no_repeat_ngram_size",
    "eval.seed",
)
_SFT_FIELDS = (
    "sft.learning_rate",
    "sft.batch_size",
    "sft.grad_accum",
    "sft.epochs",
    "sft.max_tokens",
    "sft.buckets",
    "sft.warmup_steps",
    "sft.final_lr_fraction",
    "sft.weight_decay",
    "sft.max_grad_norm",
    "sft.eval_fraction",
    "sft.source",
    "sft.dialogues",
    "sft.naive_max_questions",
    "sft.seed",
)
_TINY_SIZES = (
    "hidden_size",
    "intermediate_size",
    "num_layers",
    "num_heads",
    "num_kv_heads",
    "head_dim",
    "max_position_embeddings",
)
_TRAINED_MODEL = (
    *_MODEL_NUMERICS,
    "model.lora_rank",
    "model.lora_alpha",
    "model.lora_dropout",
    "model.lora_targets",
    "data.initial_info",
    "consult.max_questions",
    "patient.kind",
    "patient.threshold",
    "patient.max_facts",
)
STAGE_FIELDS: dict[str, tuple[str, ...]] = {
    "shapley": (
        *_MODEL_NUMERICS,
        "shapley.estimator",
        "shapley.exact_max_n",
        "shapley.budget",
        "shapley.budget_per_fact",
        "shapley.min_permutations",
        "shapley.max_permutations",
        "shapley.truncation_tol",
        "shapley.convergence_tol",
        "shapley.batch_permutations",
        "shapley.seed",
        "shapley.tau",
        "shapley.max_case_coalitions",
        "shapley.max_case_tokens",
    ),
    "eval": (
        *_MODEL_NUMERICS,
        "model.lora_rank",
        "model.lora_alpha",
        "model.lora_targets",
        *_CONSULTATION,
        "sampling.top_p",
        "sampling.top_k",
        "sampling.max_dialogue_tokens",
        *_EVAL_DECODING,
    ),
    "sft": (*_TRAINED_MODEL, *_SFT_FIELDS),
    # The warm start's model is a fresh tiny one (model.tiny, seed, the clinic tokenizer's size) or the
    # configured checkpoint (its weights hash), trained on the naive / topic doctor's dialogues of the data.
    "warm_start": (
        *_TRAINED_MODEL,
        "model.seed",
        *(f"model.tiny.{name}" for name in _TINY_SIZES),
        "data.synthetic_n",
        "data.synthetic_seed",
        *(f"warm_start.{key[4:]}" for key in _SFT_FIELDS),
        "warm_start.vocab_size",
        "warm_start.cases",
    ),
    "mcts": (
        *_MODEL_NUMERICS,
        "model.lora_rank",
        "model.lora_alpha",
        "model.lora_targets",
        *_CONSULTATION,
        *_SIG,
        *_DOCTOR_SAMPLING,
        "mcts.policy",
        "mcts.iterations",
        "mcts.c_uct",
        "mcts.max_children",
        "mcts.decay",
        "mcts.temperature",
        "mcts.correct_bonus",
        "mcts.use_correct_bonus",
        "mcts.expansion",
        "mcts.leaf_value",
        "mcts.batch_trees",
        "mcts.seed",
    ),
    "rl": (
        *_MODEL_NUMERICS,
        "model.lora_rank",
        "model.lora_alpha",
        "model.lora_dropout",
        "model.lora_targets",
        *_CONSULTATION,
        *_SIG,
        "sampling.temperature",
        *_DOCTOR_SAMPLING,
        "grpo.num_generations",
        "grpo.batch_cases",
        "grpo.steps",
        "grpo.alpha",
        "grpo.beta",
        "grpo.gamma",
        "grpo.format_reward_start",
        "grpo.format_reward_contains",
        "grpo.clip_eps",
        "grpo.clip_eps_high",
        "grpo.log_ratio_clamp",
        "grpo.kl_beta",
        "grpo.kl_estimator",
        "grpo.learning_rate",
        "grpo.optimizer",
        "grpo.updates_per_batch",
        "grpo.advantage",
        "grpo.reward",
        "grpo.trajectory_correct_reward",
        "grpo.trajectory_sig_scale",
        "grpo.loss_aggregation",
        "grpo.loss_norm_tokens",
        "grpo.init_checkpoint",
        "grpo.minibatches",
        "grpo.grad_accum",
        "grpo.max_grad_norm",
        "grpo.weight_decay",
        "grpo.eval_every",
        "grpo.eval_cases",
        "grpo.eval_split",
        "grpo.seed",
        *_EVAL_DECODING,
    ),
}
_COMPARED = ("stage", "config", "weights", "prompt_version")


@dataclasses.dataclass(frozen=True)
class Provenance:
    """What produced a stage output.

    Attributes:
      stage: 'shapley' or 'eval'.
      config: dotted config key -> its value (JSON types), the fields of `STAGE_FIELDS[stage]`.
      weights: `weights_hash` of the model.
      prompt_version: the stage's prompt versions.
      git_commits: the commits that wrote into the output, oldest first.
    """

    stage: str
    config: Mapping[str, Any]
    weights: str
    prompt_version: str
    git_commits: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "config": dict(self.config), "git_commits": list(self.git_commits)}


def check_fingerprint(path: str | pathlib.Path, case: Case, fingerprint: str, *, hint: str) -> None:
    """A stored record of `case.id` must carry this case's fingerprint, or it is another case's result."""
    if fingerprint != case.fingerprint:
        raise CacheError(
            f"{path}: case {case.id}: the stored fingerprint {fingerprint} is not the configured case's "
            f"{case.fingerprint} (another file's case with this id, or an edited case); {hint}"
        )


def stage_config(config: Mapping[str, Any], stage: str) -> dict[str, Any]:
    """The provenance fields of `stage` from a resolved config, as JSON values (tuples become lists)."""
    out = {}
    for key in STAGE_FIELDS[stage]:
        value: Any = config
        for part in key.split("."):
            value = value[part]
        out[key] = json.loads(json.dumps(value))
    return out


def weights_hash(model: nnx.Module | nnx.State) -> str:
    """`sha256:<16 hex>` of every parameter's path, dtype, shape and bytes, in path order.

    `model` is a module or its state (`nnx.split(model)[1]`, as the coalition game holds it). Only `nnx.Param`
    variables count, so a materialized inference head (a copy) does not change it.
    """
    params = nnx.filter_state(model, nnx.Param) if isinstance(model, nnx.State) else nnx.state(model, nnx.Param)
    leaves = jax.tree_util.tree_leaves_with_path(params)
    digest = hashlib.sha256()
    for path, leaf in sorted(leaves, key=lambda item: jax.tree_util.keystr(item[0])):
        array = np.asarray(jax.device_get(leaf))
        digest.update(f"{jax.tree_util.keystr(path)}|{array.dtype}|{array.shape}|".encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return f"sha256:{digest.hexdigest()[:16]}"


def model_label(model: Mapping[str, Any], weights: str) -> str:
    """A record's `model`: kind, file or folder (the seed of a tiny model) and the weights hash."""
    if model["kind"] == "tiny":
        name = f"tiny:seed{model['seed']}"
    elif model["kind"] == "gguf" and not model["path"]:
        name = f"gguf:{assets.SMOLLM2_GGUF}"
    else:
        name = f"{model['kind']}:{pathlib.Path(model['path']).name}"
    return f"{name}@{weights}"


def git_commit() -> str:
    """HEAD of the repository this package runs from, "+dirty" with tracked changes; "unknown" outside git."""
    try:
        top, head = _git("rev-parse", "--show-toplevel", "HEAD").split()
        if pathlib.Path(top).resolve() != REPO_ROOT:
            return "unknown"
        return head + ("+dirty" if _git("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, ValueError, subprocess.SubprocessError):
        return "unknown"


def _git(*args: str) -> str:
    done = subprocess.run(
        ["git", "-C", str(REPO_ROOT), *args], capture_output=True, text=True, timeout=30, check=True
    )
    return done.stdout.strip()


def make(config: Mapping[str, Any], stage: str, *, weights: str, prompt_version: str) -> Provenance:
    """This run's provenance."""
    return Provenance(stage, stage_config(config, stage), weights, prompt_version, (git_commit(),))


def _read(path: pathlib.Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CacheError(f"{path}: not a JSON run record ({e})") from None
    if not isinstance(data, dict):
        raise CacheError(f"{path}: expected a JSON object, got {type(data).__name__}")
    for field, kind in (*((f, str) for f in ("stage", "weights", "prompt_version")), ("config", dict)):
        if not isinstance(data.get(field), kind):
            raise CacheError(f"{path}: field '{field}' missing or not a {kind.__name__}")
    commits = data.get("git_commits")
    if not (isinstance(commits, list) and all(isinstance(c, str) for c in commits)):
        raise CacheError(f"{path}: field 'git_commits' missing or not a list of strings")
    return data


def _differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    diffs = []
    for field in _COMPARED:
        if field == "config":
            keys = sorted(set(old["config"]) | set(new["config"]))
            diffs += [
                f"{k} {old['config'].get(k, '<absent>')!r} -> {new['config'].get(k, '<absent>')!r}"
                for k in keys
                if old["config"].get(k, "<absent>") != new["config"].get(k, "<absent>")
            ]
        elif old[field] != new[field]:
            diffs.append(f"{'model weights' if field == 'weights' else field} {old[field]!r} -> {new[field]!r}")
    return diffs


def check_or_write(folder: str | pathlib.Path, provenance: Provenance, *, has_results: bool, hint: str) -> None:
    """Compares `provenance` with `folder/run.json` and adds this commit to it, or writes it for a new output.

    A difference, or results without a run.json, is a CacheError; `hint` says what to do instead (e.g. "use
    another workdir").
    """
    path = pathlib.Path(folder) / RUN_FILE
    new = provenance.to_json()
    if not path.exists():
        if has_results:
            raise CacheError(f"{folder} holds results but no {RUN_FILE}, so what produced them is unknown; {hint}")
        atomic_write_json(path, new)
        return
    old = _read(path)
    diffs = _differences(old, new)
    if diffs:
        raise CacheError(f"{path}: this run differs from the one that wrote it: {'; '.join(diffs)}; {hint}")
    if old["git_commits"][-1:] != list(provenance.git_commits):
        atomic_write_json(path, {**new, "git_commits": [*old["git_commits"], *provenance.git_commits]})
