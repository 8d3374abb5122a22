"""The synthetic clinic: deterministic, MediQ-shaped, several options fit the start and one fits all facts."""

import itertools

import pytest

from promed_jax.data import synthetic
from promed_jax.data.synthetic import (
    DISEASES,
    FINDINGS,
    complaint_of,
    findings_of,
    fits,
    make_cases,
)

N_SEEDS = 1000


@pytest.fixture(scope="module")
def cases_over_seeds():
    return [make_cases(1, seed)[0] for seed in range(N_SEEDS)]


def test_table_is_an_antichain_so_full_findings_pin_one_disease():
    for a, b in itertools.permutations(DISEASES, 2):
        assert not DISEASES[a] <= DISEASES[b], (a, b)
    used = set().union(*DISEASES.values())
    assert used == set(FINDINGS)


def test_table_texts_are_distinct():
    for attr in ("fact", "question", "complaint"):
        texts = [getattr(f, attr) for f in FINDINGS.values()]
        assert len(set(texts)) == len(texts), attr
    assert all(f.fact.startswith("The patient") and f.fact.endswith(".") for f in FINDINGS.values())
    assert all(f.question.endswith("?") for f in FINDINGS.values())


def test_every_disease_shares_a_finding_with_another():
    for disease, findings in DISEASES.items():
        assert any(findings & other for name, other in DISEASES.items() if name != disease), disease


def test_over_1000_seeds_start_fits_several_options_and_facts_fit_exactly_one(cases_over_seeds):
    golds = set()
    for case in cases_over_seeds:
        start = {complaint_of(case)}
        findings = findings_of(case.facts)
        fit_start = [letter for letter, disease in case.options.items() if fits(disease, start)]
        fit_all = [letter for letter, disease in case.options.items() if fits(disease, findings)]
        assert len(fit_start) >= 2, case
        assert fit_all == list(case.answer), case
        golds.add(case.options[case.answer[0]])
    assert golds == set(DISEASES)


def test_cases_are_mediq_shaped(cases_over_seeds):
    for case in cases_over_seeds[:100]:
        assert case.source == "synthetic" and case.language == "en" and case.known == ()
        assert list(case.options) == ["A", "B", "C", "D"]
        assert len(set(case.options.values())) == 4 and set(case.options.values()) <= set(DISEASES)
        assert len(case.answer) == 1 and case.question == synthetic.QUESTION
        assert case.n_facts == 4 and len(set(case.facts)) == 4
        assert case.initial_info.startswith("A ") and case.initial_info.endswith(".")
    assert len({case.answer[0] for case in cases_over_seeds}) == 4


def test_questions_about_findings_are_answerable_from_the_facts(cases_over_seeds):
    for case in cases_over_seeds:
        gold = DISEASES[case.options[case.answer[0]]]
        for name, finding in FINDINGS.items():
            assert (finding.fact in case.facts) == (name in gold), (case, name)


def test_deterministic_for_a_seed_and_prefix_stable():
    assert make_cases(20, seed=3) == make_cases(20, seed=3)
    assert make_cases(20, seed=3)[:5] == make_cases(5, seed=3)
    assert make_cases(20, seed=3) != make_cases(20, seed=4)
    assert [case.id for case in make_cases(3)] == ["synthetic:0", "synthetic:1", "synthetic:2"]


def test_bad_input():
    with pytest.raises(ValueError, match="n must be >= 0"):
        make_cases(-1)
    with pytest.raises(KeyError):
        findings_of(["The patient has gills."])
