"""The continuation scorer: equals a manual log-softmax of the full forward, per row, for a ragged batch."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from promed_jax.models.config import ModelConfig
from promed_jax.models.transformer import Transformer, causal_mask, positions_from_mask
from promed_jax.sampling import scorer
from promed_jax.sampling.sampler import SamplingConfig, generate
from promed_jax.sampling.scorer import score_continuations

PROMPTS = [[5, 17, 300, 41, 9, 77, 120], [900], [64, 65, 66, 67, 68, 69, 70, 71, 72, 73, 74, 75, 76]]
CONTINUATIONS = [[11, 12, 13], [400, 401, 402, 403, 404, 405, 406, 407, 408, 409], [2]]


@pytest.fixture(scope="module")
def split():
    model = Transformer(ModelConfig.tiny(vocab_size=1024), rngs=nnx.Rngs(0))
    model.materialize_head()
    return nnx.split(model)


def manual_logprobs(split, prompt, continuation):
    """log p(continuation[j] | prompt, continuation[:j]) from one unpadded forward and a float64 log-softmax."""
    model = nnx.merge(*split)
    tokens = jnp.asarray([prompt + continuation], jnp.int32)
    valid = jnp.ones_like(tokens, bool)
    logits = np.asarray(model(tokens, positions_from_mask(valid), causal_mask(valid))[0][0], np.float64)
    logits = logits[len(prompt) - 1 : -1]
    log_z = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    return logits[np.arange(len(continuation)), continuation] - log_z


def test_scores_equal_manual_log_softmax(split):
    out = score_continuations(*split, PROMPTS, CONTINUATIONS)
    assert out.logprobs.shape == (3, 10)
    assert out.mask.sum(-1).tolist() == [3, 10, 1]
    assert (out.logprobs[~out.mask] == 0).all()
    for b, (prompt, continuation) in enumerate(zip(PROMPTS, CONTINUATIONS, strict=True)):
        expected = manual_logprobs(split, prompt, continuation)
        np.testing.assert_allclose(out.logprobs[b, : len(continuation)], expected, atol=2e-5)
        np.testing.assert_allclose(out.totals()[b], expected.sum(), atol=1e-4)
        np.testing.assert_allclose(out.means()[b], expected.mean(), atol=2e-5)


def test_scores_do_not_depend_on_the_batch(split):
    batched = score_continuations(*split, PROMPTS, CONTINUATIONS)
    alone = score_continuations(*split, PROMPTS[1:2], CONTINUATIONS[1:2])
    np.testing.assert_allclose(alone.logprobs[0], batched.logprobs[1], atol=1e-5)


def test_scores_equal_the_samplers_logprobs(split):
    sampled = generate(*split, PROMPTS, SamplingConfig(max_new_tokens=8, temperature=1.0), jax.random.key(4))
    scored = score_continuations(*split, PROMPTS, sampled.sequences())
    np.testing.assert_allclose(scored.logprobs, sampled.logprobs, atol=1e-4)


def test_sizes_within_a_bucket_reuse_the_compiled_forward(split):
    score_continuations(*split, PROMPTS, CONTINUATIONS)
    compiled = scorer._window_logprobs._cache_size()
    score_continuations(*split, [p[:-1] or [1] for p in PROMPTS], [c[:9] for c in CONTINUATIONS])
    assert scorer._window_logprobs._cache_size() == compiled


def test_bad_input_is_rejected(split):
    with pytest.raises(ValueError, match="row 1"):
        score_continuations(*split, [[1], [2]], [[3], []])
    with pytest.raises(ValueError, match="2 prompts and 1 continuations"):
        score_continuations(*split, [[1], [2]], [[3]])
