"""LocalBackend's keys: one key per conversation makes a row independent of the batch, `max_batch` and earlier
calls; without keys a prompt's k-th sample is fixed. Token in, token out: `sample_turns`."""

import numpy as np
import pytest
from flax import nnx

from promed_jax.backends.local import LocalBackend
from promed_jax.models import ModelConfig, Transformer
from promed_jax.sampling.keys import row_keys
from promed_jax.text.tokenizer import build_tiny_tokenizer

CONVERSATIONS = [[{"role": "user", "content": f"Patient {i}: a fever for {i} days."}] for i in range(4)]


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer):
    return Transformer(ModelConfig.tiny(vocab_size=len(tokenizer)), rngs=nnx.Rngs(0))


def backend(model, tokenizer, **kwargs):
    return LocalBackend.from_model(model, tokenizer, **kwargs)


def test_keys_make_rows_independent_of_batch_split_and_calls(model, tokenizer):
    keys = row_keys(0, [("rl", 0, f"case{i}", 0, 1) for i in range(4)])
    whole = backend(model, tokenizer, max_batch=4).sample_turns(
        CONVERSATIONS, max_tokens=12, temperature=1.0, keys=keys
    )
    split = backend(model, tokenizer, max_batch=2)  # two batches of 2
    split.chat(CONVERSATIONS[:2], max_tokens=12, temperature=1.0)  # earlier calls play no part
    parts = split.sample_turns(CONVERSATIONS, max_tokens=12, temperature=1.0, keys=keys)
    assert len({tuple(t.ids.tolist()) for t in whole}) == 4
    for a, b in zip(whole, parts, strict=True):
        assert a.ids.tolist() == b.ids.tolist() and a.text == b.text and a.stopped == b.stopped
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5)
    assert split.chat(CONVERSATIONS, max_tokens=12, temperature=1.0, keys=keys) == [t.text for t in whole]
    with pytest.raises(ValueError, match="one key per prompt"):
        split.chat(CONVERSATIONS, max_tokens=12, temperature=1.0, keys=keys[:3])


def test_without_keys_a_prompts_kth_sample_is_fixed(model, tokenizer):
    c0, c1, c2, c3 = CONVERSATIONS
    a, b = backend(model, tokenizer, max_batch=4), backend(model, tokenizer, max_batch=2)
    together = a.chat([c0, c1, c0, c2], max_tokens=12, temperature=1.0)
    assert together[0] != together[2]  # the same prompt twice in one call: its 1st and 2nd samples
    # b meets c1 first, then c0 twice, in other batches: each prompt's k-th sample is the same.
    first = b.chat([c3, c1], max_tokens=12, temperature=1.0) + b.chat([c0, c2], max_tokens=12, temperature=1.0)
    assert first[1:] == [together[1], together[0], together[3]]
    assert b.chat([c0, c3], max_tokens=12, temperature=1.0)[0] == together[2]
    other_seed = backend(model, tokenizer, seed=1, max_batch=2).chat([c0, c1], max_tokens=12, temperature=1.0)
    assert other_seed[0] != together[0]


def test_sample_turns_from_ids_equal_from_conversations(model, tokenizer):
    b = backend(model, tokenizer)
    keys = row_keys(3, [(i,) for i in range(2)])
    ids = [b.encode(c) for c in CONVERSATIONS[:2]]
    from_ids = b.sample_turns(ids, max_tokens=12, temperature=1.0, keys=keys)
    from_text = b.sample_turns(CONVERSATIONS[:2], max_tokens=12, temperature=1.0, keys=keys)
    for x, y in zip(from_ids, from_text, strict=True):
        assert x.ids.tolist() == y.ids.tolist() and x.ids.dtype == np.int32
        assert x.text == tokenizer.decode(x.ids, skip_special_tokens=True)
        assert len(x.logprobs) == len(x.ids) and (x.logprobs <= 0).all()
        assert x.stopped == (x.ids[-1] in b.eos_ids)
