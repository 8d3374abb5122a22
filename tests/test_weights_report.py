"""The weights-see-the-medicine report: separating facts from the table, the top-weight share, the spread."""

import math
import types

import numpy as np
import pytest

from promed_jax.data import synthetic
from promed_jax.data.cases import Case
from promed_jax.evaluation import weights_report as wr


def _rec(phi):
    return types.SimpleNamespace(phi=tuple(phi))


def test_separating_facts_follow_the_table():
    for case in synthetic.make_cases(60, seed=3):
        complaint = synthetic.complaint_of(case)
        names = [synthetic.FACT_TO_FINDING[f] for f in case.facts]
        sep = wr.separating_facts(case)
        assert names.index(complaint) not in sep  # every option left alive has the complaint
        gold = case.options[case.answer[0]]
        sharers = [d for d in case.options.values() if d != gold and complaint in synthetic.DISEASES[d]]
        for i, name in enumerate(names):
            assert (i in sep) == any(name not in synthetic.DISEASES[d] for d in sharers)
        assert sep  # the generator's gold always has a finding its sharer lacks


def test_top_weight_share_and_spread():
    cases = synthetic.make_cases(40, seed=4)
    good, bad = {}, {}
    for case in cases:
        sep = wr.separating_facts(case)
        names = [synthetic.FACT_TO_FINDING[f] for f in case.facts]
        on_sep = [1.0 if i == min(sep) else 0.0 for i in range(case.n_facts)]
        on_complaint = [1.0 if n == synthetic.complaint_of(case) else 0.0 for n in names]
        good[case.id], bad[case.id] = _rec(on_sep), _rec(on_complaint)
    assert wr.report(cases, good).separating_first == 1.0
    expected = np.mean([len(wr.separating_facts(c)) / c.n_facts for c in cases])
    assert wr.report(cases, good).chance == pytest.approx(expected)
    assert wr.report(cases, bad).separating_first == 0.0
    half = {c.id: (good if k % 2 else bad)[c.id] for k, c in enumerate(cases)}
    assert wr.report(cases, half).separating_first == 0.5
    # a tie at the top counts only if every tied fact separates
    tied = {c.id: _rec([1.0] * c.n_facts) for c in cases}
    assert wr.report(cases, tied).separating_first == 0.0
    # spread by hand: phi = (0, ..., 0, 2): w max/min = exp(2 / tau)
    spread = wr.report(cases[:1], {cases[0].id: _rec([0.0] * (cases[0].n_facts - 1) + [2.0])}, taus=(2.0, 0.5)).spread
    assert spread[2.0] == pytest.approx((math.e, math.e, math.e))
    assert spread[0.5][1] == pytest.approx(math.exp(4.0))


def test_real_cases_get_the_spread_only():
    case = Case(
        id="medqa:1", source="medqa", language="en", initial_info="x", question="q", options={"A": "a", "B": "b"},
        answer=("A",), facts=("f1", "f2"), known=(),
    )
    r = wr.report([case], {"medqa:1": _rec([0.1, 0.3])}, taus=(2.0,))
    assert r.separating_first is None and r.cases == 1
    assert r.spread[2.0][1] == pytest.approx(np.exp(0.1))
    assert "separates" not in wr.markdown(r) and "| 2 | 1.11 |" in wr.markdown(r)
