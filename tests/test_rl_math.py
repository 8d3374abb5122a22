"""Stage 2's math on small hand-made arrays: token rewards (every mode), advantages (every estimator, a
degenerate group), KL estimators, the PPO-clip loss (both clip sides, every aggregation, the clamp), and
gradients of the loss against central finite differences in float64, also through a tiny linear policy."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from promed_jax import config_check, registry
from promed_jax.rl import ANSWER, OTHER, QUESTION, LossConfig, RewardConfig, TurnArrays, policy_loss
from promed_jax.rl import advantages as adv_lib

# --- rewards -------------------------------------------------------------------------------------------
# Row 0 (correct): instruction, question 1 (2 tokens), patient, the answer (3 tokens).
# Row 1 (wrong): question 1 (2 tokens), patient, a cut-off question 2 (1 token; kind OTHER although a SIG was
# computed for it), patient, the answer (1 token), padding.
TURN_IDS = np.array([[0, 0, 1, 1, 1, 2, 2, 2], [0, 1, 1, 1, 2, 2, 3, 0]], np.int32)
ROLE = np.array([[0, 0, 1, 1, 0, 1, 1, 1], [0, 1, 1, 0, 1, 0, 1, 0]], bool)
CORRECT = np.array([True, False])
TURNS = TurnArrays(
    kind=np.array([[QUESTION, ANSWER, OTHER], [QUESTION, OTHER, ANSWER]], np.int32),
    format_reward=np.array([[1.0, 0.5, 0.0], [1.0, 0.5, 1.0]], np.float32),
    sig=np.array([[0.25, 0.0, 0.0], [0.5, 0.3, 0.0]], np.float32),
    n_turns=np.array([2, 3], np.int32),
    final_state=np.array([0.75, 0.5], np.float32),
)
CONFIG = RewardConfig()  # α = 2, β = 1, γ = 3, trajectory 4 and 2


def _rewards(mode):
    fn = jax.jit(functools.partial(registry.get("rl.reward", mode), config=CONFIG))
    token, parts = fn(TURNS, TURN_IDS, ROLE, CORRECT)
    return np.asarray(token), {k: np.asarray(v) for k, v in parts.items()}


def test_distributed_rewards_by_hand():
    token, parts = _rewards("distributed")
    # row 0: question 2·0.25 + 1·0.25 + format 1 = 1.75; answer 3 + format 0.5 = 3.5
    # row 1: question 2·0.5 + 0 + 1 = 2; cut-off turn: format 0.5 only; wrong answer: format 1
    np.testing.assert_allclose(token[0], [0, 0, 1.75, 1.75, 0, 3.5, 3.5, 3.5])
    np.testing.assert_allclose(token[1], [0, 2, 2, 0, 0.5, 0, 1, 0])
    np.testing.assert_allclose(parts["question"], [0.75, 1.0])
    np.testing.assert_allclose(parts["answer"], [3.0, 0.0])
    np.testing.assert_allclose(parts["format"], [0.75, 2.5 / 3])
    np.testing.assert_allclose(parts["sig"], [0.25, 0.5])
    np.testing.assert_allclose(parts["total"], [14.0, 5.5])


def test_outcome_only_no_distribution_and_trajectory_by_hand():
    token, parts = _rewards("outcome_only")
    np.testing.assert_allclose(token[0], [0, 0, 1, 1, 0, 3.5, 3.5, 3.5])
    np.testing.assert_allclose(token[1], [0, 1, 1, 0, 0.5, 0, 1, 0])
    np.testing.assert_allclose(parts["sig"], [0, 0])
    token, parts = _rewards("no_distribution")  # the distributed totals 14 and 5.5 over 5 and 4 tokens
    np.testing.assert_allclose(token, np.where(ROLE, [[2.8], [1.375]], 0.0))
    np.testing.assert_allclose(parts["total"], [14.0, 5.5])
    token, parts = _rewards("trajectory")
    # R = 4·1[correct] + mean format + 2·Σ w c(T): 4 + 0.75 + 1.5 and 0 + 2.5/3 + 1
    r = np.array([6.25, 2.5 / 3 + 1.0])
    np.testing.assert_allclose(token, np.where(ROLE, (r / [5, 4])[:, None], 0.0), rtol=1e-6)
    np.testing.assert_allclose(parts["total"], r, rtol=1e-6)


def test_config_rules_take_the_registry_names_and_ranges():
    import promed_jax.rl  # noqa: F401  (registers the names)

    expect = {
        "grpo.reward": {"distributed", "trajectory", "no_distribution", "outcome_only"},
        "grpo.advantage": {"token_mean", "traj_mean", "group_std", "rloo", "zero"},
        "grpo.kl_estimator": {"k1", "k2", "k3", "none"},
        "grpo.loss_aggregation": {"seq_mean_token_mean", "token_mean", "seq_mean_token_sum_norm"},
    }
    kinds = {
        "grpo.reward": "rl.reward",
        "grpo.advantage": "rl.advantage",
        "grpo.kl_estimator": "rl.kl",
        "grpo.loss_aggregation": "rl.aggregation",
    }
    for key, names in expect.items():
        assert set(registry.names(kinds[key])) == names
        assert all(config_check.RULES[key](name) is None for name in names)
        assert config_check.RULES[key]("bogus") is not None
    for key, good, bad in [
        ("grpo.clip_eps", 0.1, (0.0, 1.5)),
        ("grpo.clip_eps_high", 0.0, (-0.1,)),
        ("grpo.log_ratio_clamp", 20.0, (0.0,)),
        ("grpo.loss_norm_tokens", 8192, (0, 1.5)),
    ]:
        assert config_check.RULES[key](good) is None
        assert all(config_check.RULES[key](b) is not None for b in bad), key


# --- advantages ----------------------------------------------------------------------------------------
# Three groups of two: unequal lengths (0), unequal sums (1), equal sums 4 = 4 from 2 and 1 tokens (2).
R = np.array([[1, 1, 0], [3, 0, 0], [2, 2, 2], [1, 2, 9], [2, 2, 0], [4, 0, 0]], np.float32)
M = np.array([[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 1, 0], [1, 1, 0], [1, 0, 0]], bool)
G = np.array([0, 0, 1, 1, 2, 2], np.int32)
S = 1 / math.sqrt(2)  # (R − mean) / std with two rows and ddof = 1
EXPECTED = {
    "token_mean": [
        [-2 / 3, -2 / 3, 0],
        [4 / 3, 0, 0],
        [0.2, 0.2, 0.2],
        [-0.8, 0.2, 0],
        [-2 / 3, -2 / 3, 0],
        [4 / 3, 0, 0],
    ],
    "traj_mean": [[-1, -1, 0], [1, 0, 0], [0.25, 0.25, 0.25], [-0.75, 0.25, 0], [-1, -1, 0], [1, 0, 0]],
    "group_std": [[-S, -S, 0], [S, 0, 0], [S, S, S], [-S, -S, 0], [0, 0, 0], [0, 0, 0]],
    "rloo": [[-1, -1, 0], [1, 0, 0], [3, 3, 3], [-3, -3, 0], [0, 0, 0], [0, 0, 0]],
    "zero": np.zeros((6, 3)),  # the learning runs' control
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_advantages_by_hand(name):
    advantages, metrics = jax.jit(registry.get("rl.advantage", name))(R, M, G)
    np.testing.assert_allclose(np.asarray(advantages), EXPECTED[name], rtol=1e-5, atol=1e-6)
    assert float(metrics["equal_reward_share"]) == pytest.approx(1 / 3)  # group 2, whatever the estimator


def test_per_dialogue_advantages_of_three_and_of_one():
    r = np.array([[1.0], [2.0], [6.0], [5.0]], np.float32)
    m = np.ones((4, 1), bool)
    g = np.array([0, 0, 0, 1], np.int32)  # a group of three and a group of one
    a, metrics = jax.jit(adv_lib.rloo)(r, m, g)
    np.testing.assert_allclose(np.asarray(a)[:, 0], [1 - 4, 2 - 3.5, 6 - 1.5, 0])
    a, _ = jax.jit(adv_lib.group_std)(r, m, g)
    np.testing.assert_allclose(np.asarray(a)[:, 0], np.array([-2, -1, 3, 0]) / [math.sqrt(7)] * [1, 1, 1, 0], rtol=1e-6)
    assert float(metrics["equal_reward_share"]) == pytest.approx(0.5)  # one row: all equal
    # groups need not be contiguous: interleaving the rows permutes the result
    order = np.array([3, 0, 2, 1])
    a2, _ = jax.jit(adv_lib.group_std)(r[order], m[order], g[order])
    np.testing.assert_allclose(np.asarray(a2), np.asarray(a)[order], rtol=1e-6)


# --- the loss ------------------------------------------------------------------------------------------
# Tokens a, b, c in row 0 and d in row 1: ratios 1.2, 0.8, 1.05, 0.8, advantages +1, −1, +2, +1,
# log r = log π_ref − log π: 0.1, −0.2, 0, 0.3.
LOGPS = np.array([[-1.0, -2.0, -0.5], [-3.0, -1.0, -1.0]], np.float32)
RATIO = np.array([[1.2, 0.8, 1.05], [0.8, 1.0, 1.0]])
OLD = (LOGPS - np.log(RATIO)).astype(np.float32)
REF = (LOGPS + np.array([[0.1, -0.2, 0.0], [0.3, 0.0, 0.0]])).astype(np.float32)
ADV = np.array([[1.0, -1.0, 2.0], [1.0, 5.0, 5.0]], np.float32)
MASK = np.array([[1, 1, 1], [1, 0, 0]], bool)
# ε = 0.1: a is clipped above (−1.1), b below (0.9), c inside (−2.1); d's ratio is under 1 − ε but its A > 0,
# so the unclipped −0.8 is the larger.
PG = {"a": -1.1, "b": 0.9, "c": -2.1, "d": -0.8}
K3 = {"a": 0.005170918075647624, "b": 0.018730753077981888, "c": 0.0, "d": 0.04985880757600314}
K2 = {"a": 0.005, "b": 0.02, "c": 0.0, "d": 0.045}
K1 = {"a": -0.1, "b": 0.2, "c": 0.0, "d": -0.3}


def _loss(**kw):
    loss = jax.jit(functools.partial(policy_loss, config=LossConfig(**kw)))
    total, denom, metrics = loss(LOGPS, OLD, REF, ADV, MASK)
    return float(total), float(denom), {k: float(v) for k, v in metrics.items()}


@pytest.mark.parametrize("name,kl", [("k3", K3), ("k2", K2), ("k1", K1), ("none", dict.fromkeys(K3, 0.0))])
def test_kl_estimators_by_hand(name, kl):
    total, denom, metrics = _loss(kl_estimator=name, aggregation="token_mean")
    loss = {t: PG[t] + 0.04 * kl[t] for t in PG}
    assert denom == 4
    assert total == pytest.approx(sum(loss.values()), rel=1e-6)
    assert metrics["kl"] == pytest.approx(sum(kl.values()) / 4, rel=1e-5, abs=1e-7)


def test_aggregations_by_hand():
    loss = {t: PG[t] + 0.04 * K3[t] for t in PG}
    row0 = (loss["a"] + loss["b"] + loss["c"]) / 3
    total, denom, _ = _loss(aggregation="seq_mean_token_mean")
    assert (total, denom) == (pytest.approx(row0 + loss["d"], rel=1e-6), 2)
    total, denom, _ = _loss(aggregation="token_mean")
    assert (total, denom) == (pytest.approx(sum(loss.values()), rel=1e-6), 4)
    total, denom, _ = _loss(aggregation="seq_mean_token_sum_norm", norm_tokens=10)
    assert (total, denom) == (pytest.approx(sum(loss.values()) / 10, rel=1e-6), 2)


def test_both_sides_of_the_clip():
    _, _, metrics = _loss(kl_estimator="none")
    assert (metrics["clip_high"], metrics["clip_low"], metrics["clip_fraction"]) == (0.25, 0.25, 0.5)
    assert metrics["ratio_mean"] == pytest.approx((1.2 + 0.8 + 1.05 + 0.8) / 4, rel=1e-6)
    assert (metrics["ratio_min"], metrics["ratio_max"]) == (pytest.approx(0.8), pytest.approx(1.2))
    # a wider upper ε (0.3) leaves a unclipped: −1.2
    total, _, metrics = _loss(kl_estimator="none", clip_eps_high=0.3, aggregation="token_mean")
    assert total == pytest.approx(-1.2 + 0.9 - 2.1 - 0.8, rel=1e-6)
    assert (metrics["clip_high"], metrics["clip_low"]) == (0.0, 0.25)


def test_the_log_ratio_clamp_stops_exponentials_and_their_gradient():
    logps = jnp.array([[0.0]])
    old = jnp.array([[-30.0]])  # log ratio 30, clamped to 20
    adv, mask = jnp.array([[-1.0]]), jnp.array([[True]])
    config = LossConfig(kl_estimator="none", log_ratio_clamp=20.0)

    def loss(x):
        total, denom, _ = policy_loss(x, old, None, adv, mask, config=config)
        return total / denom

    assert float(jax.jit(loss)(logps)) == pytest.approx(math.exp(20.0), rel=1e-5)
    assert float(jax.jit(jax.grad(loss))(logps)[0, 0]) == 0.0
    with pytest.raises(ValueError, match="needs ref_logps"):
        policy_loss(logps, old, None, adv, mask, config=LossConfig())


def test_kl_is_measured_without_its_penalty_and_padding_rows_change_nothing():
    total, _, metrics = _loss(kl_beta=0.0, aggregation="token_mean")
    assert total == pytest.approx(sum(PG.values()), rel=1e-6)
    assert metrics["kl"] == pytest.approx(sum(K3.values()) / 4, rel=1e-5)

    def pad(x):
        return np.concatenate([x, np.zeros_like(x[:1])])

    for aggregation in ("seq_mean_token_mean", "token_mean", "seq_mean_token_sum_norm"):
        loss = jax.jit(functools.partial(policy_loss, config=LossConfig(aggregation=aggregation)))
        total, denom, _ = loss(LOGPS, OLD, REF, ADV, MASK)
        padded, padded_denom, _ = loss(*map(pad, (LOGPS, OLD, REF, ADV, MASK)))
        assert (float(padded), float(padded_denom)) == (pytest.approx(float(total)), float(denom))


def test_values_off_the_mask_reach_neither_the_loss_nor_its_gradient():
    junk = ~MASK
    dirty = [np.where(junk, bad, x) for x, bad in ((LOGPS, np.nan), (OLD, -np.inf), (REF, np.nan), (ADV, np.inf))]

    def f(logps, old, ref, adv):
        total, denom, _ = policy_loss(logps, old, ref, adv, MASK, config=LossConfig())
        return total / denom

    value_and_grad = jax.jit(jax.value_and_grad(f))
    clean, clean_grad = value_and_grad(LOGPS, OLD, REF, ADV)
    value, grad = value_and_grad(*dirty)
    assert float(value) == pytest.approx(float(clean))
    np.testing.assert_array_equal(np.asarray(grad), np.asarray(clean_grad))
    assert not np.asarray(grad)[junk].any()


# --- gradients against central finite differences (float64) --------------------------------------------


def _fd_check(f, x, h=1e-6):
    """f's gradient at x against central differences, every coordinate in one vmapped batch."""
    g = jax.jit(jax.grad(f))(x)
    eye = jnp.eye(x.size, dtype=x.dtype).reshape(x.size, *x.shape) * h
    batched = jax.jit(jax.vmap(f))
    fd = (batched(x + eye) - batched(x - eye)) / (2 * h)
    np.testing.assert_allclose(np.asarray(g).ravel(), np.asarray(fd), rtol=1e-6, atol=1e-8)


