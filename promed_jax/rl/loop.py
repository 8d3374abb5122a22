"""Stage 2 (`mode=rl`, promed.md §4): rollouts -> rewards -> advantages -> GRPO updates, resumable.

Per rollout batch b = 0, 1, ... (`grpo.steps` of them):

1. the next `grpo.batch_cases` training cases (epochs of a permutation seeded by (seed, epoch): batch b's
   cases are a function of b alone), each consulted `grpo.num_generations` times by the current policy at the
   `sampling` section's settings (temperature 0.7, repetition penalty 1.1, no repeated 3-grams within the
   turn, 256 new tokens per turn, 8,192 per dialogue), the patient per `patient`;
2. per turn: kind, format reward and SIG from the cached Shapley weights (`shapley.weighting`, exact or
   paper coverage per `shapley.sig_mode`); token rewards (`grpo.reward`) and advantages (`grpo.advantage`);
3. the update (`rl.step.GrpoUpdater`): old and reference log-probs with dropout off, then μ passes.

Start: `grpo.init_checkpoint`, a Hugging Face folder (Stage 1's `{workdir}/sft/model`, adapters merged) or
a Stage 1 workdir / sft folder holding one; '' takes `{workdir}/sft/model` when it exists (the pipeline),
else the `model` section's model. Fresh LoRA adapters go on top (`model.lora_rank` > 0), and the reference
is that model with the adapters off; `model.lora_rank = 0` trains every weight against a frozen copy.

Token in, token out: the doctor is our model (`backends.local`), so rollouts keep the ids it sampled
(`consult.rollout`); the old log-probs are recomputed by the log-prob pass (dropout off) and their largest
gap to the sampler's is logged (`sampler_logp_gap`). Keys: doctor turn k of sample g of a case in batch b is
drawn with `row_key(grpo.seed, "rl", b, case id, g, k)`, the same whether or not the run was resumed;
dropout keys come from the train state (seed, optimizer step).

Outputs under `{workdir}/rl/`: `metrics.jsonl` (one line per rollout batch, `step` = batches done: every
reward part, accuracy, questions per dialogue, SIG per question, the share of questions whose reply revealed
no new fact, KL, clip fraction, entropy, rollout and update seconds and tokens/s; held-out evaluation
every `grpo.eval_every` batches, before the first and after the last, in `eval_*` fields), `eval/step_<b>/
proactive.jsonl` (`promed_jax.evaluation`, greedy per the `eval` section), `checkpoints/` (orbax: params,
optimizer state, step, RNG key, data position; every `ckpt.every_steps` batches and at the end), `model/`
(the final policy, LoRA merged) and `run.json`. A killed run resumes from its last checkpoint and reaches
the parameters of an uninterrupted run; metrics lines past the checkpoint are dropped.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from absl import logging

from promed_jax import provenance, registry
from promed_jax.consult.rollout import Dialogue, Rollout, rollout
from promed_jax.data.cases import Case
from promed_jax.errors import CheckpointError, ConfigError, DataError
from promed_jax.io import JsonlWriter, atomic_path, atomic_write_text, output_lock, resume_jsonl
from promed_jax.rl import step as step_lib
from promed_jax.rl.losses import LossConfig
from promed_jax.rl.rewards import RewardConfig
from promed_jax.rl.turns import QUESTION, paper_coverages, turn_arrays
from promed_jax.text.prompts import DOCTOR_PROMPT_VERSION

STAGE = "rl"
EVAL_MODE = "proactive"


def stage_dir(workdir: str | pathlib.Path) -> pathlib.Path:
    return pathlib.Path(workdir) / STAGE


def run(config, workdir: str) -> pathlib.Path:
    """Trains and exports; returns the exported model folder. Holds `{workdir}/rl.lock`."""
    with output_lock(stage_dir(workdir)):
        return _run(config, workdir)


# --- the start model --------------------------------------------------------------------------------------


def start_folder(init_checkpoint: str, workdir: str | pathlib.Path) -> pathlib.Path | None:
    """The Hugging Face folder Stage 2 starts from, or None for the `model` section's model."""
    if not init_checkpoint:
        default = pathlib.Path(workdir) / "sft" / "model"
        return default if (default / "config.json").is_file() else None
    path = pathlib.Path(init_checkpoint).expanduser()
    for folder in (path, path / "model", path / "sft" / "model"):
        if (folder / "config.json").is_file():
            return folder
    raise CheckpointError(
        f"config grpo.init_checkpoint={init_checkpoint!r}: no Hugging Face folder (config.json) there, nor in its "
        "model/ or sft/model/ (a Stage 1 output)"
    )


