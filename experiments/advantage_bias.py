"""How the paper's `token_mean` baseline and the per-dialogue `traj_mean` differ when dialogues have different
numbers of turns (issue 12; verl issue 7244: with a policy that decides when to stop, a baseline over tokens
weighs long dialogues by their length).

On the synthetic clinic with the `fact_select` patient, a scripted doctor asks k questions about findings of
the options' diseases, k drawn uniformly from 1..10 per dialogue, in random order (some reveal a fact, some do
not), and then answers with an option that fits what it heard (chosen at random among those that still fit),
or, with probability `--careless` (0.2), with any option, so that long dialogues can be wrong too.
G = 4 dialogues per case, rendered with the tiny chat template, rewarded as the paper does (`distributed`,
exact SIG), with fact weights either uniform or per case: w = softmax(φ / τ) of the exact Shapley values of
the synthetic game v(S) = log 1 / #{options that fit the facts of S} (the log-probability of the gold option
for a doctor guessing among the options the facts leave).

Reported per weighting, for both advantages: the correlation over dialogues between the number of questions
and the dialogue's mean advantage per doctor token (and its summed advantage, which is what scales the
dialogue's policy-gradient push), the mean advantage of short (1-3 questions) and long (8-10) dialogues
of equal correctness, and the gap between the two baselines per group. Deterministic for a seed; no timing.

Measured with the defaults (200 cases x 4, seed 0; load average ~9 on the shared 2-core machine, which does
not matter here: nothing is timed): 800 dialogues, 5.5 questions on average, accuracy 0.55 for short and 0.82
for long ones, corr(questions, doctor tokens) = 0.99. Uniform weights (per-case ones at τ = 2 are nearly
uniform here, largest w 0.27, and give the same numbers to ±0.005):

    advantage   corr(q, mean A)  corr(q, sum A)   mean A per token: right/short right/long wrong/short wrong/long
    token_mean      -0.179          -0.217                          +0.676      -0.004     -0.528      -0.366
    traj_mean       -0.189          -0.234                          +0.567      -0.034     -0.467      -0.425

- With either baseline, among right answers a short dialogue gets a far larger advantage than a long one
  (summed over its tokens +47 vs −1 for token_mean, +39 vs −7 for traj_mean): the answer turn's tokens earn
  γ + format = 4 each and a question's tokens 1 + 3·SIG ≈ 1.2, so the mean token reward falls with every
  question, and a token-level advantage pays for stopping early. This comes from the per-token reward, not
  from the baseline.
- The baselines differ as expected: token_mean's is the token-weighted mean, pulled towards long dialogues'
  lower mean token reward, 0.031 below traj_mean's on average (std 0.108 over groups; below it in 62% of
  groups). So token_mean lifts every dialogue's advantage by that amount (its mean over dialogues of the mean
  advantage is +0.031, traj_mean's 0 by construction), which favours long dialogues a little per token and,
  summed over their many tokens, most (wrong/long −77 vs −89).

    python experiments/advantage_bias.py [--cases 200] [--seed 0] [--tau 2.0] [--careless 0.2]
"""

from __future__ import annotations

import argparse
import itertools
import os
import pathlib
import re
import sys

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np

from promed_jax import registry
from promed_jax.consult.patients import FactSelectPatient
from promed_jax.consult.rollout import consult, to_rollout
from promed_jax.data import synthetic
from promed_jax.rl import RewardConfig, distributed, turn_arrays
from promed_jax.shapley.estimators import exact
from promed_jax.shapley.weights import shapley_weights
from promed_jax.text.tokenizer import build_tiny_tokenizer

SHORT, LONG = (1, 3), (8, 10)


def finding_question(finding: synthetic.Finding) -> str:
    """A question in the words of the finding's fact (the patient's retrieval is lexical)."""
    return f"Is it true that {finding.fact[0].lower()}{finding.fact[1:].rstrip('.')}?"


QUESTION_TO_FINDING = {finding_question(f): name for name, f in synthetic.FINDINGS.items()}


class RandomLengthDoctor:
    """Plans k ~ U{1..10} questions per dialogue on its first turn, about findings of the options' diseases in
    random order, then answers with a random option among those the replies leave. It reads only the
    conversation; a dialogue is known again by its message list, which the rollout engine extends in place."""

    def __init__(self, seed: int, careless: float):
        self.rng = np.random.default_rng(seed)
        self.careless = careless
        self.plans: dict[int, list[str]] = {}

    def chat(self, conversations, *, max_tokens=256, temperature=0.0, stop=()):
        return [self._turn(c) for c in conversations]

    def _turn(self, conversation) -> str:
        options = dict(re.findall(r"^([A-H]): (.+)$", conversation[0]["content"], re.MULTILINE))
        if len(conversation) == 1:
            findings = sorted(set().union(*(synthetic.DISEASES[d] for d in options.values())))
            k = int(self.rng.integers(1, 11))
            self.plans[id(conversation)] = [findings[i] for i in self.rng.permutation(len(findings))[:k]]
        plan = self.plans[id(conversation)]
        asked = (len(conversation) - 1) // 2
        if asked < len(plan):
            return "question: " + finding_question(synthetic.FINDINGS[plan[asked]])
        present, absent = set(), set()
        for question, reply in zip(conversation[1::2], conversation[2::2], strict=True):
            name = QUESTION_TO_FINDING[question["content"].removeprefix("question: ")]
            (present if reply["content"] == synthetic.FINDINGS[name].fact else absent).add(name)
        alive = [k for k, d in options.items() if synthetic.fits(d, present) and not absent & synthetic.DISEASES[d]]
        if self.rng.random() < self.careless or not alive:
            alive = list(options)
        letter = sorted(alive)[int(self.rng.integers(len(alive)))]
        return f"answer: the findings fit {options[letter]}. 【answer: {letter}】"