def _random_batch(rng, n=3, t=5):
    logps = -rng.uniform(0.1, 3.0, (n, t))
    old = logps - rng.normal(0, 0.12, (n, t))  # ratios around 1, some beyond 1 ± 0.1
    ratio = np.exp(logps - old)
    assert np.abs(np.abs(ratio - 1) - 0.1).min() > 1e-3  # no coordinate sits on a kink of the clip
    ref = logps + rng.normal(0, 0.3, (n, t))
    adv = rng.normal(0, 1, (n, t))
    mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 1, 1, 0, 0]], bool)[:n, :t]
    return logps, old, ref, adv, mask


@pytest.mark.parametrize(
    "aggregation,kl",
    [
        ("seq_mean_token_mean", "k3"),
        ("token_mean", "k3"),
        ("seq_mean_token_sum_norm", "k3"),
        ("token_mean", "k1"),
        ("token_mean", "k2"),
        ("seq_mean_token_mean", "none"),
    ],
)
def test_loss_gradient_matches_finite_differences(aggregation, kl):
    with jax.enable_x64(True):
        logps, old, ref, adv, mask = _random_batch(np.random.default_rng(0))
        config = LossConfig(aggregation=aggregation, kl_estimator=kl, clip_eps_high=0.2, norm_tokens=7)

        def f(x):
            total, denom, _ = policy_loss(x, old, ref, adv, mask, config=config)
            return total / denom

        _fd_check(f, jnp.asarray(logps, jnp.float64))


