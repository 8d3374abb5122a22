"""Shapley estimators against exact enumeration on small non-additive numpy games."""

import itertools
import math

import jax
import numpy as np
import pytest

from promed_jax import registry
from promed_jax.shapley import estimators as est

SAMPLED = ["permutation", "antithetic", "tmc", "kernel_shap"]


def table_game(table: np.ndarray):
    """v(S) = table[bitmask of S]: an arbitrary game over all 2^n coalitions."""
    n = int(np.log2(table.size))
    bits = 1 << np.arange(n)

    def value_fn(coalitions):
        return table[np.asarray(coalitions, dtype=np.int64) @ bits].astype(np.float32)

    return value_fn


def random_table(n: int, seed: int, *, null: int | None = None, swap: tuple[int, int] | None = None) -> np.ndarray:
    """Random values for every coalition; optionally a null player and a symmetric pair."""
    table = np.random.default_rng(seed).normal(size=2**n)
    masks = np.arange(2**n)
    if null is not None:
        table = table[masks & ~(1 << null)]
    if swap is not None:
        i, j = swap
        bi, bj = (masks >> i) & 1, (masks >> j) & 1
        swapped = (masks & ~((1 << i) | (1 << j))) | (bi << j) | (bj << i)
        table = (table + table[swapped]) / 2
    return table


def majority_table(weights, quota) -> np.ndarray:
    n = len(weights)
    return (est.all_coalitions(n) @ np.asarray(weights) >= quota).astype(np.float64)


def monotone_table(n: int, seed: int) -> np.ndarray:
    """Log-sigmoid of a positive weighted sum with pairwise synergy: increasing in S, like an LM's log-prob."""
    rng = np.random.default_rng(seed)
    w = rng.uniform(0.2, 1.5, size=n)
    pair = np.triu(rng.uniform(0.0, 0.4, size=(n, n)), 1)
    z = est.all_coalitions(n).astype(float)
    logits = z @ w + np.einsum("ki,ij,kj->k", z, pair, z) - 2.0
    return -np.log1p(np.exp(-logits))


def brute_force_shapley(table: np.ndarray) -> np.ndarray:
    """The definition, term by term."""
    n = int(np.log2(table.size))
    phi = np.zeros(n)
    for i in range(n):
        others = [j for j in range(n) if j != i]
        for size in range(n):
            for subset in itertools.combinations(others, size):
                mask = sum(1 << j for j in subset)
                weight = math.factorial(size) * math.factorial(n - size - 1) / math.factorial(n)
                phi[i] += weight * (table[mask | (1 << i)] - table[mask])
    return phi


def exact_phi(table: np.ndarray) -> np.ndarray:
    return est.exact(table_game(table), int(np.log2(table.size)))[0]


def test_registered_names():
    assert set(registry.names(est.KIND)) >= {"exact", "permutation", "tmc", "antithetic", "kernel_shap"}


def test_exact_matches_definition():
    table = random_table(5, 0)
    phi, n_evals = est.exact(table_game(table), 5)
    np.testing.assert_allclose(phi, brute_force_shapley(table.astype(np.float32)), atol=1e-6)
    assert n_evals == 32


def test_exact_weighted_majority():
    # Weights 3,1,1,1, quota 4: player 0 is a veto player, pivotal whenever it is not first in the order
    # (3/4); the three small players share the rest.
    phi = exact_phi(majority_table([3, 1, 1, 1], 4))
    np.testing.assert_allclose(phi, [3 / 4, 1 / 12, 1 / 12, 1 / 12], atol=1e-12)


@pytest.mark.parametrize("name", ["exact", *SAMPLED])
@pytest.mark.parametrize("game", ["majority", "random"])
def test_efficiency(name, game):
    table = majority_table([4, 3, 2, 2, 1, 1], 7) if game == "majority" else random_table(6, 1)
    phi, _ = registry.get(est.KIND, name)(table_game(table), 6, budget=60, key=3)
    total = float(np.float32(table[-1]) - np.float32(table[0]))
    # The truncated estimator stops a permutation within its tolerance of v(F).
    tol = 0.01 if name == "tmc" else 1e-6
    assert abs(phi.sum() - total) <= tol


