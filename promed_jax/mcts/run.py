"""The mcts stage: every configured case searched, every finished dialogue exported, the best selected for SFT.

`python -m promed_jax.main --config=configs/mcts.py[:preset] --workdir=DIR` reads the fact weights of the
Shapley cache (`DIR/shapley/`, run the shapley stage first), searches the cases `mcts.batch_trees` at a time
(`trajectories.search_cases`) and appends every finished dialogue of every tree to `DIR/mcts/<source>.jsonl`
when its batch finishes. A killed run resumes at the first unfinished batch: the lines of a batch that was cut
short are removed (each line says its batch and how many lines the batch has), and since every sampled turn's
key is named by (seed, case, simulation, slot) the redone batch writes what the uninterrupted run wrote. At the
end the SFT selection (`mcts.top_k`, `min_reward`, `require_correct`) is written to `DIR/mcts/selected.jsonl`
with its settings in `DIR/mcts/selection.json`. `DIR/mcts/run.json` holds the provenance
(`promed_jax.provenance`).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import time
from collections.abc import Callable, Sequence

import numpy as np
from absl import logging
from tqdm import tqdm

from promed_jax import provenance
from promed_jax.backends.base import ChatBackend, Message
from promed_jax.consult.patients import Patient, make_patient
from promed_jax.data.cases import Case
from promed_jax.errors import CacheError
from promed_jax.io import JsonlWriter, atomic_write_bytes, atomic_write_json, encode_line, output_lock, resume_jsonl
from promed_jax.mcts import trajectories
from promed_jax.mcts.environment import Scorer
from promed_jax.text import prompts

SELECTED = "selected.jsonl"
SELECTION = "selection.json"
_HINT = "use another workdir"


@dataclasses.dataclass(frozen=True)
class Backends:
    """What a search talks to, and the label of the doctor's weights for provenance."""

    doctor: ChatBackend
    patient: Patient
    weights: str
    judge: ChatBackend | None = None
    scorer: Scorer | None = None
    count_tokens: Callable[[Sequence[Message]], int] | None = None


def settings_from_config(config) -> trajectories.SearchSettings:
    m = config.mcts
    return trajectories.SearchSettings(
        policy=m.policy,
        iterations=m.iterations,
        c_uct=m.c_uct,
        max_children=m.max_children,
        decay=m.decay,
        correct_bonus=m.correct_bonus if m.use_correct_bonus else 0.0,
        expansion=m.expansion,
        leaf_value=m.leaf_value,
        temperature=m.temperature,
        max_new_tokens=config.sampling.max_new_tokens,
        max_questions=config.consult.max_questions,
        max_dialogue_tokens=config.sampling.max_dialogue_tokens,
        sig_mode=config.shapley.sig_mode,
        seed=m.seed,
        max_state_bytes=m.max_state_bytes,
    )


def prompt_version() -> str:
    p = prompts
    return f"{p.DOCTOR_PROMPT_VERSION}/{p.PATIENT_PROMPT_VERSION}/{p.SHAPLEY_PROMPT_VERSION}/{p.SIG_PROMPT_VERSION}"


def make_backends(config) -> Backends:
    """The configured doctor (our model, sampling per row key), patient, judge (paper SIG) and eager scorer."""
    from promed_jax.backends import make_backend
    from promed_jax.models.loader import load_model
    from promed_jax.sampling.scorer import score_continuations

    model, tokenizer = load_model(config.model)
    weights = provenance.weights_hash(model)
    rows = config.mcts.batch_trees * (config.mcts.max_children if config.mcts.expansion == "eager" else 1)
    sampling = {**config.sampling.to_dict(), "seed": config.mcts.seed, "max_batch": rows}
    doctor = make_backend("local", sampling, model=model, tokenizer=tokenizer)
    patient_backend = None
    if config.patient.kind == "llm":
        patient_backend = doctor
    elif config.patient.kind == "openai":
        patient_backend = make_backend("openai", config.backend)
    judge = None
    if config.shapley.sig_mode == "paper":
        judge = patient_backend if config.patient.kind == "openai" else doctor
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def scorer(conversations, replies) -> np.ndarray:
        prompts_ = [doctor.encode(c) for c in conversations]
        continuations = [tokenizer(r, add_special_tokens=False)["input_ids"] or [pad] for r in replies]
        return score_continuations(doctor.graphdef, doctor.params, prompts_, continuations, pad_id=pad).means()

    def count_tokens(messages) -> int:
        return len(doctor.encode(messages))

    return Backends(
        doctor=doctor,
        patient=make_patient(config.patient, patient_backend),
        weights=provenance.model_label(config.model, weights),
        judge=judge,
        scorer=scorer if config.mcts.expansion == "eager" else None,
        count_tokens=count_tokens,
    )


def run(config, workdir: str) -> dict[str, pathlib.Path]:
    """Searches every configured case not exported yet; returns the export files by source.

    The stage holds `{workdir}/mcts.lock` throughout: a second run on the workdir fails at once."""
    with output_lock(pathlib.Path(workdir) / "mcts"):
        return run_search(config, workdir)


