"""mode='pipeline': the whole of ProMed in one workdir, then a six-doctor evaluation (`configs/rl.py`).

Stages, in order, each resumable under the workdir (a second run skips what is done):

1. `data`: the data statistics;
2. `warm_start` (`training.warm_start`): a model that speaks the protocol and knows the medicine; with
   `pipeline.init_checkpoint` that folder is used instead. Every later stage's `model` section is this
   folder (`model.kind='hf'`), so it is θ of the Shapley game and the policy MCTS samples from;
3. `shapley`: φ and w of the training cases with θ = the warm start;
4. `mcts`: Stage 1's search; `sft`: Stage 1's fine-tuning of the warm start on the selected dialogues
   (`{workdir}/mcts/selected.jsonl`; when the search selected none, Stage 1 is the warm start, with a warning).
   `pipeline.stage1=False` (the "no Stage 1" ablation) skips both: Stage 1 is the warm start;
5. `rl`: Stage 2 (SIG-GRPO) from Stage 1's model;
6. the evaluation (`evaluate`): the doctors of `DOCTORS` on held-out cases (the synthetic clinic's cases of
   `pipeline.eval_seed`, disjoint from training's `data.synthetic_seed`, or the first `pipeline.eval_cases` of
   the files' test split), greedy per the `eval` section. SIG per question uses the held-out cases' own
   Shapley weights with θ = the warm start (`{workdir}/pipeline/heldout/shapley/`).

Stage folders are keyed by their inputs. `{workdir}/<stage>` (warm_start, shapley, mcts, sft) is a link to
`{share}/<stage>-<key>`, where `share` is `pipeline.share_dir` ('' = `{workdir}/stages`) and the key is a hash
of the stage's provenance fields (`promed_jax.provenance.STAGE_FIELDS`), the data section and the upstream
stage's key (`stage_key`). A stage whose inputs changed gets a new folder and is redone, never reused; sweep
points that share a `share_dir` (`experiments/sweep.py` gives them one) share every stage upstream of their
first changed setting, so five ablations of Stage 2 run the warm start once. Stage 2 and the evaluation stay
in the point's own workdir. Points that share a folder must not run at the same time (a stage's lock is per
workdir).

Outputs in `{workdir}/pipeline/`: `eval/<doctor>.jsonl` (one line per case, appended as produced, resumed),
`results.json` (rows and run facts: wall time, seconds per stage in this run, seed, preset, the weights'
spread), `results.md` and `accuracy_vs_questions.png`.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import pathlib
import time
from collections.abc import Mapping, Sequence

import numpy as np
from absl import logging

from promed_jax import io, provenance
from promed_jax.errors import CheckpointError, WorkdirError

OUT = "pipeline"
SELECTED = pathlib.Path("mcts") / "selected.jsonl"
SHARED = ("warm_start", "shapley", "mcts", "sft")
# Fields left out of a key: paths into a workdir (the upstream key stands for what they hold).
_NOT_KEYED = ("sft.dialogues",)


@dataclasses.dataclass(frozen=True)
class Doctor:
    """One row of the evaluation: who consults (a trained model of the pipeline, or the scripted random-N
    doctor) and in which mode."""

    name: str
    label: str
    model: str  # 'warm_start' | 'stage1' | 'promed' | 'random'
    mode: str


DOCTORS = (
    Doctor("reactive", "warm start, reactive (the reactive paradigm)", "warm_start", "reactive"),
    Doctor("warm_start", "warm start, proactive", "warm_start", "proactive"),
    Doctor("stage1", "Stage 1 (MCTS + SFT), proactive", "stage1", "proactive"),
    Doctor("promed", "ProMed (Stage 1 + 2), proactive", "promed", "proactive"),
    Doctor("random10", "random-N doctor (asks the protocol's limit)", "random", "proactive"),
    Doctor("full", "ProMed, full information", "promed", "full"),
    Doctor("warm_start_full", "warm start, full information (knows the table?)", "warm_start", "full"),
)
ROW_FIELDS = (
    "doctor",
    "label",
    "mode",
    "n",
    "correct",
    "accuracy",
    "ci95",
    "mean_questions",
    "sig_per_question",
    "no_answer",
)


def model_folder(path: str) -> pathlib.Path:
    """A Hugging Face folder (config.json), or a workdir / stage folder holding one in `model/`."""
    p = pathlib.Path(path).expanduser()
    for folder in (p, p / "model", p / "warm_start" / "model"):
        if (folder / "config.json").is_file():
            return folder
    raise CheckpointError(f"config pipeline.init_checkpoint={path!r}: no Hugging Face folder (config.json) there")


def from_folder(config, folder: pathlib.Path):
    """A copy of `config` whose `model` section is the Hugging Face folder (LoRA and numerics kept)."""
    out = copy.deepcopy(config)
    with out.unlocked():
        out.model.kind = "hf"
        out.model.path = str(folder)
    return out


def stage_key(config, stage: str, upstream: str) -> str:
    """16 hex digits of the stage's inputs: its provenance fields, the data section, the upstream key."""
    fields = {k: v for k, v in provenance.stage_config(config, stage).items() if k not in _NOT_KEYED}
    if stage == "sft":  # what MCTS selects for SFT
        fields["mcts"] = config.mcts.to_dict()
    blob = json.dumps(
        {"stage": stage, "fields": fields, "data": config.data.to_dict(), "upstream": upstream},
        sort_keys=True,
        default=list,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def place(config, workdir: str, stage: str, key: str) -> pathlib.Path:
    """Links `{workdir}/<stage>` to the keyed folder (made if absent) and returns the folder."""
    share = pathlib.Path(config.pipeline.share_dir or pathlib.Path(workdir) / "stages").expanduser().absolute()
    target = share / f"{stage}-{key}"
    target.mkdir(parents=True, exist_ok=True)
    link = pathlib.Path(workdir) / stage
    if link.is_symlink():
        if link.resolve() != target.resolve():
            logging.info("pipeline: %s's inputs changed: %s -> %s", stage, link.resolve().name, target.name)
            link.unlink()
    elif link.exists():
        raise WorkdirError(
            f"{link} is a folder, not the pipeline's link to its keyed stage folder (a stage run alone wrote it); "
            "use another workdir"
        )
    if not link.is_symlink():
        link.symlink_to(target, target_is_directory=True)
    return target


def heldout_data(config):
    """The `data` section of the held-out evaluation cases (module doc)."""
    data = copy.deepcopy(config.data)
    with data.unlocked():
        if data.kind == "synthetic":
            data.synthetic_n = config.pipeline.eval_cases
            data.synthetic_seed = config.pipeline.eval_seed
            data.split = "all"
        else:
            data.split = "test"
            data.limit = config.pipeline.eval_cases
    return data


def run(config, workdir: str) -> dict:
    """Runs every stage and the evaluation; returns results.json's content."""
    from promed_jax.main import run_stage

    t0 = time.monotonic()
    seconds: dict[str, float] = {}

    def timed(name, fn, *args):
        logging.info("pipeline: stage %s", name)
        start = time.monotonic()
        out = fn(*args)
        seconds[name] = round(time.monotonic() - start, 1)
        return out

    given = model_folder(config.pipeline.init_checkpoint) if config.pipeline.init_checkpoint else None
    timed("data", run_stage, "data", config, workdir)
    if given is not None:
        warm = given.resolve()
        key = hashlib.sha256(str(warm).encode()).hexdigest()[:16]
        logging.info("pipeline: warm start given: %s", warm)
    else:
        from promed_jax.training import warm_start

        key = stage_key(config, "warm_start", "")
        place(config, workdir, "warm_start", key)
        warm = pathlib.Path(timed("warm_start", warm_start.run, config, workdir)).resolve()
    staged = from_folder(config, warm)
    key = stage_key(staged, "shapley", key)
    place(config, workdir, "shapley", key)
    timed("shapley", run_stage, "shapley", staged, workdir)
    stage1 = warm
    if config.pipeline.stage1:
        key = stage_key(staged, "mcts", key)
        place(config, workdir, "mcts", key)
        timed("mcts", run_stage, "mcts", staged, workdir)
    else:
        logging.info("pipeline: pipeline.stage1=False: no MCTS, no SFT; Stage 2 starts from the warm start")
    selected = (pathlib.Path(workdir) / SELECTED).resolve()  # the keyed folder's path: the same for every point
    if config.pipeline.stage1 and selected.is_file() and selected.stat().st_size:
        sft = copy.deepcopy(staged)
        with sft.unlocked():
            sft.sft.source = "files"
            sft.sft.dialogues = (str(selected),)
        place(config, workdir, "sft", stage_key(sft, "sft", key))
        stage1 = pathlib.Path(timed("sft", run_stage, "sft", sft, workdir)).resolve()
    elif config.pipeline.stage1:
        logging.warning("pipeline: MCTS selected no dialogue (%s); Stage 1 is the warm start", selected)
    rl = copy.deepcopy(staged)
    with rl.unlocked():
        rl.grpo.init_checkpoint = str(stage1)
    promed = timed("rl", run_stage, "rl", rl, workdir) or pathlib.Path(workdir) / "rl" / "model"
    models = {"warm_start": warm, "stage1": stage1, "promed": promed}
    rows = timed("eval", evaluate, config, workdir, models)
    results = {
        "rows": rows,
        "wall_s": round(time.monotonic() - t0, 1),
        "stage_seconds": seconds,
        "seed": {"data": config.data.synthetic_seed, "eval": config.pipeline.eval_seed, "model": config.model.seed},
        "preset": config.preset,
        "models": {k: str(v) for k, v in models.items()},
        "weights": weights_summary(staged, workdir),
    }
    write_results(pathlib.Path(workdir) / OUT, results)
    print(markdown(results), end="")
    return results


def _backend(config, folder: pathlib.Path):
    """(the greedy local doctor of `folder`, its label for the result lines)."""
    from promed_jax import provenance
    from promed_jax.backends import make_backend
    from promed_jax.models.loader import load_model

    model, tokenizer = load_model(from_folder(config, folder).model)
    ev = config.eval
    sampling = {
        **config.sampling.to_dict(),
        "repetition_penalty": ev.repetition_penalty,
        "no_repeat_ngram_size": ev.no_repeat_ngram_size,
        "seed": ev.seed,
        "max_batch": ev.batch_size,
    }
    label = provenance.model_label(from_folder(config, folder).model, provenance.weights_hash(model))
    return make_backend("local", sampling, model=model, tokenizer=tokenizer), label


def heldout_weights(config, workdir: str, folder: pathlib.Path, cases) -> dict[str, np.ndarray]:
    """Shapley weights of the held-out cases with θ = `folder` (the shapley stage on a workdir of their own)."""
    from promed_jax.shapley import run as shapley_run
    from promed_jax.shapley.cache import load_weights

    held = from_folder(config, folder)
    with held.unlocked():
        held.data = heldout_data(config)
    where = str(pathlib.Path(workdir) / OUT / "heldout")
    shapley_run.run(held, where)
    return load_weights(where, cases)


def evaluate(config, workdir: str, models: Mapping[str, pathlib.Path]) -> list[dict]:
    """The rows of `DOCTORS` (the random-N doctor on the synthetic clinic only)."""
    from promed_jax.consult.patients import make_patient
    from promed_jax.data.sources import cases_from_config
    from promed_jax.evaluation import report
    from promed_jax.evaluation.evaluate import RANDOM_DOCTOR, evaluate_mode

    cases = cases_from_config(heldout_data(config), stage="eval")
    weights = heldout_weights(config, workdir, models["warm_start"], cases)
    patient = make_patient(config.patient)
    patient_name = getattr(patient, "name", config.patient.kind)
    out = pathlib.Path(workdir) / OUT / "eval"
    out.mkdir(parents=True, exist_ok=True)
    backends: dict[str, tuple] = {}
    rows = []
    for doctor in DOCTORS:
        if doctor.model == "random":
            if config.data.kind != "synthetic":
                continue  # the random-N doctor asks about the clinic's table
            from promed_jax.training.naive_doctor import RandomDoctor

            backend, label = (
                RandomDoctor(seed=config.eval.seed, max_questions=config.consult.max_questions),
                RANDOM_DOCTOR,
            )
        else:
            folder = models[doctor.model]
            if str(folder) not in backends:
                backends[str(folder)] = _backend(config, folder)
            backend, label = backends[str(folder)]
        logging.info("pipeline: evaluating %s on %d held-out cases", doctor.name, len(cases))
        records = evaluate_mode(
            cases,
            backend,
            patient,
            out / f"{doctor.name}.jsonl",
            mode=doctor.mode,
            batch_size=config.eval.batch_size,
            max_questions=config.consult.max_questions,
            max_new_tokens=config.eval.max_new_tokens,
            temperature=config.eval.temperature,
            model=label,
            patient_name=patient_name,
            max_dialogue_tokens=config.sampling.max_dialogue_tokens,
        )
        summary = report.summarize_slice(doctor.mode, "all", records)
        rows.append(
            {
                "doctor": doctor.name,
                "label": doctor.label,
                "mode": doctor.mode,
                "n": summary.n,
                "correct": sum(bool(r["correct"]) for r in records),
                "accuracy": summary.accuracy,
                "ci95": list(summary.ci95),
                "mean_questions": summary.mean_questions,
                "sig_per_question": report.sig_per_question(records, weights),
                "no_answer": summary.never_answered,
            }
        )
    return rows


def weights_summary(config, workdir: str) -> dict:
    """Do the training cases' weights see the medicine (`evaluation.weights_report`): the share of synthetic
    cases whose top-weight fact separates the options the complaint leaves alive, and w's max/min per case
    at the configured τ and smaller ones."""
    from promed_jax.data.sources import cases_from_config
    from promed_jax.evaluation import weights_report
    from promed_jax.shapley import cache

    cases = cases_from_config(config.data, stage="shapley")
    records = {}
    for source in dict.fromkeys(c.source for c in cases):
        records.update(cache.read_cache(cache.cache_path(workdir, source)))
    taus = sorted({float(config.shapley.tau), 1.0, 0.5, 0.1}, reverse=True)
    r = weights_report.report(cases, records, taus)
    return {
        "cases": r.cases,
        "separating_first": r.separating_first,
        "separating_by_chance": r.chance,
        "spread": {f"{tau:g}": {"min": lo, "median": mid, "max": hi} for tau, (lo, mid, hi) in r.spread.items()},
    }


def markdown(results: Mapping) -> str:
    lines = [
        "| doctor | mode | n | accuracy | 95% interval | questions | SIG per question | no answer |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results["rows"]:
        sig = "–" if r["sig_per_question"] is None else f"{r['sig_per_question']:.3f}"
        lines.append(
            f"| {r['doctor']} | {r['mode']} | {r['n']} | {r['accuracy']:.1%} | {r['ci95'][0]:.1%}–{r['ci95'][1]:.1%} "
            f"| {r['mean_questions']:.2f} | {sig} | {r['no_answer']:.1%} |"
        )
    stages = ", ".join(f"{k} {v:.0f}s" for k, v in results["stage_seconds"].items())
    lines += ["", f"preset {results['preset']}, wall time {results['wall_s']:.0f}s ({stages})"]
    w = results.get("weights") or {}
    if w.get("separating_first") is not None:
        lines.append(
            f"training weights: the top-weight fact separates the live options in {w['separating_first']:.1%} of "
            f"{w['cases']} cases (a fact at random: {w['separating_by_chance']:.1%})"
        )
    for tau, spread in (w.get("spread") or {}).items():
        lines.append(
            f"w max/min at τ = {tau}: median {spread['median']:.2f} (range {spread['min']:.2f}–{spread['max']:.2f})"
        )
    return "\n".join(lines) + "\n"


def plot(rows: Sequence[Mapping], path: pathlib.Path) -> None:
    """Accuracy (with its 95% interval) against questions asked, one point per doctor."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4.5))
    ax = fig.subplots()
    for r in rows:
        acc, (low, high) = 100 * r["accuracy"], r["ci95"]
        ax.errorbar(
            r["mean_questions"], acc, yerr=[[acc - 100 * low], [100 * high - acc]], fmt="o", capsize=3, markersize=7
        )
        ax.annotate(r["doctor"], (r["mean_questions"], acc), textcoords="offset points", xytext=(6, 4))
    ax.set_xlabel("mean questions asked")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_xlim(-0.5, max([10.5] + [r["mean_questions"] + 0.5 for r in rows]))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with io.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)


def write_results(out: pathlib.Path, results: Mapping) -> None:
    out.mkdir(parents=True, exist_ok=True)
    io.atomic_write_text(out / "results.json", json.dumps(results, indent=2) + "\n")
    io.atomic_write_text(out / "results.md", markdown(results))
    plot(results["rows"], out / "accuracy_vs_questions.png")
