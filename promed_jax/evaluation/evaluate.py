"""Benchmark evaluation: reactive, proactive and full-information consultations of the configured cases.

`python -m promed_jax.main --config=configs/eval.py[:preset]` runs `run`: for every mode it appends one JSON
line per case to `{workdir}/eval/<run>/<mode>.jsonl` as cases finish (a batch of `eval.batch_size` cases at a
time), skips cases already in the file on a re-run, and ends with a markdown table and a plot of accuracy
against questions asked (`evaluation.report`).
"""

from __future__ import annotations

import pathlib
import time
from collections.abc import Sequence

from absl import logging

from promed_jax import io
from promed_jax.backends import make_backend
from promed_jax.backends.base import ChatBackend
from promed_jax.consult import protocol
from promed_jax.consult.patients import Patient, make_patient
from promed_jax.consult.rollout import Dialogue, consult
from promed_jax.data.cases import Case
from promed_jax.errors import DataError
from promed_jax.evaluation import report
from promed_jax.text import prompts

MODES = ("reactive", "proactive", "full")


def record(d: Dialogue, *, mode: str, model: str, patient: str) -> dict:
    """One result line: the case, the outcome, and the dialogue after the instruction."""
    return {
        "id": d.case.id,
        "source": d.case.source,
        "mode": mode,
        "n_options": len(d.case.options),
        "multi_answer": d.case.multi_answer,
        "gold": list(d.case.answer),
        "letters": list(d.letters),
        "correct": d.correct,
        "answered": d.answered,
        "n_questions": d.n_questions,
        "end": d.end,
        "revealed_turn": list(d.revealed_turn),
        "turns": [{"role": m["role"], "content": m["content"]} for m in d.messages[1:]],
        "model": model,
        "patient": patient,
        "prompt_version": _prompt_version(),
    }


def evaluate_mode(
    cases: Sequence[Case],
    doctor: ChatBackend,
    patient: Patient,
    path: str | pathlib.Path,
    *,
    mode: str,
    batch_size: int,
    max_questions: int,
    max_new_tokens: int,
    temperature: float,
    model: str,
    patient_name: str,
    max_dialogue_tokens: int = 0,
) -> list[dict]:
    """Runs the cases not yet in `path` in batches, appending a line per case; returns the records of `cases`.

    With `max_dialogue_tokens` and a doctor that can `encode` a conversation (the local backend), dialogues
    that would outgrow it end unanswered (`END_LENGTH`)."""
    if mode not in MODES:
        raise ValueError(f"unknown eval mode {mode!r}; known: {', '.join(MODES)}")
    done = {r["id"]: r for r in io.resume_jsonl(path)}
    _check_compatible(path, done.values(), model=model, patient=patient_name)
    # Shortest first instruction first: a batch's prompts share one padded length bucket, so grouping similar
    # lengths keeps a few long cases from padding every batch (greedy results do not depend on the batch).
    todo = sorted(
        (c for c in cases if c.id not in done),
        key=lambda c: len(protocol.doctor_first_message(c, mode=mode, max_questions=max_questions)),
    )
    if done:
        logging.info("eval %s: %d cases already in %s, %d to go", mode, len(cases) - len(todo), path, len(todo))
    encode = getattr(doctor, "encode", None)
    count_tokens = (lambda messages: len(encode(messages))) if encode is not None else None
    t0 = time.monotonic()
    with io.JsonlWriter(path) as writer:
        for start in range(0, len(todo), batch_size):
            batch = todo[start : start + batch_size]
            dialogues = consult(
                batch,
                doctor,
                patient,
                mode=mode,
                max_questions=max_questions,
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                max_dialogue_tokens=max_dialogue_tokens,
                count_tokens=count_tokens,
            )
            for d in dialogues:
                rec = record(d, mode=mode, model=model, patient=patient_name)
                writer.write(rec)
                done[d.case.id] = rec
            logging.info(
                "eval %s: %d/%d cases (%.0fs)", mode, start + len(batch), len(todo), time.monotonic() - t0
            )
    return [done[c.id] for c in cases]


def _check_compatible(path, records, *, model: str, patient: str) -> None:
    """Resuming must not mix runs: every existing line has this run's model, patient and prompt versions."""
    want = {"model": model, "patient": patient, "prompt_version": _prompt_version()}
    for r in records:
        got = {k: r.get(k) for k in want}
        if got != want:
            raise ValueError(
                f"{path}: the line of case {r.get('id')} was written with {got}, this run is {want}; "
                "choose another eval.run or remove the file"
            )


def _prompt_version() -> str:
    return f"{prompts.DOCTOR_PROMPT_VERSION}/{prompts.PATIENT_PROMPT_VERSION}"


def model_name(model_cfg) -> str:
    return f"{model_cfg.kind}:{model_cfg.path or 'default'}"


def run(config, workdir: str) -> list[report.Summary]:
    """Evaluates the configured doctor model in `config.eval.modes`; writes lines, a table and a plot.

    The run holds `{workdir}/eval/<run>.lock` throughout: a second run of the same eval.run fails at once."""
    with io.output_lock(pathlib.Path(workdir) / "eval" / config.eval.run):
        return _run(config, workdir)


def _run(config, workdir: str) -> list[report.Summary]:
    from promed_jax.data import cases_from_config
    from promed_jax.models.loader import load_model

    ev = config.eval
    cases = cases_from_config(config.data)
    if not cases:
        raise DataError("eval: the configured data has no valid cases (see data.paths, data.on_error, data.limit)")
    model, tokenizer = load_model(config.model)
    # The doctor samples per the eval section (greedy, no penalties by default: a no-repeat n-gram ban over
    # the prompt would forbid the very `【answer: X】` format the instruction shows).
    sampling = {
        **config.sampling.to_dict(),
        "repetition_penalty": ev.repetition_penalty,
        "no_repeat_ngram_size": ev.no_repeat_ngram_size,
        "seed": ev.seed,
        "max_batch": ev.batch_size,
    }
    doctor = make_backend("local", sampling, model=model, tokenizer=tokenizer)
    patient_backend = None
    if config.patient.kind == "llm":
        patient_backend = doctor
    elif config.patient.kind == "openai":
        patient_backend = make_backend("openai", config.backend)
    patient = make_patient(config.patient, patient_backend)

    out_dir = pathlib.Path(workdir) / "eval" / ev.run
    rows: list[report.Summary] = []
    timings = {}
    for mode in ev.modes:
        t0 = time.monotonic()
        records = evaluate_mode(
            cases,
            doctor,
            patient,
            out_dir / f"{mode}.jsonl",
            mode=mode,
            batch_size=ev.batch_size,
            max_questions=config.consult.max_questions,
            max_new_tokens=ev.max_new_tokens,
            temperature=ev.temperature,
            model=model_name(config.model),
            patient_name=config.patient.kind,
            max_dialogue_tokens=config.sampling.max_dialogue_tokens,
        )
        timings[mode] = time.monotonic() - t0
        rows += report.summarize(mode, records)
    title = f"{model_name(config.model)}, {len(cases)} cases, patient {config.patient.kind}"
    table_path = report.write_report(out_dir, rows, title=title)
    print(report.markdown_table(rows), end="")
    print("wall time per mode: " + ", ".join(f"{m} {s:.0f}s" for m, s in timings.items()))
    logging.info("eval: wrote %s", table_path)
    return rows