def run_search(config, workdir: str, backends: Backends | None = None) -> dict[str, pathlib.Path]:
    """The stage's body; `backends` replaces the configured model and patient (tests: scripted doctors)."""
    from promed_jax.data.sources import cases_from_config
    from promed_jax.shapley.cache import load_weights

    cases = cases_from_config(config.data, stage="mcts")
    weights = load_weights(
        workdir, cases, prompt_version=prompts.SHAPLEY_PROMPT_VERSION, weighting=config.shapley.weighting
    )
    backends = backends or make_backends(config)
    settings = settings_from_config(config)
    folder = pathlib.Path(workdir) / "mcts"
    provenance.check_or_write(
        folder,
        provenance.make(config, "mcts", weights=backends.weights, prompt_version=prompt_version()),
        has_results=any(p.stat().st_size for p in folder.glob("*.jsonl") if p.name != SELECTED),
        hint=_HINT,
    )
    by_source: dict[str, list[Case]] = {}
    for case in cases:
        by_source.setdefault(case.source, []).append(case)
    size = config.mcts.batch_trees
    paths = {}
    for source, group in by_source.items():
        path = folder / f"{source}.jsonl"
        paths[source] = path
        batches = [group[i : i + size] for i in range(0, len(group), size)]
        done = finished_batches(path, batches)
        logging.info("mcts: %s: %d cases in %d batches, %d done", source, len(group), len(batches), done)
        with JsonlWriter(path) as writer:
            for k in tqdm(range(done, len(batches)), desc=f"mcts {source}", unit="batch"):
                batch = batches[k]
                t0 = time.monotonic()
                records, stats, _ = trajectories.search_cases(
                    batch,
                    [weights[c.id] for c in batch],
                    backends.doctor,
                    backends.patient,
                    settings,
                    scorer=backends.scorer,
                    judge=backends.judge,
                    count_tokens=backends.count_tokens,
                )
                lines = [r for per_case in records for r in per_case]
                for r in lines:
                    writer.write({**r, "batch": k, "batch_lines": len(lines)})
                logging.info(
                    "mcts: batch %d: %d dialogues, best SIG %s, %.1fs",
                    k,
                    len(lines),
                    [round(s.best_total_sig, 3) for s in stats],
                    time.monotonic() - t0,
                )
    write_selection(config, folder, paths.values())
    for source, path in paths.items():
        print(f"mcts: {source}: {len(by_source[source])} cases -> {path}")
    return paths


def finished_batches(path: pathlib.Path, batches: Sequence[Sequence[Case]]) -> int:
    """How many leading batches the export file holds whole; the lines of a batch cut short are removed.

    Every line must belong to a configured case of its batch, with that case's fingerprint."""
    records = resume_jsonl(path)
    if not records:
        return 0
    where = {case.id: (k, case) for k, batch in enumerate(batches) for case in batch}
    counts: dict[int, int] = {}
    expected: dict[int, int] = {}
    for line, r in enumerate(records, start=1):
        at = f"{path} line {line}"
        trajectories.validate(r, at)
        if not isinstance(r.get("batch"), int) or not isinstance(r.get("batch_lines"), int):
            raise CacheError(f"{at}: field 'batch' / 'batch_lines' missing: not a file this stage wrote; {_HINT}")
        k = r["batch"]
        if r["case_id"] not in where or where[r["case_id"]][0] != k:
            raise CacheError(f"{at}: case {r['case_id']} is not in batch {k} of the configured cases; {_HINT}")
        provenance.check_fingerprint(path, where[r["case_id"]][1], r.get("fingerprint", ""), hint=_HINT)
        counts[k] = counts.get(k, 0) + 1
        expected[k] = r["batch_lines"]
    order = sorted(counts)
    whole = [k for k in order if counts[k] == expected[k]]
    torn = [k for k in order if counts[k] != expected[k]]
    if torn and (len(torn) > 1 or torn[0] != order[-1]):
        raise CacheError(f"{path}: batches {torn} are incomplete and not the last one; the file is corrupt")
    if torn:
        kept = [r for r in records if r["batch"] != torn[0]]
        atomic_write_bytes(path, b"".join(encode_line(r, path) for r in kept))
        logging.info("mcts: %s: dropped %d lines of batch %d, cut short", path, counts[torn[0]], torn[0])
        return torn[0]
    return whole[-1] + 1


def write_selection(config, folder: pathlib.Path, paths) -> pathlib.Path:
    """Selects the dialogues SFT trains on from the export files; writes selected.jsonl and selection.json."""
    m = config.mcts
    selection = trajectories.Selection(top_k=m.top_k, min_reward=m.min_reward, require_correct=m.require_correct)
    records = [r for path in paths if path.exists() for r in trajectories.read_dialogues(path)]
    chosen = trajectories.select(records, selection)
    out = folder / SELECTED
    atomic_write_bytes(out, b"".join(encode_line(r, out) for r in chosen))
    atomic_write_json(
        folder / SELECTION,
        {
            **dataclasses.asdict(selection),
            "files": sorted(str(pathlib.Path(p).name) for p in paths),
            "exported": len(records),
            "selected": len(chosen),
            "cases": len({r["case_id"] for r in chosen}),
        },
    )
    logging.info(
        "mcts: selected %d of %d dialogues: %s", len(chosen), len(records), json.dumps(dataclasses.asdict(selection))
    )
    return out
