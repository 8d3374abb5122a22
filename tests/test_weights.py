"""w = softmax(φ/τ) and its special cases."""

import numpy as np
import pytest

from promed_jax.shapley.weights import shapley_weights


def test_softmax_with_temperature():
    phi = np.array([0.5, -1.0, 2.0])
    expected = np.exp(phi / 2.0) / np.exp(phi / 2.0).sum()
    np.testing.assert_allclose(shapley_weights(phi), expected, rtol=1e-12)
    np.testing.assert_allclose(shapley_weights(phi, tau=0.5).sum(), 1.0)
    assert np.argmax(shapley_weights(phi)) == 2


def test_large_values_do_not_overflow():
    w = shapley_weights(np.array([1000.0, 0.0]), tau=0.1)
    np.testing.assert_allclose(w, [1.0, 0.0], atol=1e-12)


@pytest.mark.parametrize(
    "phi, expected",
    [
        ([3.7], [1.0]),
        ([0.2, 0.2, 0.2, 0.2], [0.25] * 4),
        ([np.nan, 1.0], [0.5, 0.5]),
        ([np.inf, 1.0, 0.0], [1 / 3] * 3),
    ],
)
def test_special_cases(phi, expected):
    np.testing.assert_allclose(shapley_weights(np.array(phi)), expected)


@pytest.mark.parametrize("phi, tau", [([], 2.0), ([[1.0]], 2.0), ([1.0, 2.0], 0.0)])
def test_bad_input(phi, tau):
    with pytest.raises(ValueError):
        shapley_weights(np.array(phi), tau=tau)