def test_symmetry_and_null_player_exact():
    table = random_table(6, 2, null=5, swap=(1, 3))
    phi = exact_phi(table)
    assert phi[5] == pytest.approx(0.0, abs=1e-6)
    assert phi[1] == pytest.approx(phi[3], abs=1e-6)
    majority = exact_phi(majority_table([4, 3, 2, 2, 1, 1, 0], 7))
    assert majority[6] == 0.0
    assert majority[2] == pytest.approx(majority[3]) and majority[4] == pytest.approx(majority[5])


@pytest.mark.parametrize("name", ["permutation", "antithetic", "tmc"])
def test_null_player_sampled(name):
    # Every marginal of a null player is zero, so permutation estimators give exactly 0.
    phi, _ = registry.get(est.KIND, name)(table_game(random_table(6, 4, null=2)), 6, budget=40, key=0)
    assert phi[2] == 0.0


@pytest.mark.parametrize("name", ["permutation", "antithetic"])
def test_unbiased_over_seeds(name):
    table = random_table(6, 5)
    exact = exact_phi(table)
    fn = registry.get(est.KIND, name)
    runs = np.stack([fn(table_game(table), 6, budget=12, key=seed)[0] for seed in range(400)])
    se = runs.std(0, ddof=1) / np.sqrt(len(runs))
    assert np.all(np.abs(runs.mean(0) - exact) <= 4 * se + 1e-9), (runs.mean(0), exact, se)
    # And a single estimate is really noisy at this budget: the test can tell a biased estimator apart.
    assert np.mean(np.abs(runs[0] - exact)) > 1e-3


@pytest.mark.parametrize("enumerate_strata", [True, False], ids=["strata", "sampled"])
def test_kernel_shap_error_shrinks_with_budget(enumerate_strata):
    table = random_table(8, 6)
    exact = exact_phi(table)
    errors = []
    for budget in (18, 48, 120, 200):  # below 2^8: the enumerating variant still samples the middle sizes
        runs = [
            est.kernel_shap(table_game(table), 8, budget=budget, key=s, enumerate_strata=enumerate_strata)[0]
            for s in range(20)
        ]
        errors.append(np.mean([np.abs(phi - exact).sum() for phi in runs]))
    assert all(a > b for a, b in itertools.pairwise(errors)), errors
    assert errors[-1] < errors[0] / 3, errors


def test_complete_strata():
    assert est.complete_strata(7, 15) == []  # 2 + 14 does not fit
    assert est.complete_strata(7, 16) == [1, 6]
    assert est.complete_strata(7, 57) == [1, 6]
    assert est.complete_strata(7, 58) == [1, 2, 5, 6]  # 2 + 14 + 42
    assert est.complete_strata(4, 16) == [1, 2, 3]  # the middle size once
    assert est.complete_strata(5, 32) == [1, 2, 3, 4]
    coalitions = est.sizes_coalitions(5, [1, 4])
    assert len(coalitions) == 10 and set(coalitions.sum(1)) == {1, 4}


def test_kernel_shap_on_many_players():
    # n = 35 (the most facts of a MedQA case): the enumerated sizes are built size by size, never from all
    # 2^35 coalitions. On an additive game any full-rank sample gives φ exactly.
    n = 35
    a = np.random.default_rng(3).normal(size=n)
    phi, n_evals = est.kernel_shap(lambda c: np.asarray(c, float) @ a, n, budget=8 * (n + 1), key=0)
    assert n_evals <= 8 * (n + 1)
    np.testing.assert_allclose(phi, a, atol=1e-8)
    assert len(est.sizes_coalitions(n, [1, 34])) == 70


