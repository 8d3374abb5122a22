"""The SFT stage (`mode=sft`): dialogues -> a trained doctor, exported as a Hugging Face folder.

`train(config, workdir, stage=...)` is also the warm start (`training.warm_start`, stage `warm_start`, its own
section with the SFT section's fields, outputs under `{workdir}/warm_start/`).

Outputs under `{workdir}/sft/`: `naive_doctor.jsonl` (with `sft.source='naive'`: the scripted naive
doctor's consultations of the configured synthetic cases, or of `data.synthetic_n` synthetic cases when other
data is configured; the warm start adds `direct_answers.jsonl`, answer-at-once examples of the same cases),
`topic_doctor.jsonl` (with `sft.source='topic'`: the scripted
topic doctor's consultations of the configured data cases of the split, real MedQA / CMB cases),
`checkpoints/` (orbax), `metrics.jsonl`
(one line per step: loss, lr, grad norm, doctor tokens, tokens/s; eval loss every `sft.eval_every` steps
and at the end), `loss.png`, `model/` (the final model, LoRA merged) and `run.json` (provenance). A killed
run resumes from its last checkpoint with the same parameters as an uninterrupted run: the batch order is
a function of (seed, epoch), the dropout keys of (seed, step), and metrics lines past the checkpoint are
dropped on resume.
"""

from __future__ import annotations

import json
import pathlib
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from absl import logging
from tqdm import tqdm

from promed_jax import provenance
from promed_jax.device_memory import CheckedStep
from promed_jax.errors import ConfigError, DataError, WorkdirError
from promed_jax.io import JsonlWriter, atomic_path, atomic_write_text, output_lock, resume_jsonl
from promed_jax.text.prompts import DOCTOR_PROMPT_VERSION
from promed_jax.training import data as data_lib
from promed_jax.training import state as state_lib
from promed_jax.training.checkpointing import Checkpointer
from promed_jax.training.sft import make_sft_loss

STAGE = "sft"
NAIVE_FILE = "naive_doctor.jsonl"
DIRECT_FILE = "direct_answers.jsonl"
TOPIC_FILE = "topic_doctor.jsonl"


def stage_dir(workdir: str | pathlib.Path) -> pathlib.Path:
    return pathlib.Path(workdir) / STAGE


def run(config, workdir: str) -> pathlib.Path:
    """Trains, checkpoints and exports; returns the exported model folder. Holds `{workdir}/sft.lock`."""
    return train(config, workdir, stage=STAGE)


def train(config, workdir: str, *, stage: str) -> pathlib.Path:
    """The SFT stage (`stage='sft'`, the `sft` section) or the warm start (`'warm_start'`, its section, same
    fields): trains, checkpoints and exports into `{workdir}/<stage>/`, holding `{workdir}/<stage>.lock`."""
    with output_lock(pathlib.Path(workdir) / stage):
        return _run(config, workdir, stage)


def section_of(config, stage: str):
    """The config section a training stage reads: `sft` or `warm_start`."""
    return config.warm_start if stage == "warm_start" else config.sft


