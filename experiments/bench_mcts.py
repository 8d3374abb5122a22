"""MCTS search cost: B = 1 case at a time against B = 32 cases searched together, and tree statistics.

For each doctor (the random tiny model, SmolLM2-135M-Instruct from its GGUF), on the synthetic clinic with the
fact_select patient and uniform fact weights (the cost does not depend on the weights), `mcts.iterations` = 5
(the paper's), 8 slots, lazy expansion, zero leaf value (one sampler call per simulation; the stage's
default `rollout` adds the rollouts' turns, batched across trees the same way):
  * search wall time per case and LLM calls per case (sampler calls, doctor turns, patient calls and replies) at
    B = 1 (median over `--reps` cases, each searched alone) and at B = 32 (median over `--reps32` batches), after
    a warm-up search at each B whose extra time is reported apart as compile time;
  * tree statistics at B = 32: nodes, depth, finished and distinct dialogues, best total SIG.
Then the scripted candidate doctor (`promed_jax.mcts.testing`, candidates cycled over a node's slots) on 32
synthetic cases: the best total SIG and discounted return the search exported against the best of the whole
candidate tree (exhaustive enumeration), at 5 and 50 simulations.
There is no PyTorch counterpart of the search; the goals are ratios within this run (B = 32 per case against
B = 1: <= 1/8 for the tiny model, <= 1/2 for SmolLM2). The load average is printed beside the numbers.

    python experiments/bench_mcts.py                     # both models (SmolLM2: several minutes)
    python experiments/bench_mcts.py --models tiny --reps 2
    python experiments/bench_mcts.py --quick --json out.json   # experiments/run_benchmarks.py's size

`--quick`: the tiny model only, 16 new tokens per turn, B = 8 against B = 1 (5 searches each), and the scripted
doctor at 5 simulations only.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import sys
import time

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np

from configs import mcts as mcts_config
from experiments.bench_json import result_row, write_results
from promed_jax.backends import make_backend
from promed_jax.consult.patients import FactSelectPatient
from promed_jax.data import synthetic
from promed_jax.mcts import trajectories
from promed_jax.mcts.testing import CandidateDoctor, exhaustive_best
from promed_jax.models.loader import load_model

PRESETS = {"tiny": "tiny", "smollm": "smollm"}


class Counted:
    """A doctor that counts its sampler calls."""

    def __init__(self, doctor):
        self.doctor, self.calls = doctor, 0

    def chat(self, conversations, **kw):
        self.calls += 1
        return self.doctor.chat(conversations, **kw)


class CountedPatient(FactSelectPatient):
    def __init__(self):
        super().__init__()
        object.__setattr__(self, "calls", 0)

    def reply(self, requests):
        object.__setattr__(self, "calls", self.calls + 1)
        return super().reply(requests)


def load(preset: str, batch: int):
    config = mcts_config.get_config(preset)
    model, tokenizer = load_model(config.model)
    sampling = {**config.sampling.to_dict(), "seed": 0, "max_batch": batch}
    return make_backend("local", sampling, model=model, tokenizer=tokenizer)


def timed_search(cases, doctor, settings):
    counted, patient = Counted(doctor), CountedPatient()
    weights = [np.full(c.n_facts, 1.0 / c.n_facts) for c in cases]
    t0 = time.perf_counter()
    _records, stats, env = trajectories.search_cases(cases, weights, counted, patient, settings)
    wall = time.perf_counter() - t0
    n = len(cases)
    calls = {
        "sampler_calls": counted.calls / n,
        "doctor_turns": sum(c.doctor_turns for c in env.calls) / n,
        "patient_calls": patient.calls / n,
        "patient_replies": sum(c.patient_replies for c in env.calls) / n,
    }
    return wall / n, calls, stats


def bench_model(name: str, args) -> list[dict]:
    settings = trajectories.SearchSettings(
        iterations=5, max_children=8, max_new_tokens=args.new_tokens, seed=0, leaf_value="zero"
    )
    t0 = time.perf_counter()
    big = args.batch
    doctor = load(PRESETS[name], big)
    print(f"\n## {name}: load {time.perf_counter() - t0:.1f}s; {args.new_tokens} new tokens per turn, 5 simulations")
    cases = synthetic.make_cases(1 + args.reps + big * (1 + args.reps32), seed=7)
    rows, out = {}, []
    for batch, reps in ((1, args.reps), (big, args.reps32)):
        pool = cases[: 1 + reps] if batch == 1 else cases[1 + args.reps :]
        groups = [pool[i * batch : (i + 1) * batch] for i in range(1 + reps)]
        first, _, _ = timed_search(groups[0], doctor, settings)
        measured = [timed_search(g, doctor, settings) for g in groups[1:]]
        per_case = statistics.median(m[0] for m in measured)
        rows[batch] = (per_case, measured[0][1], measured[-1][2])
        compile_s = (first - per_case) * batch
        out.append(
            result_row(
                f"MCTS search {name}, B = {batch}", "s/case", per_case, None, better="lower", compile_s=compile_s
            )
        )
        print(
            f"B={batch:2d}: {per_case:.3f} s/case (median of {reps} searches of {batch} cases; warm-up search "
            f"{first * batch:.1f}s, compile ~{compile_s:.1f}s); per case: "
            + ", ".join(f"{k} {v:.3g}" for k, v in measured[0][1].items())
            + f"; load {os.getloadavg()[0]:.1f}"
        )
    ratio = rows[big][0] / rows[1][0]
    goal = 1 / 8 if name == "tiny" else 1 / 2
    print(
        f"per-case wall B={big} / B=1: {ratio:.3f} (goal at B=32 <= {goal:.3g}: "
        f"{'met' if ratio <= goal else 'NOT met'})"
    )
    stats = rows[big][2]
    print(
        f"trees at B={big}: nodes {np.mean([s.nodes for s in stats]):.1f}, depth mean {np.mean([s.depth for s in stats]):.2f} max {max(s.depth for s in stats)}, dialogues {np.mean([s.dialogues for s in stats]):.1f}, distinct {np.mean([s.distinct for s in stats]):.1f}, best SIG mean "
        f"{np.mean([s.best_total_sig for s in stats]):.3f}"
    )
    return out


def bench_exhaustive(simulations: tuple[int, ...]) -> None:
    cases = synthetic.make_cases(32, seed=11)
    rng = np.random.default_rng(0)
    weights = [rng.dirichlet(np.ones(c.n_facts)) for c in cases]
    print("\n## scripted candidate doctor (2 questions + 1 answer per state), 32 synthetic cases, 2 questions max")
    for iterations in simulations:
        settings = trajectories.SearchSettings(iterations=iterations, max_children=8, max_questions=2)
        doctor, patient = CandidateDoctor(width=2, pick="cycle"), FactSelectPatient()
        t0 = time.perf_counter()
        records, stats, _ = trajectories.search_cases(cases, weights, doctor, patient, settings)
        wall = time.perf_counter() - t0
        sig_ratio, ret_ratio, at_sig, at_ret = [], [], 0, 0
        for case, w, mine in zip(cases, weights, records, strict=True):
            most_sig, best_ret = exhaustive_best(case, w, doctor, patient, settings.max_questions)
            got_sig = max((r["total_sig"] for r in mine), default=0.0)
            got_ret = max((r["return"] for r in mine), default=0.0)
            sig_ratio.append(got_sig / most_sig if most_sig else 1.0)
            ret_ratio.append(got_ret / best_ret if best_ret else 1.0)
            at_sig += abs(got_sig - most_sig) < 1e-9
            at_ret += abs(got_ret - best_ret) < 1e-9
        print(
            f"{iterations:3d} simulations: best SIG / exhaustive {np.mean(sig_ratio):.3f} (at the optimum "
            f"{at_sig}/32), best return / exhaustive {np.mean(ret_ratio):.3f} ({at_ret}/32); depth max "
            f"{max(s.depth for s in stats)}, distinct dialogues {np.mean([s.distinct for s in stats]):.1f}; "
            f"{wall:.1f}s with compile; load {os.getloadavg()[0]:.1f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny,smollm")
    parser.add_argument("--reps", type=int, default=5, help="B=1 searches measured per model")
    parser.add_argument("--reps32", type=int, default=0, help="B=32 searches measured (default 5 tiny, 1 smollm)")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32, help="trees searched together, against B = 1")
    parser.add_argument("--quick", action="store_true", help="the smoke size (see the module docstring)")
    parser.add_argument("--json", type=pathlib.Path, help="also write the results here (experiments/bench_json.py)")
    args = parser.parse_args()
    if args.quick:
        args.models, args.new_tokens, args.batch, args.reps32 = "tiny", 16, 8, args.reps
    import jax

    print(f"load average (1, 5, 15 min): {os.getloadavg()}; cpus: {os.cpu_count()}; jax {jax.__version__}")
    bench_exhaustive((5,) if args.quick else (5, 50, 200))
    results = []
    for name in args.models.split(","):
        model_args = argparse.Namespace(**vars(args))
        if not args.reps32:
            model_args.reps32 = 5 if name == "tiny" else 1
        if name == "smollm" and args.reps > 3:
            model_args.reps = 3
        results += bench_model(name, model_args)
    write_results(args.json, "bench_mcts", results, reps=args.reps)


if __name__ == "__main__":
    main()