@pytest.mark.parametrize("n", [2, 3, 6])
def test_kernel_shap_with_every_coalition_is_exact(n):
    table = random_table(n, 11)
    phi, n_evals = est.kernel_shap(table_game(table), n, budget=2**n, key=0)
    assert n_evals == 2**n
    np.testing.assert_allclose(phi, exact_phi(table), atol=1e-9)


def test_enumerating_strata_helps_on_lm_like_games():
    # Monotone log-sigmoid games (the shape of an LM's answer log-prob): at 2(n+1) and 4(n+1) coalitions the
    # enumerated sizes 1 and n-1 give a lower error than sampling every size.
    n = 9
    for seed in range(3):
        table = monotone_table(n, seed)
        exact = exact_phi(table)
        for budget in (2 * (n + 1), 4 * (n + 1)):
            error = {
                strata: np.mean(
                    [
                        np.abs(
                            est.kernel_shap(table_game(table), n, budget=budget, key=s, enumerate_strata=strata)[0]
                            - exact
                        ).sum()
                        for s in range(10)
                    ]
                )
                for strata in (True, False)
            }
            assert error[True] < error[False], (seed, budget, error)


def test_kernel_shap_samples_follow_the_kernel():
    n, pairs = 6, 10000
    samples = est.kernel_samples(n, pairs, np.random.default_rng(0))
    np.testing.assert_array_equal(samples[pairs:], ~samples[:pairs])
    freq = np.bincount(samples[:pairs].sum(1), minlength=n)[1:] / pairs
    np.testing.assert_allclose(freq, est.kernel_size_distribution(n), atol=0.015)
    # Within a size every player is equally likely.
    np.testing.assert_allclose(samples[:pairs][samples[:pairs].sum(1) == 2].mean(0), 2 / n, atol=0.03)


def test_tmc_bias_within_tolerance():
    # On a monotone game the truncated tail's marginals are all in [0, tol): each φ_i is biased
    # downward by less than the truncation tolerance.
    n, tol = 7, 0.01
    table = monotone_table(n, 7)
    exact = exact_phi(table)
    runs = np.stack(
        [
            est.tmc(table_game(table), n, key=s, min_permutations=12, max_permutations=12, truncation_tol=tol)[0]
            for s in range(300)
        ]
    )
    bias = runs.mean(0) - exact
    se = runs.std(0, ddof=1) / np.sqrt(len(runs))
    assert np.all(bias >= -tol - 4 * se) and np.all(bias <= 4 * se), (bias, se)
    # The truncation really happened (fewer evaluations than untruncated permutations would need).
    _, n_evals = est.tmc(table_game(table), n, key=0, min_permutations=12, max_permutations=12)
    _, n_full = est.tmc(table_game(table), n, key=0, min_permutations=12, max_permutations=12, truncation_tol=0.0)
    assert n_evals < n_full


def test_tmc_stopping_rules_and_batch_independence():
    table = monotone_table(8, 8)
    phis = [est.tmc(table_game(table), 8, key=1, batch_permutations=b)[0] for b in (1, 3, 16)]
    for phi in phis[1:]:
        np.testing.assert_array_equal(phi, phis[0])
    _, n_evals = est.tmc(table_game(table), 8, key=1, batch_permutations=1)
    assert 2 + 3 <= n_evals <= 2 + 50 * 7
    # A budget caps the spending at a batch boundary.
    _, capped = est.tmc(table_game(table), 8, key=1, convergence_tol=0.0, budget=30, batch_permutations=2)
    assert capped < 30 + 2 * 7


def walked(memo: est.MemoValue, n: int) -> int:
    """Permutations tmc walked to the end (no truncation): ∅ and F, then n prefixes each."""
    assert (memo.asked - 2) % n == 0, memo.asked
    return (memo.asked - 2) // n