def dialogue_records(config, folder: pathlib.Path, stage: str = STAGE) -> list[dict]:
    """The dialogues to train on: the naive doctor's (with the answer-at-once examples for the warm start),
    or the topic doctor's (each written first if absent), or the configured files."""
    sft = section_of(config, stage)
    if sft.source == "naive":
        path = folder / NAIVE_FILE
        if not path.exists():
            from promed_jax.consult.patients import make_patient
            from promed_jax.training.naive_doctor import write_dialogues

            records = write_dialogues(
                _naive_cases(config, stage),
                make_patient(config.patient),
                path,
                seed=sft.seed,
                max_questions=sft.naive_max_questions,
                protocol_max_questions=config.consult.max_questions,
            )
            accuracy = float(np.mean([r["correct"] for r in records])) if records else 0.0
            questions = float(np.mean([r["llm_calls"]["patient_replies"] for r in records])) if records else 0.0
            logging.info(
                "%s: naive doctor: %d dialogues, accuracy %.3f, %.2f questions -> %s",
                stage,
                len(records),
                accuracy,
                questions,
                path,
            )
        if stage != "warm_start":
            return data_lib.read_dialogues(path)
        direct = folder / DIRECT_FILE
        if not direct.exists():
            from promed_jax.training.naive_doctor import write_records
            from promed_jax.training.warm_start import direct_examples

            cases = _naive_cases(config, stage)
            write_records(direct, direct_examples(cases, seed=sft.seed, max_questions=config.consult.max_questions))
        return data_lib.read_dialogues(path) + data_lib.read_dialogues(direct)
    if sft.source == "topic":
        path = folder / TOPIC_FILE
        if not path.exists():
            from promed_jax.consult.patients import make_patient
            from promed_jax.data.sources import cases_from_config
            from promed_jax.training.topic_doctor import write_dialogues

            # `cases` replaces data.limit here: the warm start may consult more cases than the later stages
            n = section_of(config, stage).get("cases", 0)
            data = {**config.data.to_dict(), "limit": n} if n else config.data
            cases = cases_from_config(data, stage=stage)
            records = write_dialogues(
                cases,
                make_patient(config.patient),
                path,
                seed=sft.seed,
                max_questions=sft.naive_max_questions,
                protocol_max_questions=config.consult.max_questions,
            )
            asked = sum(len(r["targets"]) for r in records)
            logging.info("sft: topic doctor: %d dialogues, %d questions -> %s", len(records), asked, path)
        return data_lib.read_dialogues(path)
    records = []
    for path in sft.dialogues:
        records += data_lib.read_dialogues(path)
    return records


def _naive_cases(config, stage: str) -> list:
    """The cases the naive doctor consults: the warm start's `warm_start.cases` synthetic cases when set,
    else the configured synthetic cases. It knows the synthetic clinic's table only: with other data
    configured, it still consults data.synthetic_n synthetic cases (it teaches the protocol, not medicine)."""
    from promed_jax.data import synthetic
    from promed_jax.data.sources import cases_from_config

    n = section_of(config, stage).get("cases", 0) or config.data.synthetic_n
    if config.data.kind == "synthetic" and n == config.data.synthetic_n:
        return cases_from_config(config.data, stage=stage)
    return synthetic.make_cases(n, config.data.synthetic_seed)


def prepare_examples(
    records: Sequence[Mapping[str, Any]], tokenizer, *, lengths: Sequence[int], pad_id: int, eval_fraction: float
) -> tuple[list[data_lib.Example], list[data_lib.Example], int]:
    """(train, held-out, dropped as too long)."""
    train, held, dropped = [], [], 0
    for r in records:
        ex = data_lib.render_example(tokenizer, r, pad_id)
        if data_lib.bucket_of(ex.length, lengths) is None:
            dropped += 1
            continue
        (held if data_lib.is_heldout(r["case_id"], eval_fraction) else train).append(ex)
    return train, held, dropped