def load_start(config, workdir: str | pathlib.Path, mesh) -> tuple[Any, Any, str]:
    """(model with fresh adapters, tokenizer, where it came from)."""
    from promed_jax.models.checkpoints import load_hf
    from promed_jax.models.loader import _our_fields, load_model
    from promed_jax.text.tokenizer import load_tokenizer

    folder = start_folder(config.grpo.init_checkpoint, workdir)
    if folder is None:
        model, tokenizer = load_model(config.model, mesh=mesh)
        return model, tokenizer, f"model.kind={config.model.kind}"
    if config.model.kind == "tiny":
        from promed_jax.text.tokenizer import build_tiny_tokenizer

        tokenizer = build_tiny_tokenizer()
    else:
        tokenizer = load_tokenizer(str(folder))
    model = load_hf(str(folder), seed=int(config.model.seed), mesh=mesh, **_our_fields(config.model))
    return model, tokenizer, str(folder)


# --- data --------------------------------------------------------------------------------------------------


def select_cases(config) -> tuple[list[Case], list[Case]]:
    """(training cases, held-out cases): the held-out are the first `grpo.eval_cases` of `grpo.eval_split`,
    and never train."""
    from promed_jax.data.sources import cases_from_config

    train = list(cases_from_config(config.data, stage=STAGE))
    held: list[Case] = []
    if config.grpo.eval_every > 0:
        data = config.data.to_dict()
        data.update(split=config.grpo.eval_split, ids=(), limit=0)
        try:
            held = list(cases_from_config(data, stage="eval"))[: config.grpo.eval_cases or None]
        except ConfigError as e:  # an empty split (a small synthetic clinic): train on, without evaluation
            logging.warning("rl: no held-out evaluation: %s", e)
    held_ids = {c.id for c in held}
    train = [c for c in train if c.id not in held_ids]
    if not train:
        raise DataError(f"rl: no training cases left (the {len(held)} held-out cases of grpo.eval_split removed)")
    return train, held


def batch_indices(n_cases: int, batch_cases: int, batch: int, seed: int) -> list[int]:
    """The case indices of rollout batch `batch`: positions batch·B .. batch·B + B − 1 of the stream of epochs,
    epoch e a permutation seeded by (seed, e)."""
    out = []
    for position in range(batch * batch_cases, (batch + 1) * batch_cases):
        epoch, index = divmod(position, n_cases)
        out.append(int(np.random.default_rng([seed, epoch]).permutation(n_cases)[index]))
    return out


# --- per-batch metrics ----------------------------------------------------------------------------------


def question_facts(dialogue: Dialogue) -> list[tuple[int, ...] | None]:
    """Per question the patient answered, the facts its reply revealed."""
    return [dialogue.revealed[k] for k in range(dialogue.n_questions)]


def rollout_metrics(rollout: Rollout, turns, parts: Mapping[str, Any], adv_metrics) -> dict[str, float]:
    """Means over the batch's dialogues, and per question."""
    dialogues = rollout.dialogues
    questions = int(sum(d.n_questions for d in dialogues))
    kind, sig = np.asarray(turns.kind), np.asarray(turns.sig)
    replies = [f for d in dialogues for f in question_facts(d)]
    new_facts = [sum(1 for t in d.revealed_turn if t == k) for d in dialogues for k in range(1, d.n_questions + 1)]
    out = {f"reward_{name}": float(np.mean(np.asarray(v))) for name, v in parts.items()}
    out.update(
        accuracy=float(np.mean([d.correct for d in dialogues])),
        answered=float(np.mean([d.answered for d in dialogues])),
        questions=questions / len(dialogues),
        sig_per_question=float(sig[kind == QUESTION].sum() / questions) if questions else 0.0,
        no_fact_question_share=(
            float(np.mean([not f for f in replies if f is not None])) if any(f is not None for f in replies) else 0.0
        ),
        no_new_fact_question_share=float(np.mean([n == 0 for n in new_facts])) if new_facts else 0.0,
        doctor_tokens=float(rollout.role_mask.sum()),
        **{k: float(v) for k, v in adv_metrics.items()},
    )
    return out