def additive_game(a):
    a = np.asarray(a, dtype=np.float64)
    return lambda coalitions: np.asarray(coalitions, dtype=np.float64) @ a


# One permutation at a time and no truncation unless a test sets them: each rule alone decides.
TMC = {"batch_permutations": 1, "truncation_tol": 0.0, "min_permutations": 1, "key": 0}


def test_tmc_truncation():
    # n = 3, symmetric: v(∅) = 0, a single fact 0.75, two facts 3.0, all three 1.0. With tolerance 0.5 every
    # permutation stops after its first fact (|0.75 − 1| = 0.25 < 0.5): that fact gets 0.75, the other two 0,
    # so Σφ = 0.75 (not v(F) − v(∅) = 1) and no pair is ever asked. The rule is strict: at tolerance 0.25 the
    # same prefix does not stop, and every permutation walks to F (Σφ = 1).
    table = np.array([0.0, 0.75, 0.75, 3.0, 0.75, 3.0, 3.0, 1.0])
    options = {**TMC, "min_permutations": 6, "max_permutations": 6, "convergence_tol": 0.0}
    memo = est.MemoValue(table_game(table), 3)
    phi, n_evals = est.tmc(memo, 3, **{**options, "truncation_tol": 0.5})
    assert phi.sum() == pytest.approx(0.75, abs=1e-12)
    np.testing.assert_allclose(phi * 6 / 0.75, np.round(phi * 6 / 0.75), atol=1e-9)  # whole first places
    assert memo.asked == 2 + 6 and n_evals <= 2 + 3
    memo = est.MemoValue(table_game(table), 3)
    phi, n_evals = est.tmc(memo, 3, **{**options, "truncation_tol": 0.25})
    assert phi.sum() == pytest.approx(1.0, abs=1e-12)
    assert walked(memo, 3) == 6 and n_evals > 2 + 3


def test_tmc_convergence_stop():
    # An additive game gives every permutation the same marginals a, so φ = a after one permutation: the
    # mean |Δφ| is mean |a| = 0.375 at the first permutation and 0 after. A tolerance above 0.375 stops after
    # one permutation, 0.375 itself (strict) after two, and 0 never (all max_permutations). It is the mean
    # over facts, not the largest or the total change: 0.4 is below max |a| = 0.5 and Σ|a| = 0.75.
    a = [0.5, 0.25]
    for tol, expected in [(0.4, 1), (0.375, 2), (0.0, 50)]:
        memo = est.MemoValue(additive_game(a), 2)
        phi, _ = est.tmc(memo, 2, **TMC, max_permutations=50, convergence_tol=tol)
        assert walked(memo, 2) == expected, tol
        np.testing.assert_allclose(phi, a, atol=1e-12)


def test_tmc_min_permutations():
    # With a tolerance every change is below, sampling stops at the first permutation it may: min_permutations.
    for minimum in (1, 5):
        memo = est.MemoValue(additive_game([0.5, 0.25, 1.0]), 3)
        est.tmc(memo, 3, **{**TMC, "min_permutations": minimum}, max_permutations=50, convergence_tol=10.0)
        assert walked(memo, 3) == minimum


def test_tmc_max_permutations():
    # Never converged (tolerance 0): exactly max_permutations, also when min_permutations asks for more.
    table = random_table(4, 12)
    for minimum, maximum in [(1, 7), (10, 4)]:
        memo = est.MemoValue(table_game(table), 4)
        est.tmc(memo, 4, **{**TMC, "min_permutations": minimum}, max_permutations=maximum, convergence_tol=0.0)
        assert walked(memo, 4) == maximum


def test_tmc_budget():
    # n = 2, one permutation at a time: the first permutation asks ∅, F and one single fact, 3 distinct
    # coalitions, so a budget of 3 (or 2) stops after it, checked at the end of the batch.
    for budget in (2, 3):
        memo = est.MemoValue(additive_game([0.5, 0.25]), 2)
        _, n_evals = est.tmc(memo, 2, **TMC, max_permutations=50, convergence_tol=0.0, budget=budget)
        assert walked(memo, 2) == 1 and n_evals == 3


