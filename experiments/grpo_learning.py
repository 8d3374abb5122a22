"""Does SIG-GRPO learn on the synthetic clinic? Stage 2 from one start model, several ways, on many held-out cases.

    python -m promed_jax.main --config=configs/rl.py --workdir=runs/default      # the pipeline, once
    python experiments/grpo_learning.py runs/default --out=runs/learning [--cases 200] [--seeds 0,1]
    python experiments/grpo_learning.py runs/default --out=runs/learning-ws --init=warm_start \
        --set grpo.steps=30 --set grpo.learning_rate=3e-4 --set sampling.temperature=1.0   # issue 12's start

From a finished default pipeline workdir (its Stage 1 model, its warm start and its training cases' Shapley
weights) this runs the rl stage of `configs/rl.py` once per variant and seed, each in a workdir of its own
under `--out` (linked to the pipeline's `shapley/`), from `--init` (the pipeline's Stage 1 model, or its warm
start: the doctor that speaks the protocol but asks without reading the case), with the `--set` overrides
(SECTION.FIELD=VALUE, typed by the entry point's flag parser; each variant's own settings go on top), then evaluates the
start model and every result proactively, greedily, on `--cases` held-out synthetic cases (seed `pipeline.eval_seed`, disjoint from
training's). Variants:

- `sig_grpo`: the method as configured (distributed SIG rewards, Shapley weighting), for every seed;
- `zero_advantage`: the control, every advantage 0 (`grpo.advantage='zero'`: only the KL term acts);
- `outcome_only`: correctness and format rewards only (`grpo.reward='outcome_only'`);
- `uniform`: SIG with uniform fact weights (`shapley.weighting='uniform'`).

Printed, one row per model (and written to `--out/learning.md` and `learning.json`): accuracy with its 95%
interval, the change against the start model in points, mean questions, SIG per question (the held-out cases' own
weights with θ = the warm start, as the pipeline's table), the no-answer share, and the share of questions whose
reply revealed no fact. Every stage resumes: a second call redoes nothing. The run folders are named by
variant and seed only, so give each `--init` / `--set` setting an `--out` of its own.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))  # experiments/ is not an installed package

VARIANTS = {
    "sig_grpo": {},
    "zero_advantage": {"grpo.advantage": "zero"},
    "outcome_only": {"grpo.reward": "outcome_only"},
    "uniform": {"shapley.weighting": "uniform"},
}


def no_fact_share(records) -> float | None:
    """The share of questions whose reply revealed no new fact (over all records' questions)."""
    asked = sum(int(r["n_questions"]) for r in records)
    if not asked:
        return None
    revealing = sum(len({t for t in r["revealed_turn"] if t >= 1}) for r in records)
    return 1.0 - revealing / asked


def _set(config, overrides: dict) -> None:
    with config.unlocked():
        for dotted, value in overrides.items():
            section, field = dotted.split(".")
            config[section][field] = value


def base_config(sets: list[str]):
    """configs/rl.py with the `--set SECTION.FIELD=VALUE` overrides, typed and checked by the entry point's own
    flag parser (`promed_jax.main.parse_args`, as `experiments/sweep.py`'s points are); a bad one exits with
    main's one-line error."""
    from experiments.sweep import parse_set
    from promed_jax.main import parse_args

    try:
        flags = [f"--config.{key}={value}" for key, value in parse_set(sets).items()]
        config, _ = parse_args(["grpo_learning", f"--config={REPO_ROOT / 'configs' / 'rl.py'}", *flags])
    except ValueError as e:  # main's ConfigError is one
        raise SystemExit(f"grpo_learning: --set: {e}") from None
    return config


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pipeline", type=pathlib.Path, help="a finished configs/rl.py pipeline workdir")
    parser.add_argument("--out", type=pathlib.Path, required=True)
    parser.add_argument("--cases", type=int, default=200, help="held-out synthetic cases")
    parser.add_argument("--seeds", default="0,1", help="grpo.seed of the sig_grpo runs")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="which variants (the others: first seed)")
    parser.add_argument(
        "--init", choices=("stage1", "warm_start"), default="stage1", help="the model Stage 2 starts from"
    )
    parser.add_argument(
        "--set", action="append", default=[], metavar="SECTION.FIELD=VALUE", help="a config override, repeatable"
    )
    args = parser.parse_args(argv)

    from promed_jax import pipeline
    from promed_jax.consult.patients import make_patient
    from promed_jax.data.sources import cases_from_config
    from promed_jax.evaluation import report
    from promed_jax.evaluation.evaluate import evaluate_mode
    from promed_jax.main import run_stage

    results = json.loads((args.pipeline / pipeline.OUT / "results.json").read_text())
    warm, stage1 = (pathlib.Path(results["models"][k]) for k in ("warm_start", "stage1"))
    config = base_config(args.set)
    with config.unlocked():
        config.pipeline.eval_cases = args.cases
    args.out.mkdir(parents=True, exist_ok=True)
    seeds = [int(s) for s in args.seeds.split(",")]
    start = stage1 if args.init == "stage1" else warm
    models = {args.init: start}
    for variant in args.variants.split(","):
        for seed in seeds if variant == "sig_grpo" else seeds[:1]:
            name = f"{variant}-seed{seed}"
            workdir = args.out / name
            workdir.mkdir(exist_ok=True)
            link = workdir / "shapley"
            if not link.exists():
                link.symlink_to((args.pipeline / "shapley").resolve(), target_is_directory=True)
            run = pipeline.from_folder(config, warm)
            _set(run, {**VARIANTS[variant], "grpo.seed": seed, "grpo.init_checkpoint": str(start)})
            print(f"grpo_learning: {name}", flush=True)
            models[name] = pathlib.Path(run_stage("rl", run, str(workdir)) or workdir / "rl" / "model")

    cases = cases_from_config(pipeline.heldout_data(config), stage="eval")
    weights = pipeline.heldout_weights(config, str(args.out), warm, cases)
    patient = make_patient(config.patient)
    rows = []
    for name, folder in models.items():
        backend, label = pipeline._backend(config, folder)
        records = evaluate_mode(
            cases,
            backend,
            patient,
            args.out / "eval" / f"{name}.jsonl",
            mode="proactive",
            batch_size=config.eval.batch_size,
            max_questions=config.consult.max_questions,
            max_new_tokens=config.eval.max_new_tokens,
            temperature=config.eval.temperature,
            model=label,
            patient_name=getattr(patient, "name", config.patient.kind),
            max_dialogue_tokens=config.sampling.max_dialogue_tokens,
        )
        s = report.summarize_slice("proactive", "all", records)
        rows.append(
            {
                "model": name,
                "n": s.n,
                "accuracy": s.accuracy,
                "ci95": list(s.ci95),
                "mean_questions": s.mean_questions,
                "sig_per_question": report.sig_per_question(records, weights),
                "no_answer": s.never_answered,
                "no_fact_questions": no_fact_share(records),
            }
        )
    base = rows[0]["accuracy"]
    lines = [
        f"Stage 2 from {start} on {len(cases)} held-out synthetic cases (proactive, greedy)",
        "",
        f"| model | accuracy [95% CI] | vs {args.init} | questions | SIG/question | no answer | no-fact questions |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]

    def pct(x):
        return "–" if x is None else f"{x:.1%}"

    for r in rows:
        sig = "–" if r["sig_per_question"] is None else f"{r['sig_per_question']:.4f}"
        lines.append(
            f"| {r['model']} | {r['accuracy']:.1%} [{r['ci95'][0]:.1%}, {r['ci95'][1]:.1%}] | "
            f"{100 * (r['accuracy'] - base):+.1f} | {r['mean_questions']:.2f} | {sig} | {pct(r['no_answer'])} | "
            f"{pct(r['no_fact_questions'])} |"
        )
    text = "\n".join(lines) + "\n"
    (args.out / "learning.md").write_text(text)
    summary = {"rows": rows, "models": {k: str(v) for k, v in models.items()}}
    (args.out / "learning.json").write_text(json.dumps(summary, indent=1))
    print(text, end="")


if __name__ == "__main__":
    main()
