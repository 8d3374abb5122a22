"""Benchmark evaluation: reactive, proactive and full-information consultations of the configured cases.

`python -m promed_jax.main --config=configs/eval.py[:preset]` runs `run` on the test split (unless `data.split`
says otherwise): for every mode it appends one JSON line per case to `{workdir}/eval/<run>/<mode>.jsonl` as
cases finish (a batch of `eval.batch_size` cases at a time), skips cases already in the file on a re-run, and
ends with a markdown table and a plot of accuracy against questions asked (`evaluation.report`).

A re-run must be the same run: every existing line is validated field by field (`read_results`) and must carry
its configured case's fingerprint, and `{workdir}/eval/<run>/run.json` (`promed_jax.provenance`) must match
this run's config, weights and prompt versions.
"""

from __future__ import annotations

import pathlib
import time
from collections.abc import Sequence

from absl import logging

from promed_jax import fields, io, provenance
from promed_jax.backends import make_backend
from promed_jax.backends.base import ChatBackend
from promed_jax.consult import protocol
from promed_jax.consult.patients import Patient, make_patient
from promed_jax.consult.rollout import Dialogue, consult
from promed_jax.data.cases import Case
from promed_jax.errors import CacheError
from promed_jax.evaluation import report
from promed_jax.text import prompts

MODES = ("reactive", "proactive", "full")
# eval.modes may also name the random-N baseline (synthetic clinic only): the scripted doctor of
# `training.naive_doctor.RandomDoctor` asks exactly consult.max_questions random findings of the table, then
# answers with the option they fit best; its lines are proactive consultations by model `RANDOM_DOCTOR`.
RANDOM = "random"
RANDOM_DOCTOR = "random-doctor"
EVAL_MODES = (*MODES, RANDOM)
_HINT = "choose another eval.run or workdir"  # what to do when a re-run is not the run that wrote the results

FIELDS = (
    "id",
    "fingerprint",
    "source",
    "mode",
    "n_options",
    "multi_answer",
    "gold",
    "letters",
    "correct",
    "answered",
    "n_questions",
    "end",
    "revealed_turn",
    "turns",
    "model",
    "patient",
    "prompt_version",
)