def test_tmc_budget_counts_this_runs_coalitions():
    # A memo that exact enumeration already filled holds all 2^3 coalitions: the budget counts the coalitions
    # this run asks for, not the memo's, so tmc walks as far as on a fresh memo and gives the same φ.
    table = random_table(3, 13)
    options = {**TMC, "max_permutations": 30, "convergence_tol": 0.0, "budget": 8}
    fresh = est.MemoValue(table_game(table), 3)
    phi, n_evals = est.tmc(fresh, 3, **options)
    assert n_evals == 8 and 1 < walked(fresh, 3) < 30  # one permutation reaches 4 coalitions
    shared = est.MemoValue(table_game(table), 3)
    est.exact(shared, 3)
    shared.asked = 0
    phi_shared, n_shared = est.tmc(shared, 3, **options)
    np.testing.assert_array_equal(phi_shared, phi)
    assert n_shared == 0 and shared.asked == fresh.asked


def test_memo_counts_distinct_and_forwards_only_new():
    calls = []

    def value_fn(coalitions):
        calls.append(len(coalitions))
        return coalitions.sum(1).astype(np.float32)

    memo = est.MemoValue(value_fn, 4)
    a = np.array([[1, 0, 0, 0], [0, 1, 0, 0], [1, 0, 0, 0]], bool)
    np.testing.assert_array_equal(memo(a), [1, 1, 1])
    np.testing.assert_array_equal(memo(np.array([[0, 1, 0, 0], [1, 1, 1, 1]], bool)), [1, 4])
    assert calls == [2, 1] and memo.n_evals == 3
    # Estimators report only what they added to a shared memo.
    _, n_evals = est.exact(memo, 4)
    assert n_evals == 16 - 3
    with pytest.raises(ValueError, match="bool\\[K, 4\\]"):
        memo(np.zeros((2, 3), bool))


def test_keys():
    table = random_table(5, 9)
    a = est.permutation(table_game(table), 5, budget=20, key=jax.random.key(0))[0]
    b = est.permutation(table_game(table), 5, budget=20, key=jax.random.PRNGKey(0))[0]
    c = est.permutation(table_game(table), 5, budget=20, key=jax.random.key(1))[0]
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_one_player():
    table = np.array([0.25, 1.0])
    for name in ["exact", *SAMPLED]:
        phi, _ = registry.get(est.KIND, name)(table_game(table), 1, budget=10, key=0)
        np.testing.assert_allclose(phi, [0.75])


def test_choose_estimator():
    assert est.choose_estimator(10, exact_max_n=10, fallback="kernel_shap")[0] == "exact"
    name, fn = est.choose_estimator(11, exact_max_n=10, fallback="kernel_shap")
    assert name == "kernel_shap" and fn is est.kernel_shap
    with pytest.raises(KeyError, match="known"):
        est.choose_estimator(11, exact_max_n=10, fallback="nope")


@pytest.mark.parametrize(("n", "chunk"), [(5, 8), (6, 64), (4, 100), (3, 1)])
def test_study_table_chunks_cover_every_coalition_once(n, chunk):
    # study_estimators builds exact tables chunk by chunk: together the chunks are every bitmask once, and
    # within a chunk the leading facts (low bits) are fixed, so the coalitions share their fact prefixes.
    from experiments.study_estimators import table_chunks

    chunks = table_chunks(n, chunk)
    np.testing.assert_array_equal(np.sort(np.concatenate(chunks)), np.arange(2**n))
    for masks in chunks:
        assert len(masks) == min(2**n, 2 ** int(np.log2(chunk)))
        fixed = (1 << (n - int(np.log2(len(masks))))) - 1
        assert len(set((masks & fixed).tolist())) == 1