def game_weights(case, tau: float) -> np.ndarray:
    """softmax(φ / τ) of v(S) = −log #{options that fit S} (exact enumeration over the case's facts)."""
    findings = [synthetic.FACT_TO_FINDING[f] for f in case.facts]

    def value(coalitions: np.ndarray) -> np.ndarray:
        out = []
        for row in coalitions:
            known = {f for f, inside in zip(findings, row, strict=True) if inside}
            out.append(-np.log(sum(synthetic.fits(d, known) for d in case.options.values())))
        return np.asarray(out)

    phi, _ = exact(value, case.n_facts)
    return shapley_weights(phi, tau=tau)


def per_dialogue(advantages: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    summed = (advantages * mask).sum(axis=1)
    return summed / np.maximum(mask.sum(axis=1), 1), summed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=200)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tau", type=float, default=2.0)
    parser.add_argument("--careless", type=float, default=0.2)
    args = parser.parse_args()

    cases = synthetic.make_cases(args.cases, seed=args.seed)
    dialogues = consult(cases, RandomLengthDoctor(args.seed, args.careless), FactSelectPatient(), samples=args.samples)
    rollout = to_rollout(dialogues, build_tiny_tokenizer())
    questions = rollout.n_questions
    correct = rollout.correct
    mask = rollout.role_mask
    tokens = mask.sum(axis=1)
    print(
        f"{len(dialogues)} dialogues ({args.cases} cases x {args.samples}); questions 1..10, mean "
        f"{questions.mean():.2f}; accuracy {correct.mean():.3f}; doctor tokens per dialogue mean {tokens.mean():.0f}"
        f", corr(questions, tokens) {np.corrcoef(questions, tokens)[0, 1]:.3f}"
    )
    for name, (lo, hi) in (("short", SHORT), ("long", LONG)):
        sel = (questions >= lo) & (questions <= hi)
        print(f"  {name} ({lo}-{hi} questions): {sel.sum()} dialogues, accuracy {correct[sel].mean():.3f}")
    weightings = {
        "uniform": {c.id: np.full(c.n_facts, 1.0 / c.n_facts) for c in cases},
        f"per-case (tau={args.tau})": {c.id: game_weights(c, args.tau) for c in cases},
    }
    for label, weights in weightings.items():
        turns = turn_arrays(rollout, weights)
        rewards, _ = distributed(turns, rollout.turn_ids, mask, correct, config=RewardConfig())
        rewards = np.asarray(rewards)
        top = np.mean([w.max() for w in weights.values()])
        print(f"\nweights {label} (mean largest w {top:.3f}): SIG per question {turns.sig.sum() / questions.sum():.4f}")
        header = "  ".join(f"{c}/{n}" for c, n in itertools.product(("right", "wrong"), ("short", "long")))
        print(f"  {'advantage':<11} {'corr(q, mean A)':>15} {'corr(q, sum A)':>14}  mean A per token, {header}:")
        baselines = {}
        for estimator in ("token_mean", "traj_mean"):
            advantages, _ = registry.get("rl.advantage", estimator)(rewards, mask, rollout.group)
            advantages = np.asarray(advantages)
            # the baseline, read back at each dialogue's first doctor token: reward - advantage
            first = mask.argmax(axis=1)
            rows = np.arange(len(dialogues))
            baselines[estimator] = rewards[rows, first] - advantages[rows, first]
            mean_a, sum_a = per_dialogue(advantages, mask)
            cells, sums = [], []
            for right, (lo, hi) in itertools.product((True, False), (SHORT, LONG)):
                sel = (correct == right) & (questions >= lo) & (questions <= hi)
                cells.append(f"{mean_a[sel].mean():+.3f} ({sel.sum()})" if sel.any() else "n/a")
                sums.append(f"{sum_a[sel].mean():+.1f}" if sel.any() else "n/a")
            print(
                f"  {estimator:<11} {np.corrcoef(questions, mean_a)[0, 1]:>15.3f} "
                f"{np.corrcoef(questions, sum_a)[0, 1]:>14.3f}  " + "  ".join(f"{c:>13}" for c in cells)
            )
            print(f"  {'':<11} summed A per dialogue, same cells: " + "  ".join(sums))
            print(f"  {'':<11} mean over dialogues of the mean A per token: {mean_a.mean():+.4f}")
        gap = (baselines["token_mean"] - baselines["traj_mean"])[np.unique(rollout.group, return_index=True)[1]]
        print(
            f"  baseline token_mean - traj_mean per group: mean {gap.mean():+.4f}, std {gap.std():.4f}, "
            f"share of groups where it is below 0: {(gap < 0).mean():.3f}"
        )
    print(f"\nload average (1, 5, 15 min): {os.getloadavg()}")


if __name__ == "__main__":
    main()
