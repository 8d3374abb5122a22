"""The patients on the hand-written natural question sets: tuning the semantic patient, reporting both, timing.

  python experiments/patient_questions.py tune      # grid over the hybrid weights on the TUNE set only
  python experiments/patient_questions.py report    # fact_select vs semantic (config defaults) on every set
  python experiments/patient_questions.py speed     # 64 questions answered, warm, medians of 5
  python experiments/patient_questions.py curve     # the threshold trade-off at the config weights, every set

`tune` prints the best grid points by the smallest margin over the issue's floors (returned >= 0.85, first
>= 0.75, other <= 0.15, cannot-answer >= 0.90), then the total of the four shares; it never reads the test
set. `report` prints, per set and patient, the shares of `promed_jax.consult.question_sets.score`, and what
the broad questions got. `curve` chooses nothing: at the config weights it prints, per English set, the four
shares at each threshold and two threshold-free numbers (the AUC of the target fact's score against an
unanswerable question's best score, and the share of targeted questions whose target ranks first), so that
one sees whether any threshold could meet all four floors. `speed` needs no torch: the PyTorch way has no patient to compare with, so the
numbers are absolute; the load average is printed beside them.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import pathlib
import statistics
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from configs import base
from promed_jax.consult import patients as PT
from promed_jax.consult import question_sets as QS
from promed_jax.consult import retrieval as R
from promed_jax.consult.patients import PatientRequest
from promed_jax.data.cases import load_cases

DATA = pathlib.Path(os.environ.get("PROMED_DATA", ROOT.parent / "shared" / "data"))
SETS = {s: ROOT / "tests" / "data" / f"natural_questions_{s}.jsonl" for s in ("tune", "test", "zh")}
FLOORS = (0.85, 0.75, 0.15, 0.90)


def cases() -> dict:
    files = ("medqa_dev_convo.jsonl", "cmb_atomic_patient_train.json")
    return {c.id: c for f in files for c in load_cases(DATA / f, on_error="skip")}


def semantic() -> R.SemanticPatient:
    return PT.make_patient(base.get_config().patient)


class _Reply:
    def __init__(self, facts):
        self.facts = facts


def tune() -> None:
    all_cases = cases()
    questions = QS.load_questions(SETS["tune"])
    patient = semantic()
    requests = [PatientRequest(all_cases[q.case], q.question) for q in questions]
    feats = patient.features(requests)
    allowed = [patient.admissible(r) for r in requests]
    w0 = patient.weights
    rows = []
    # A first, wider grid (contrast 0-1.5, hub 0-2, lexical 0-1.2, margin 0.05-0.2) peaked inside this one.
    grid = itertools.product([0.5, 1.0, 1.5], [0.5, 1.0, 1.5], [0.6, 0.8, 1.0], [0.1])
    for contrast, hub, lexical, margin in grid:
        w = R.HybridWeights(contrast, hub, lexical, 0.0, margin, w0.max_facts, w0.zh_threshold)
        scores = [np.where(a, R.hybrid_scores(c, h, x, w), -np.inf) for (c, h, x), a in zip(feats, allowed)]
        for threshold in np.arange(-0.4, 1.2, 0.02):
            t = R.HybridWeights(contrast, hub, lexical, float(threshold), margin, w0.max_facts, w0.zh_threshold)
            s = QS.score(questions, [_Reply(R.select(sc, t)) for sc in scores])
            shares = (s.returned, s.first, s.other, s.cannot_answer)
            slack = min(shares[0] - FLOORS[0], shares[1] - FLOORS[1], FLOORS[2] - shares[2], shares[3] - FLOORS[3])
            rows.append((round(slack, 3), round(shares[0] + shares[1] - shares[2] + shares[3], 3), shares, t))
    rows.sort(key=lambda r: (r[0], r[1]), reverse=True)
    for slack, total, shares, t in rows[:15]:
        print(f"slack {slack:+.3f} total {total:.3f} shares {np.round(shares, 3)} {t}")


def report() -> None:
    all_cases = cases()
    patients = {"fact_select": PT.FactSelectPatient(), "semantic": semantic()}
    for split, path in SETS.items():
        questions = QS.load_questions(path)
        for name, patient in patients.items():
            s = QS.score(questions, QS.ask_all(patient, questions, all_cases))
            print(
                f"{split:5s} {name:11s} returned {s.returned:.3f} first {s.first:.3f} other {s.other:.3f} "
                f"cannot_answer {s.cannot_answer:.3f} | broad answered {s.broad_answered:.3f} "
                f"facts/broad {s.broad_facts:.2f} (n = {s.n_targeted}/{s.n_unanswerable}/{s.n_broad})"
            )


def curve() -> None:
    all_cases = cases()
    patient = semantic()
    w = patient.weights
    for split in ("tune", "test"):
        questions = [q for q in QS.load_questions(SETS[split]) if q.kind != "broad"]
        scores = patient.scores([PatientRequest(all_cases[q.case], q.question) for q in questions])
        target = np.array([s[q.fact] for q, s in zip(questions, scores) if q.kind == "targeted"])
        rejected = np.array([s.max() for q, s in zip(questions, scores) if q.kind == "unanswerable"])
        auc = (target[:, None] > rejected[None]).mean() + 0.5 * (target[:, None] == rejected[None]).mean()
        top = np.mean([int(np.argmax(s)) == q.fact for q, s in zip(questions, scores) if q.kind == "targeted"])
        print(f"{split}: AUC target vs unanswerable-best {auc:.3f}; target ranked first {top:.3f}")
        for threshold in np.arange(0.30, 0.70, 0.04):
            t = dataclasses.replace(w, threshold=float(threshold))
            s = QS.score(questions, [_Reply(R.select(sc, t)) for sc in scores])
            print(
                f"  threshold {threshold:.2f}: returned {s.returned:.3f} first {s.first:.3f} other {s.other:.3f} "
                f"cannot_answer {s.cannot_answer:.3f}"
            )


def speed() -> None:
    all_cases = cases()
    questions = [q for q in QS.load_questions(SETS["tune"]) if q.kind != "broad"][:64]
    requests = [PatientRequest(all_cases[q.case], q.question) for q in questions]
    patient = semantic()
    t0 = time.perf_counter()
    patient.reply(requests)  # compiles the buckets and caches these cases' fact vectors
    cold = time.perf_counter() - t0
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        patient.reply(requests)
        times.append(time.perf_counter() - t0)
    print(
        f"64 questions over {len({q.case for q in questions})} cases: first call (compile + fact vectors) "
        f"{cold:.2f} s; warm median of 5 {statistics.median(times) * 1e3:.0f} ms "
        f"(min {min(times) * 1e3:.0f}, max {max(times) * 1e3:.0f}); load average {os.getloadavg()}"
    )


if __name__ == "__main__":
    {"tune": tune, "report": report, "curve": curve, "speed": speed}[sys.argv[1] if len(sys.argv) > 1 else "report"]()