class Trainer:
    """The compiled steps and the batch order of one SFT run (also what the tests and the benchmark drive)."""

    def __init__(
        self,
        model,
        examples: Sequence[data_lib.Example],
        *,
        sft: Mapping[str, Any],
        lora: bool,
        mesh,
        pad_id: int,
        lengths: Sequence[int],
        memory_budget: int | None = None,
    ):
        self.examples = list(examples)
        self.lengths = tuple(lengths)
        self.batch_size = int(sft["batch_size"])
        self.microbatches = int(sft["grad_accum"])
        self.seed = int(sft["seed"])
        self.pad_id = pad_id
        self.mesh = mesh
        if self.batch_size % self.microbatches:
            raise ConfigError(
                f"config sft.batch_size={self.batch_size} must be a multiple of sft.grad_accum={self.microbatches}"
            )
        self.batches_per_epoch = data_lib.batches_per_epoch(self.examples, self.lengths, self.batch_size)
        self.total_steps = int(sft["epochs"]) * self.batches_per_epoch
        opt = state_lib.OptimizerConfig(
            learning_rate=float(sft["learning_rate"]),
            total_steps=self.total_steps,
            warmup_steps=int(sft["warmup_steps"]),
            final_lr_fraction=float(sft["final_lr_fraction"]),
            weight_decay=float(sft["weight_decay"]),
            max_grad_norm=float(sft["max_grad_norm"]),
        )
        self.schedule = state_lib.schedule(opt)
        tx = state_lib.make_optimizer(opt)
        graphdef, params, frozen = state_lib.split_for_training(model, lora=lora)
        self.graphdef, self.lora = graphdef, lora
        loss = make_sft_loss(int(sft["vocab_chunk"]))
        self.state = state_lib.place_state(state_lib.init_state(params, frozen, tx, self.seed), mesh)
        self.step_fn = CheckedStep(
            state_lib.compile_step(
                state_lib.make_train_step(loss, graphdef, tx, self.schedule),
                self.state,
                mesh,
                self.batch_size // self.microbatches,
            ),
            name="the SFT step",
            hint="lower it with model.remat=True, a larger sft.grad_accum, a smaller sft.batch_size or sft.max_tokens",
            budget=memory_budget,
        )
        eval_gd = state_lib.eval_graphdef(graphdef, params, frozen, lora=lora)
        self.eval_fn = jax.jit(state_lib.make_eval_step(loss, eval_gd))
        self._plans: dict[int, data_lib.BatchPlan] = {}

    def plan(self, epoch: int) -> data_lib.BatchPlan:
        if epoch not in self._plans:
            self._plans = {
                epoch: data_lib.epoch_plan(self.examples, self.lengths, self.batch_size, seed=self.seed, epoch=epoch)
            }
        return self._plans[epoch]

    def batch(self, position: int) -> tuple[dict, int]:
        """The batch at a data position and its number of valid tokens."""
        epoch, index = divmod(position, self.batches_per_epoch)
        length, rows = self.plan(epoch).batches[index]
        chosen = [self.examples[i] for i in rows]
        batch = data_lib.collate(chosen, length, self.batch_size, self.microbatches, self.pad_id)
        return batch, sum(ex.length for ex in chosen)

    def step(self) -> dict:
        position = int(jax.device_get(self.state.data_position))
        batch, n_tokens = self.batch(position)
        start = time.perf_counter()
        self.state, metrics = self.step_fn(self.state, batch)
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        seconds = time.perf_counter() - start
        return {
            "step": int(jax.device_get(self.state.step)),
            "epoch": position // self.batches_per_epoch,
            **metrics,
            "seconds": seconds,
            "tokens_per_s": n_tokens / seconds,
        }

    def eval_loss(self, examples: Sequence[data_lib.Example]) -> float | None:
        """Mean -log p over the doctor tokens of `examples`, dropout off."""
        total, count = 0.0, 0.0
        for start in range(0, len(examples), self.batch_size):
            chosen = list(examples[start : start + self.batch_size])
            length = max(data_lib.bucket_of(ex.length, self.lengths) for ex in chosen)
            batch = data_lib.collate(chosen, length, self.batch_size, 1, self.pad_id)
            s, c = jax.device_get(self.eval_fn(self.state, batch))
            total, count = total + float(s), count + float(c)
        return total / count if count else None

    def model(self):
        """The trained model (eval mode), e.g. for sampling or export."""
        from flax import nnx

        model = nnx.merge(self.graphdef, self.state.params, self.state.frozen)
        model.eval()
        return model


def _resume_metrics(path: pathlib.Path, step: int) -> None:
    """Keeps the metrics lines of steps up to `step` (the checkpoint), rewriting the file atomically."""
    kept = [r for r in resume_jsonl(path) if r.get("step", 0) <= step]
    with atomic_path(path) as tmp, JsonlWriter(tmp) as writer:
        for r in kept:
            writer.write(r)


