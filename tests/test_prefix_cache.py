"""The sampler's prompt prefix cache: sampling with cached prefixes equals sampling without, and the cache
stays within its byte budget."""

import jax
import numpy as np
import pytest
from flax import nnx

from promed_jax.models.config import ModelConfig
from promed_jax.models.transformer import Transformer
from promed_jax.sampling.keys import row_keys
from promed_jax.sampling.prefix_cache import PrefixCache
from promed_jax.sampling.sampler import SamplingConfig, generate

VOCAB = 512
ROOTS = [[(11 * i + 5 * j) % VOCAB + 1 for j in range(30 + 7 * i)] for i in range(3)]
# children extend a root; the last one shares only part of root 0 and then differs
CHILDREN = [ROOTS[0] + [7, 8, 9], ROOTS[1] + list(range(40, 80)), ROOTS[2][:-1], ROOTS[0][:20] + [3, 4, 5, 6]]


@pytest.fixture(scope="module")
def split():
    model = Transformer(ModelConfig.tiny(vocab_size=VOCAB), rngs=nnx.Rngs(0))
    model.materialize_head()
    return nnx.split(model)


@pytest.mark.parametrize(
    "config", [SamplingConfig(max_new_tokens=12, greedy=True), SamplingConfig(max_new_tokens=12, temperature=1.0)]
)
def test_sampling_with_a_prefix_cache_equals_sampling_without(split, config):
    keys = row_keys(0, [("child", i) for i in range(len(CHILDREN))])
    cache = PrefixCache()
    generate(*split, ROOTS, config, row_keys(0, [("root", i) for i in range(3)]), prefix=cache)
    assert len(cache) == 3 and cache.reused == 0
    cached = generate(*split, CHILDREN, config, keys, prefix=cache)
    plain = generate(*split, CHILDREN, config, keys)
    assert cache.reused == len(ROOTS[0]) + len(ROOTS[1]) + len(ROOTS[2]) - 2 + 20
    assert cached.tokens.tolist() == plain.tokens.tolist()
    np.testing.assert_allclose(cached.logprobs, plain.logprobs, atol=1e-5)
    # a prompt met again reuses all but its last token, and gives the same continuation
    again = generate(*split, CHILDREN, config, keys, prefix=cache)
    assert again.tokens.tolist() == plain.tokens.tolist()


def test_the_cache_evicts_least_recently_used_entries_beyond_its_budget(split):
    config = SamplingConfig(max_new_tokens=4, greedy=True)
    probe = PrefixCache()
    generate(*split, ROOTS[:1], config, jax.random.key(0), prefix=probe)
    per_token = probe.nbytes // len(ROOTS[0])
    cache = PrefixCache(max_bytes=per_token * (len(ROOTS[1]) + len(ROOTS[2])))
    generate(*split, ROOTS, config, jax.random.key(0), prefix=cache)
    assert cache.nbytes <= cache.max_bytes
    assert cache.longest(ROOTS[0] + [1])[0] == 0  # root 0, the oldest, went first
    assert cache.longest(ROOTS[2] + [1])[0] == len(ROOTS[2])
