"""Do the Shapley weights see the medicine? Two numbers per set of weights (issue 14's report).

- **Separating finding first.** On the synthetic clinic the generator knows the table. Given the initial
  information (the complaint), the options still alive are those whose disease has the complaint; a fact
  *separates* them when it is a finding of the gold disease that at least one of those alive options lacks
  (asking about it rules an option out). `separating_first` is the share of cases whose highest-weight fact
  separates (ties: every fact sharing the top weight must separate). Cases where no fact separates (never
  for the generator: the gold disease always has a finding its sharer lacks) are left out and counted.
- **Spread.** w's max/min per case, for the cached τ and for others recomputed from the cached φ
  (w = softmax(φ/τ), `shapley.weights`): with SmolLM2 at τ = 2 MedQA weights came out nearly uniform, so
  SIG is then close to the share of facts revealed.

`report(cases, records, taus)` works on any cases (the separating share only on synthetic ones);
`experiments/weights_report.py` prints it for a workdir's Shapley cache.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np

from promed_jax.data import synthetic
from promed_jax.data.cases import Case
from promed_jax.shapley.weights import shapley_weights


def separating_facts(case: Case) -> set[int]:
    """Indices of the synthetic case's facts that rule out at least one option the complaint leaves alive."""
    complaint = synthetic.complaint_of(case)
    gold = case.options[case.answer[0]]
    alive = [d for d in case.options.values() if d != gold and complaint in synthetic.DISEASES[d]]
    names = [synthetic.FACT_TO_FINDING[f] for f in case.facts]
    return {i for i, name in enumerate(names) if any(name not in synthetic.DISEASES[d] for d in alive)}


@dataclasses.dataclass(frozen=True)
class WeightsReport:
    """`separating_first`: share of synthetic cases whose top-weight fact separates (None without any);
    `cases_scored` / `cases_without_separating`: the cases behind it; `chance`: the share a fact drawn at
    random would get (mean of separating facts / facts); `spread[tau]`: (min, median, max) over
    cases of w.max() / w.min()."""

    cases: int
    separating_first: float | None
    cases_scored: int
    cases_without_separating: int
    chance: float | None
    spread: dict[float, tuple[float, float, float]]


def report(cases: Sequence[Case], records: Mapping[str, object], taus: Sequence[float] = (2.0, 1.0, 0.5, 0.1)) -> WeightsReport:
    """`records`: case id -> an object with `phi` (a cached `ShapleyRecord`). Cases without a record are skipped."""
    hits, scored, without, chance = 0, 0, 0, 0.0
    ratios: dict[float, list[float]] = {float(t): [] for t in taus}
    used = [c for c in cases if c.id in records]
    for case in used:
        phi = np.asarray(records[case.id].phi, np.float64)
        for tau, values in ratios.items():
            w = shapley_weights(phi, tau=tau)
            values.append(float(w.max() / w.min()))
        if case.source != synthetic.SOURCE:
            continue
        separating = separating_facts(case)
        if not separating:
            without += 1
            continue
        top = set(np.flatnonzero(phi == phi.max()).tolist())
        scored += 1
        hits += top <= separating
        chance += len(separating) / case.n_facts
    spread = {t: (min(r), float(np.median(r)), max(r)) for t, r in ratios.items() if r}
    return WeightsReport(
        cases=len(used),
        separating_first=hits / scored if scored else None,
        cases_scored=scored,
        cases_without_separating=without,
        chance=chance / scored if scored else None,
        spread=spread,
    )


def markdown(r: WeightsReport) -> str:
    lines = [f"cases with weights: {r.cases}"]
    if r.separating_first is not None:
        lines.append(
            f"top-weight fact separates the live options: {r.separating_first:.1%} of {r.cases_scored} synthetic cases "
            f"(a fact drawn at random: {r.chance:.1%})"
        )
    lines += ["", "| τ | w max/min: min | median | max |", "|---:|---:|---:|---:|"]
    lines += [f"| {t:g} | {lo:.2f} | {mid:.2f} | {hi:.2f} |" for t, (lo, mid, hi) in sorted(r.spread.items(), reverse=True)]
    return "\n".join(lines) + "\n"