def record(d: Dialogue, *, mode: str, model: str, patient: str) -> dict:
    """One result line (`FIELDS`): the case, the outcome, and the dialogue after the instruction."""
    return {
        "id": d.case.id,
        "fingerprint": d.case.fingerprint,
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
    done = read_results(path, mode)
    for case in cases:
        if case.id in done:
            provenance.check_fingerprint(path, case, done[case.id]["fingerprint"], hint=_HINT)
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


def _parse_line(line: object, mode: str) -> dict:
    """The line, every field checked (raises FieldError)."""
    line = fields.exact_fields(line, FIELDS)
    for field in ("id", "source", "end", "model", "patient", "prompt_version"):
        fields.text(line, field)
    fields.matching(line, "fingerprint", provenance.FINGERPRINT, "16 hex digits")
    if fields.text(line, "mode") != mode:
        raise fields.FieldError("mode", f"{line['mode']!r} in the {mode} results")
    fields.count(line, "n_options", minimum=2)
    fields.count(line, "n_questions")
    for field in ("multi_answer", "correct", "answered"):
        fields.require(line, field, bool)
    gold = fields.string_list(line, "gold")
    if not gold:
        raise fields.FieldError("gold", "no gold letter")
    if line["multi_answer"] != (len(gold) > 1):
        raise fields.FieldError("multi_answer", f"{line['multi_answer']} with {len(gold)} gold letter(s)")
    fields.string_list(line, "letters")
    if line["correct"] and not line["answered"]:
        raise fields.FieldError("correct", "true for a case never answered")
    for i, turn in enumerate(fields.require(line, "revealed_turn", list)):
        if not isinstance(turn, int) or isinstance(turn, bool) or turn < -1:
            raise fields.FieldError(f"revealed_turn[{i}]", f"expected a turn >= -1, got {turn!r}")
    for i, turn in enumerate(fields.require(line, "turns", list)):
        try:
            fields.exact_fields(turn, ("role", "content"))
            fields.require(turn, "role", str)
            fields.require(turn, "content", str)
        except fields.FieldError as e:
            raise fields.FieldError(f"turns[{i}]", str(e)) from None
    return line


def read_results(path: str | pathlib.Path, mode: str) -> dict[str, dict]:
    """The finished lines of one mode's results by case id, each field validated; a torn last line is dropped.

    A bad field or a case that appears twice is a CacheError naming the file, the line and the field.
    """
    done: dict[str, dict] = {}
    for lineno, line in enumerate(io.resume_jsonl(path), start=1):
        try:
            line = _parse_line(line, mode)
        except fields.FieldError as e:
            raise CacheError(f"{path} line {lineno}: {e}") from None
        if line["id"] in done:
            raise CacheError(f"{path} line {lineno}: field 'id': case {line['id']} appears twice")
        done[line["id"]] = line
    return done


def _check_compatible(path, records, *, model: str, patient: str) -> None:
    """Resuming must not mix runs: every existing line has this run's model, patient and prompt versions."""
    want = {"model": model, "patient": patient, "prompt_version": _prompt_version()}
    for r in records:
        got = {k: r.get(k) for k in want}
        if got != want:
            raise CacheError(f"{path}: the line of case {r['id']} was written with {got}, this run is {want}; {_HINT}")


def _prompt_version() -> str:
    return f"{prompts.DOCTOR_PROMPT_VERSION}/{prompts.PATIENT_PROMPT_VERSION}"


def run(config, workdir: str) -> list[report.Summary]:
    """Evaluates the configured doctor model in `config.eval.modes`; writes lines, a table and a plot.

    The run holds `{workdir}/eval/<run>.lock` throughout: a second run of the same eval.run fails at once."""
    with io.output_lock(pathlib.Path(workdir) / "eval" / config.eval.run):
        return _run(config, workdir)


def _run(config, workdir: str) -> list[report.Summary]:
    from promed_jax.data import cases_from_config
    from promed_jax.models.loader import load_model

    ev = config.eval
    cases = cases_from_config(config.data, stage="eval")
    model, tokenizer = load_model(config.model)
    weights = provenance.weights_hash(model)
    model_name = provenance.model_label(config.model, weights)
    out_dir = pathlib.Path(workdir) / "eval" / ev.run
    provenance.check_or_write(
        out_dir,
        provenance.make(config, "eval", weights=weights, prompt_version=_prompt_version()),
        has_results=any(path.stat().st_size for path in out_dir.glob("*.jsonl")),
        hint=_HINT,
    )
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
    # The patient that answers, by name: a semantic patient that fell back to fact_select records as such.
    patient_name = getattr(patient, "name", config.patient.kind)

    rows: list[report.Summary] = []
    timings = {}
    for mode in ev.modes:
        t0 = time.monotonic()
        run_doctor, consult_mode, run_model = doctor, mode, model_name
        if mode == RANDOM:
            from promed_jax.training.naive_doctor import RandomDoctor

            run_doctor = RandomDoctor(seed=ev.seed, max_questions=config.consult.max_questions)
            consult_mode, run_model = "proactive", RANDOM_DOCTOR
        records = evaluate_mode(
            cases,
            run_doctor,
            patient,
            out_dir / f"{mode}.jsonl",
            mode=consult_mode,
            batch_size=ev.batch_size,
            max_questions=config.consult.max_questions,
            max_new_tokens=ev.max_new_tokens,
            temperature=ev.temperature,
            model=run_model,
            patient_name=patient_name,
            max_dialogue_tokens=config.sampling.max_dialogue_tokens,
        )
        timings[mode] = time.monotonic() - t0
        rows += report.summarize(mode, records)
    title = f"{model_name}, {len(cases)} cases, patient {patient_name}"
    table_path = report.write_report(out_dir, rows, title=title)
    print(report.markdown_table(rows), end="")
    print("wall time per mode: " + ", ".join(f"{m} {s:.0f}s" for m, s in timings.items()))
    logging.info("eval: wrote %s", table_path)
    return rows