def plot_losses(metrics_path: pathlib.Path, out: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = resume_jsonl(metrics_path)
    fig, ax = plt.subplots(figsize=(6, 4))
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    held = [(r["step"], r["eval_loss"]) for r in records if r.get("eval_loss") is not None]
    if train:
        ax.plot(*zip(*train, strict=True), label="train")
    if held:
        ax.plot(*zip(*held, strict=True), "o-", label="held-out")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per doctor token)")
    ax.legend()
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def _run(config, workdir: str, stage: str) -> pathlib.Path:
    from promed_jax.models.checkpoints import save_hf
    from promed_jax.models.loader import load_model
    from promed_jax.models.lora import merge_lora
    from promed_jax.sharding import make_mesh

    sft, ckpt = section_of(config, stage), config.ckpt
    folder = pathlib.Path(workdir) / stage
    folder.mkdir(parents=True, exist_ok=True)
    records = dialogue_records(config, folder, stage)
    if not records:
        raise DataError(f"{stage}: no dialogues to train on")
    mesh = make_mesh(tuple(config.mesh.shape), tuple(config.mesh.axis_names))
    tokenizer = None
    if stage == "warm_start" and config.model.kind == "tiny":
        from promed_jax.training.warm_start import clinic_tokenizer

        tokenizer = clinic_tokenizer(records, sft.vocab_size)  # a fresh model: its tokenizer fits the clinic
    model, tokenizer = load_model(config.model, mesh=mesh, tokenizer=tokenizer)
    checkpoints = folder / "checkpoints"
    provenance.check_or_write(
        folder,
        provenance.make(config, stage, weights=provenance.weights_hash(model), prompt_version=DOCTOR_PROMPT_VERSION),
        has_results=checkpoints.exists() and any(checkpoints.iterdir()),
        hint="use another workdir",
    )
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    lengths = data_lib.bucket_lengths(sft.buckets, sft.max_tokens)
    train, held, dropped = prepare_examples(
        records, tokenizer, lengths=lengths, pad_id=pad_id, eval_fraction=sft.eval_fraction
    )
    if dropped:
        logging.warning(
            "%s: %d of %d dialogues are longer than %s.max_tokens=%d and are left out",
            stage,
            dropped,
            len(records),
            stage,
            sft.max_tokens,
        )
    if not train:
        raise DataError(f"{stage}: all {len(records)} dialogues are held out or too long; lower {stage}.eval_fraction")
    logging.info("%s: %d train / %d held-out dialogues, buckets %s", stage, len(train), len(held), lengths)
    trainer = Trainer(model, train, sft=sft, lora=config.model.lora_rank > 0, mesh=mesh, pad_id=pad_id, lengths=lengths)
    saver = Checkpointer(checkpoints, every_steps=ckpt.every_steps, max_to_keep=ckpt.max_to_keep)
    metrics_path = folder / "metrics.jsonl"
    if ckpt.resume and saver.latest_step() is not None:
        trainer.state = saver.restore(trainer.state)
        _resume_metrics(metrics_path, int(jax.device_get(trainer.state.step)))
        logging.info("%s: resumed at step %d", stage, int(jax.device_get(trainer.state.step)))
    elif saver.latest_step() is not None:
        raise WorkdirError(
            f"{checkpoints} holds checkpoints and ckpt.resume=False; use another workdir or ckpt.resume=True"
        )
    elif metrics_path.exists():
        metrics_path.unlink()
    done = int(jax.device_get(trainer.state.step))
    with (
        JsonlWriter(metrics_path) as writer,
        tqdm(total=trainer.total_steps, initial=done, desc=stage, unit="step") as bar,
    ):
        while done < trainer.total_steps:
            record = trainer.step()
            done = record["step"]
            if done % sft.eval_every == 0 or done == trainer.total_steps:
                record["eval_loss"] = trainer.eval_loss(held)
            writer.write(record)
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.3f}")
            saver.save(trainer.state, force=done == trainer.total_steps)
    saver.save(trainer.state, force=True)
    saver.close()
    plot_losses(metrics_path, folder / "loss.png")
    trained = trainer.model()
    export = folder / "model"
    save_hf(merge_lora(trained) if trainer.lora else trained, export, tokenizer=tokenizer)
    atomic_write_text(
        folder / "summary.json",
        json.dumps(
            {
                "steps": trainer.total_steps,
                "train_dialogues": len(train),
                "heldout_dialogues": len(held),
                "dropped_too_long": dropped,
                "final_eval_loss": trainer.eval_loss(held),
            },
            indent=2,
        )
        + "\n",
    )
    return export