def test_gradient_through_a_linear_policy_matches_finite_differences():
    """logits = x @ W over a vocabulary of 4; the loss's gradient in W is checked, the chain included."""
    with jax.enable_x64(True):
        rng = np.random.default_rng(1)
        n, t, d, v = 3, 5, 3, 4
        x = jnp.asarray(rng.normal(0, 1, (n, t, d)))
        tokens = jnp.asarray(rng.integers(0, v, (n, t)))
        w0 = jnp.asarray(rng.normal(0, 0.5, (d, v)))

        def logps_of(w):
            logp = jax.nn.log_softmax(x @ w, axis=-1)
            return jnp.take_along_axis(logp, tokens[..., None], axis=-1)[..., 0]

        _, old, ref, adv, mask = _random_batch(np.random.default_rng(2))
        base = np.asarray(logps_of(w0))
        old = base - (np.asarray(_random_batch(np.random.default_rng(2))[0]) - old)  # the same ratios around W0
        ref = base + rng.normal(0, 0.3, (n, t))
        config = LossConfig()

        def f(w):
            total, denom, _ = policy_loss(logps_of(w), old, ref, adv, mask, config=config)
            return total / denom

        _fd_check(f, w0)


def test_configs_from_the_grpo_section():
    from configs import base

    grpo = base.get_config().grpo
    assert RewardConfig.from_config(grpo) == RewardConfig()  # the paper's values
    assert LossConfig.from_config(grpo) == LossConfig()
    assert LossConfig.from_config(grpo).eps_high == 0.1  # clip_eps_high = 0: the same as clip_eps
    grpo.clip_eps_high, grpo.kl_estimator, grpo.loss_aggregation = 0.28, "none", "token_mean"
    config = LossConfig.from_config(grpo)
    assert (config.eps_high, config.kl_estimator, config.aggregation) == (0.28, "none", "token_mean")