def eval_metrics(records: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Accuracy, questions, never-answered and the share of questions that revealed no new fact."""
    questions = [(r["revealed_turn"], int(r["n_questions"])) for r in records]
    fruitless = [sum(1 for t in turn if t == k) == 0 for turn, q in questions for k in range(1, q + 1)]
    return {
        "eval_cases": len(records),
        "eval_accuracy": float(np.mean([r["correct"] for r in records])),
        "eval_questions": float(np.mean([q for _, q in questions])),
        "eval_never_answered": float(np.mean([not r["answered"] for r in records])),
        "eval_no_new_fact_question_share": float(np.mean(fruitless)) if fruitless else 0.0,
    }


# --- the loop --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Stage2:
    """What one Stage 2 run holds between batches (the tests drive it batch by batch)."""

    config: Any
    workdir: pathlib.Path
    updater: step_lib.GrpoUpdater
    tokenizer: Any
    remote: Any  # the OpenAI-compatible server of patient.kind='openai' (patient and judge), or None
    train: list[Case]
    held: list[Case]
    weights: Mapping[str, np.ndarray]
    label: str

    @property
    def folder(self) -> pathlib.Path:
        return stage_dir(self.workdir)

    @property
    def batches_done(self) -> int:
        return int(jax.device_get(self.updater.state.step)) // self.updater.update_config.steps_per_batch()

    def backend(self, *, batch: int | None, greedy: bool, use_lora: bool = True):
        """The current policy (or, with use_lora=False, the reference) as a local chat backend."""
        from promed_jax.backends import make_backend

        sampling = dict(self.config.sampling.to_dict())
        if greedy:
            ev = self.config.eval
            sampling.update(repetition_penalty=ev.repetition_penalty, no_repeat_ngram_size=ev.no_repeat_ngram_size)
            sampling.update(seed=ev.seed, max_batch=ev.batch_size)
        else:
            grpo = self.config.grpo
            sampling.update(seed=grpo.seed, max_batch=grpo.batch_cases * grpo.num_generations)
        model = self.updater.policy_model()
        if not use_lora and self.updater.ref_params is not None:
            from flax import nnx

            model = nnx.merge(self.updater.eval_graphdef, self.updater.ref_params, self.updater.state.frozen)
        if model.config.remat:  # remat serves the update only; the sampler under nnx.remat fails to trace
            model.config = model.config.replace(remat=False)
        backend = make_backend("local", sampling, model=model, tokenizer=self.tokenizer)
        if not use_lora:
            backend.sampling = dataclasses.replace(backend.sampling, use_lora=False)
        return backend

    def reference(self):
        """The frozen start model (adapters off, or the frozen copy) as a backend, the LLM patient and the
        paper-mode judge. Built anew per use: the update donates the arrays a backend would hold."""
        return self.backend(batch=None, greedy=True, use_lora=False)

    def patient(self):
        from promed_jax.consult.patients import make_patient

        kind = self.config.patient.kind
        return make_patient(self.config.patient, self.remote or (self.reference() if kind == "llm" else None))

    def rollout(self, batch: int) -> Rollout:
        grpo, sampling = self.config.grpo, self.config.sampling
        cases = [self.train[i] for i in batch_indices(len(self.train), grpo.batch_cases, batch, grpo.seed)]
        return rollout(
            cases,
            self.backend(batch=batch, greedy=False),
            self.patient(),
            self.tokenizer,
            samples=grpo.num_generations,
            max_questions=self.config.consult.max_questions,
            max_new_tokens=sampling.max_new_tokens,
            temperature=sampling.temperature,
            max_dialogue_tokens=sampling.max_dialogue_tokens,
            seed=grpo.seed,
            step=batch,
        )

    def rewards(self, rollout: Rollout) -> tuple[np.ndarray, Any, dict, dict]:
        """(advantages float32[N, T], turn arrays, reward parts, advantage metrics)."""
        grpo = self.config.grpo
        coverages = None
        if self.config.shapley.sig_mode == "paper":
            coverages = paper_coverages(self.remote or self.reference(), rollout.dialogues)
        turns = turn_arrays(
            rollout,
            self.weights,
            format_start=grpo.format_reward_start,
            format_contains=grpo.format_reward_contains,
            coverages=coverages,
            truncated=[(~d.tokens.stopped).tolist() for d in rollout.dialogues]
            if all(d.tokens is not None for d in rollout.dialogues)
            else None,
        )
        reward_fn = registry.get("rl.reward", grpo.reward)
        tokens, parts = reward_fn(
            turns, rollout.turn_ids, rollout.role_mask, rollout.correct, config=RewardConfig.from_config(grpo)
        )
        advantage_fn = registry.get("rl.advantage", grpo.advantage)
        advantages, adv_metrics = advantage_fn(tokens, rollout.role_mask, rollout.group)
        return np.asarray(advantages, np.float32), turns, parts, adv_metrics

    def train_batch(self) -> dict[str, Any]:
        """One rollout batch and its updates; returns its metrics line."""
        batch = self.batches_done
        t0 = time.perf_counter()
        rollout = self.rollout(batch)
        rollout_s = time.perf_counter() - t0
        advantages, turns, parts, adv_metrics = self.rewards(rollout)
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        arrays = step_lib.update_batch(rollout.tokens, rollout.role_mask, rollout.lengths, advantages, pad_id=pad_id)
        update, extra = self.updater.update(arrays, batch_index=batch)
        if rollout.logprobs is not None:  # the sampler's log-probs, target-aligned as the pass's
            w = arrays["weights"][:, : rollout.tokens.shape[1] - 1]
            gap = np.abs(extra["old_logps"][:, : w.shape[1]] - rollout.logprobs[:, 1:])[w]
            update["sampler_logp_gap"] = float(gap.max()) if gap.size else 0.0
        record = {"step": batch + 1, "optimizer_steps": int(jax.device_get(self.updater.state.step))}
        record.update(rollout_metrics(rollout, turns, parts, adv_metrics))
        record.update(update)
        record.update(
            rollout_s=rollout_s,
            rollout_tokens_per_s=record["doctor_tokens"] / rollout_s,
            update_tokens_per_s=record["update_tokens"] / update["update_s"],
            cases=sorted({d.case.id for d in rollout.dialogues}),
        )
        return record

    def evaluate(self, batch: int) -> dict[str, float]:
        """Greedy proactive consultations of the held-out cases by the current policy."""
        from promed_jax.evaluation.evaluate import evaluate_mode

        if not self.held:
            return {}
        ev = self.config.eval
        path = self.folder / "eval" / f"step_{batch:06d}" / f"{EVAL_MODE}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        records = evaluate_mode(
            self.held,
            self.backend(batch=None, greedy=True),
            self.patient(),
            path,
            mode=EVAL_MODE,
            batch_size=ev.batch_size,
            max_questions=self.config.consult.max_questions,
            max_new_tokens=ev.max_new_tokens,
            temperature=ev.temperature,
            model=f"{self.label}@rl_step_{batch}",
            patient_name=self.config.patient.kind,
            max_dialogue_tokens=self.config.sampling.max_dialogue_tokens,
        )
        return eval_metrics(records)


def build(config, workdir: str | pathlib.Path, *, weights: Mapping[str, np.ndarray] | None = None) -> Stage2:
    """Cases, weights (the Shapley cache's unless given), the start model and the compiled update of a run
    (no checkpoint read)."""
    from promed_jax.backends import make_backend
    from promed_jax.shapley.cache import load_weights
    from promed_jax.sharding import make_mesh

    grpo = config.grpo
    train, held = select_cases(config)
    if weights is None:
        weights = load_weights(workdir, train, weighting=config.shapley.weighting)
    mesh = make_mesh(tuple(config.mesh.shape), tuple(config.mesh.axis_names))
    model, tokenizer, source = load_start(config, workdir, mesh)
    label = provenance.model_label(config.model, provenance.weights_hash(model))
    logging.info("rl: start %s (%s), %d training cases, %d held out", source, label, len(train), len(held))
    update = step_lib.UpdateConfig.from_config(grpo)
    rows = grpo.batch_cases * grpo.num_generations
    if rows % (update.minibatches * update.grad_accum):
        raise ConfigError(
            f"config grpo.batch_cases x grpo.num_generations = {rows} rows must split into grpo.minibatches="
            f"{update.minibatches} x grpo.grad_accum={update.grad_accum} equal parts"
        )
    updater = step_lib.GrpoUpdater(
        model,
        rows=rows,
        lora=config.model.lora_rank > 0,
        loss=LossConfig.from_config(grpo),
        update=update,
        optimizer=step_lib.optimizer_config(grpo, grpo.steps * update.steps_per_batch()),
        mesh=mesh,
        seed=grpo.seed,
    )
    remote = make_backend("openai", config.backend) if config.patient.kind == "openai" else None
    return Stage2(config, pathlib.Path(workdir), updater, tokenizer, remote, train, held, weights, label)


def _keep_metrics(path: pathlib.Path, step: int) -> None:
    """Keeps the metrics lines of batches up to `step` (the checkpoint's), rewriting the file atomically."""
    kept = [r for r in resume_jsonl(path) if r.get("step", 0) <= step]
    with atomic_path(path) as tmp, JsonlWriter(tmp) as writer:
        for r in kept:
            writer.write(r)


def _run(config, workdir: str) -> pathlib.Path:
    from tqdm import tqdm

    from promed_jax.models.checkpoints import save_hf
    from promed_jax.models.lora import merge_lora
    from promed_jax.training.checkpointing import Checkpointer

    grpo, ckpt = config.grpo, config.ckpt
    folder = stage_dir(workdir)
    folder.mkdir(parents=True, exist_ok=True)
    stage = build(config, workdir)
    checkpoints = folder / "checkpoints"
    provenance.check_or_write(
        folder,
        provenance.make(config, STAGE, weights=stage.label, prompt_version=DOCTOR_PROMPT_VERSION),
        has_results=checkpoints.exists() and any(checkpoints.iterdir()),
        hint="use another workdir",
    )
    saver = Checkpointer(checkpoints, every_steps=1, max_to_keep=ckpt.max_to_keep)
    metrics_path = folder / "metrics.jsonl"
    if ckpt.resume and saver.latest_step() is not None:
        stage.updater.state = saver.restore(stage.updater.state)
        _keep_metrics(metrics_path, stage.batches_done)
        logging.info("rl: resumed after rollout batch %d", stage.batches_done)
    elif metrics_path.exists():
        metrics_path.unlink()
    done = stage.batches_done
    evaluated = (
        {r["step"] for r in resume_jsonl(metrics_path) if "eval_accuracy" in r} if metrics_path.exists() else set()
    )
    with JsonlWriter(metrics_path) as writer, tqdm(total=grpo.steps, initial=done, desc="rl", unit="batch") as bar:

        def evaluate_if_due() -> None:
            if grpo.eval_every == 0 or not stage.held or done in evaluated:
                return
            if done == 0 or done % grpo.eval_every == 0 or done == grpo.steps:
                writer.write({"step": done, **stage.evaluate(done)})
                evaluated.add(done)

        evaluate_if_due()  # a resumed run first finishes the evaluation its kill interrupted
        while done < grpo.steps:
            record = stage.train_batch()
            writer.write(record)
            done = record["step"]
            if done % ckpt.every_steps == 0 or done == grpo.steps:
                saver.save(stage.updater.state, force=True)
            evaluate_if_due()
            bar.update(1)
            bar.set_postfix(reward=f"{record['reward_total']:.2f}", acc=f"{record['accuracy']:.2f}")
    saver.save(stage.updater.state, force=True)
    saver.close()
    policy = stage.updater.policy_model()
    export = folder / "model"
    save_hf(merge_lora(policy) if stage.updater.lora else policy, export, tokenizer=stage.tokenizer)
    records = resume_jsonl(metrics_path)
    last_eval = next((r for r in reversed(records) if "eval_accuracy" in r), {})
    atomic_write_text(
        folder / "summary.json",
        json.dumps(
            {
                "batches": grpo.steps,
                "start": stage.label,
                **{k: v for k, v in last_eval.items() if k.startswith("eval_")},
            },
            indent=2,
        )
        + "\n",
    )
    return export
