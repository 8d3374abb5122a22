"""The KV-cache sampler on a tiny random model: cache decode == full forward, greedy == step-by-step argmax,
padding invariance, top-k/top-p/temperature, EOS and stop sequences/strings, penalties vs transformers."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import need_torch
from flax import nnx

from promed_jax.models.config import ModelConfig
from promed_jax.models.transformer import Transformer, causal_mask, init_cache, positions_from_mask
from promed_jax.sampling import sampler
from promed_jax.sampling.keys import row_key, row_keys
from promed_jax.sampling.sampler import (
    SamplingConfig,
    decode_texts,
    generate,
    stop_sequences_for,
    truncate_at_stop_strings,
)
from promed_jax.text.tokenizer import build_tiny_tokenizer

VOCAB = 1024
PROMPTS = [[5, 17, 300, 41, 9, 77, 120], [900, 3], [64, 65, 66, 67, 68, 69, 70, 71, 72, 73, 74, 75, 76]]
GREEDY = SamplingConfig(max_new_tokens=12, greedy=True)


@pytest.fixture(scope="module")
def model():
    model = Transformer(ModelConfig.tiny(vocab_size=VOCAB), rngs=nnx.Rngs(0))
    model.materialize_head()
    return model


@pytest.fixture(scope="module")
def split(model):
    return nnx.split(model)


@jax.jit
def _forward(graphdef, params, tokens, positions, mask, cache=None, cache_index=None):
    model = nnx.merge(graphdef, params)
    return model(tokens, positions, mask, cache=cache, cache_index=cache_index)


def full_logits(split, sequence, length=32):
    """float32[len(sequence), V] logits of one unpadded sequence, without a cache.

    The sequence is right-padded to a fixed length (causal attention: the padding never reaches it), so
    every call reuses one compiled forward.
    """
    tokens = jnp.zeros((1, length), jnp.int32).at[0, : len(sequence)].set(jnp.asarray(sequence))
    valid = jnp.ones_like(tokens, bool)
    return _forward(*split, tokens, positions_from_mask(valid), causal_mask(valid))[0][0, : len(sequence)]


def reference_greedy(split, prompt, steps):
    """Greedy decoding by re-running the full forward each step: (tokens, raw log-probs)."""
    sequence, logprobs = list(prompt), []
    for _ in range(steps):
        logits = full_logits(split, sequence)[-1]
        token = int(jnp.argmax(logits))
        logprobs.append(float(jax.nn.log_softmax(logits)[token]))
        sequence.append(token)
    return sequence[len(prompt) :], np.array(logprobs)


def test_cache_decode_equals_full_forward(model, split):
    """Prefill a left-padded batch, then feed tokens one at a time: logits match the uncached forward."""
    rows = [[3, 14, 15, 92, 65, 35, 89, 79, 32, 38], [46, 26, 43, 38, 32, 79]]
    prefill, total = 4, 10
    size = 16
    tokens = np.zeros((2, total), np.int32)
    valid = np.zeros((2, total), bool)
    for b, row in enumerate(rows):
        tokens[b, total - len(row) :] = row
        valid[b, total - len(row) :] = True
    positions = positions_from_mask(jnp.asarray(valid))
    slots_valid = np.concatenate([valid, np.ones((2, size - total), bool)], axis=1)
    cache = init_cache(model.config, 2, size)
    mask = np.pad(np.asarray(causal_mask(jnp.asarray(valid[:, :prefill]))), ((0, 0), (0, 0), (0, size - prefill)))
    logits, cache = _forward(*split, tokens[:, :prefill], positions[:, :prefill], mask, cache, jnp.int32(0))
    cached_logits = [logits]
    for t in range(prefill, total):
        step_mask = (slots_valid & (np.arange(size) <= t))[:, None, :]
        logits, cache = _forward(*split, tokens[:, t : t + 1], positions[:, t : t + 1], step_mask, cache, jnp.int32(t))
        cached_logits.append(logits)
    cached_logits = np.concatenate(cached_logits, axis=1)
    for b, row in enumerate(rows):
        expected = np.asarray(full_logits(split, row))
        got = cached_logits[b, total - len(row) :]
        np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


def test_greedy_equals_stepwise_argmax_and_logprobs(split):
    out = generate(*split, PROMPTS, GREEDY, jax.random.key(0))
    assert out.tokens.shape == (3, 12) and out.lengths.tolist() == [12, 12, 12] and not out.stopped.any()
    for b, prompt in enumerate(PROMPTS):
        tokens, logprobs = reference_greedy(split, prompt, 12)
        assert out.tokens[b].tolist() == tokens
        np.testing.assert_allclose(out.logprobs[b], logprobs, atol=1e-4)


def test_padding_invariance(split):
    """A prompt alone gives the same tokens as in a left-padded batch of 3 (padded to 4 rows)."""
    batched = generate(*split, PROMPTS, GREEDY, jax.random.key(0))
    for b, prompt in enumerate(PROMPTS):
        alone = generate(*split, [prompt], GREEDY, jax.random.key(0))
        assert alone.tokens[0].tolist() == batched.tokens[b].tolist()
        np.testing.assert_allclose(alone.logprobs[0], batched.logprobs[b], atol=1e-5)


def test_chunked_prefill_equals_one_chunk(split):
    """A 40-token prompt (bucket 64) prefilled 16 tokens at a time gives the same tokens and log-probs."""
    prompts = [list(range(40, 80)), PROMPTS[1]]
    whole = generate(*split, prompts, GREEDY, jax.random.key(0))
    chunked = generate(*split, prompts, GREEDY, jax.random.key(0), prefill_chunk=16)
    assert chunked.tokens.tolist() == whole.tokens.tolist()
    np.testing.assert_allclose(chunked.logprobs, whole.logprobs, atol=1e-5)


def test_top_k_one_and_tiny_top_p_equal_greedy(split):
    greedy = generate(*split, PROMPTS, GREEDY, jax.random.key(0))
    for changes in ({"top_k": 1}, {"top_p": 1e-6}):
        config = dataclasses.replace(GREEDY, greedy=False, temperature=1.3, **changes)
        sampled = generate(*split, PROMPTS, config, jax.random.key(7))
        assert sampled.tokens.tolist() == greedy.tokens.tolist(), changes


def test_sampling_is_seeded_and_varies(split):
    config = SamplingConfig(max_new_tokens=12, temperature=1.0)
    first = generate(*split, PROMPTS, config, jax.random.key(1))
    again = generate(*split, PROMPTS, config, jax.random.key(1))
    other = generate(*split, PROMPTS, config, jax.random.key(2))
    assert first.tokens.tolist() == again.tokens.tolist()
    assert first.tokens.tolist() != other.tokens.tolist()


def test_first_token_frequencies_follow_the_filtered_distribution(split):
    """512 samples of one token at temperature 0.5 with top-k 4: frequencies match the renormalized probs."""
    prompt = PROMPTS[0]
    config = SamplingConfig(max_new_tokens=1, temperature=0.5, top_k=4)
    out = generate(*split, [prompt] * 512, config, jax.random.key(3))
    logits = np.asarray(full_logits(split, prompt)[-1], np.float64) / 0.5
    top = np.argsort(-logits)[:4]
    probs = np.exp(logits[top] - logits[top].max())
    probs /= probs.sum()
    counts = np.array([(out.tokens[:, 0] == t).sum() for t in top])
    assert counts.sum() == 512
    np.testing.assert_allclose(counts / 512, probs, atol=4 * np.sqrt(0.25 / 512))


def test_eos_and_stop_sequences(split):
    free = generate(*split, PROMPTS, GREEDY, jax.random.key(0))
    row = free.tokens[0].tolist()
    eos = row[5]
    first = row.index(eos)
    out = generate(*split, PROMPTS, dataclasses.replace(GREEDY, eos_ids=(eos,), pad_id=1), jax.random.key(0))
    assert out.lengths[0] == first + 1 and out.stopped[0]
    assert out.tokens[0, : first + 1].tolist() == row[: first + 1] and (out.tokens[0, first + 1 :] == 1).all()
    assert (out.logprobs[0, first + 1 :] == 0).all()

    stop = tuple(free.tokens[1, 6:9].tolist())
    out = generate(*split, PROMPTS, dataclasses.replace(GREEDY, stop_sequences=(stop,)), jax.random.key(0))
    ends = [n for n in range(len(stop), 13) if tuple(free.tokens[1, n - len(stop) : n].tolist()) == stop]
    assert out.lengths[1] == ends[0] and out.stopped[1]
    assert out.tokens[1, : ends[0]].tolist() == free.tokens[1, : ends[0]].tolist()


def test_max_new_tokens_within_a_bucket_does_not_recompile(split):
    generate(*split, PROMPTS, GREEDY, jax.random.key(0))
    compiled = sampler._decode._cache_size()
    shorter = [p[:-1] for p in PROMPTS]
    out = generate(*split, shorter, dataclasses.replace(GREEDY, max_new_tokens=9), jax.random.key(0))
    assert out.tokens.shape == (3, 9) and out.lengths.tolist() == [9, 9, 9]
    assert sampler._decode._cache_size() == compiled


def test_stop_strings_on_text(split):
    tokenizer = build_tiny_tokenizer()
    prompt = tokenizer("Doctor: Do you have a fever?", add_special_tokens=False)["input_ids"]
    free = generate(*split, [prompt], dataclasses.replace(GREEDY, max_new_tokens=16), jax.random.key(0))
    text = tokenizer.decode(free.sequences()[0])
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    cut = truncate_at_stop_strings(tokenizer, free, [stop])
    n = int(cut.lengths[0])
    assert stop in tokenizer.decode(free.tokens[0, :n]) and stop not in tokenizer.decode(free.tokens[0, : n - 1])
    assert cut.stopped[0] and (cut.logprobs[0, n:] == 0).all()
    assert decode_texts(tokenizer, cut, [stop])[0] == text[: text.find(stop)]
    assert stop_sequences_for(tokenizer, ["<|im_end|>"]) == ((tokenizer.eos_token_id,),)


def test_bad_config_is_rejected():
    with pytest.raises(ValueError, match="top_p"):
        SamplingConfig(top_p=0.0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        SamplingConfig(max_new_tokens=0)


# --- logits processors against transformers' own -------------------------------------------------------


@pytest.fixture(scope="module")
def processor_inputs():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 50)).astype(np.float32) * 3
    history = rng.integers(0, 8, size=(3, 20)).astype(np.int32)  # a small alphabet, so n-grams repeat
    return logits, history


def test_repetition_penalty_matches_transformers(processor_inputs):
    torch = need_torch()
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    logits, history = processor_inputs
    expected = RepetitionPenaltyLogitsProcessor(1.1)(torch.tensor(history).long(), torch.tensor(logits)).numpy()
    got = sampler.repetition_penalty(jnp.asarray(logits), jnp.asarray(history), jnp.ones(history.shape, bool), 1.1)
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-6)


@pytest.mark.parametrize("n", [1, 2, 3])
def test_no_repeat_ngram_matches_transformers(processor_inputs, n):
    torch = need_torch()
    from transformers.generation.logits_process import NoRepeatNGramLogitsProcessor

    logits, history = processor_inputs
    expected = NoRepeatNGramLogitsProcessor(n)(torch.tensor(history).long(), torch.tensor(logits)).numpy()
    # Our buffer is longer than the history: left padding before it and unwritten slots after it.
    buffer = np.concatenate([np.full((3, 4), 7), history, np.full((3, 6), 5)], axis=1).astype(np.int32)
    in_history = np.zeros(buffer.shape, bool)
    in_history[:, 4:24] = True
    got = sampler.ban_repeated_ngrams(jnp.asarray(logits), jnp.asarray(buffer), jnp.asarray(in_history), 23, n)
    assert np.isinf(expected).any()
    np.testing.assert_array_equal(np.asarray(got), expected)


@pytest.mark.parametrize(("top_k", "top_p"), [(5, 1.0), (0, 0.8), (10, 0.6), (0, 0.05), (100, 0.9)])
def test_top_k_top_p_match_transformers(processor_inputs, top_k, top_p):
    torch = need_torch()
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    logits, _ = processor_inputs
    expected = torch.tensor(logits)
    if top_k:
        expected = TopKLogitsWarper(top_k)(None, expected)
    if top_p < 1:
        expected = TopPLogitsWarper(top_p)(None, expected)
    got = sampler.filter_top_k_top_p(jnp.asarray(logits), top_k, top_p)
    np.testing.assert_array_equal(np.isinf(np.asarray(got)), np.isinf(expected.numpy()))


# --- greedy generation against transformers' generate (torch) ----------------------------------------------

TORCH_CASES = {
    "llama": {"rope_theta": 500.0, "tie_word_embeddings": True, "head_dim": 16},
    "qwen2": {"rope_theta": 2000.0, "tie_word_embeddings": False},
}


@pytest.mark.parametrize("model_type", sorted(TORCH_CASES))
def test_greedy_equals_transformers_generate(model_type, tmp_path):
    torch = need_torch()
    from promed_jax.models.checkpoints import load_hf
    from promed_jax.models.testing import random_hf_model, save_hf_model

    torch_model = random_hf_model(model_type, seed=2, **TORCH_CASES[model_type])
    ours = load_hf(save_hf_model(torch_model, tmp_path))
    ours.materialize_head()
    split = nnx.split(ours)
    prompts = [[p % 256 for p in prompt] for prompt in PROMPTS]
    steps = 16
    out = generate(*split, prompts, dataclasses.replace(GREEDY, max_new_tokens=steps), jax.random.key(0))

    total = max(len(p) for p in prompts)
    tokens = torch.tensor([[0] * (total - len(p)) + p for p in prompts])
    attention = torch.tensor([[0] * (total - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        expected = torch_model.generate(
            input_ids=tokens,
            attention_mask=attention,
            do_sample=False,
            max_new_tokens=steps,
            min_new_tokens=steps,
            pad_token_id=0,
            eos_token_id=None,
        )[:, total:].numpy()
    compared = 0
    for b, prompt in enumerate(prompts):
        for t in range(steps):
            if out.tokens[b, t] != expected[b, t]:
                # Only a near-tie may break the agreement; after it the continuations legitimately differ.
                logits = np.sort(np.asarray(full_logits(split, prompt + out.tokens[b, :t].tolist())[-1]))
                assert logits[-1] - logits[-2] <= 1e-3, (b, t)
                break
            compared += 1
    assert compared >= 0.9 * len(prompts) * steps


# --- keys per row: a row's tokens depend on its prompt and its key only -----------------------------------

ROW_PROMPTS = [[(7 * i + 3 * j) % VOCAB + 1 for j in range(2 * i + 1)] for i in range(8)]  # 1..15 tokens
ROW_CONFIG = SamplingConfig(max_new_tokens=10, temperature=1.0, repetition_penalty=1.1)


def test_per_row_keys_make_a_batch_equal_its_rows_alone(split):
    """8 prompts sampled together == each alone with its key; == inside a batch padded to 16, reversed."""
    keys = row_keys(0, [("test", i) for i in range(8)])
    together = generate(*split, ROW_PROMPTS, ROW_CONFIG, keys)
    assert len({tuple(s) for s in together.sequences()}) == 8
    extra = [[11, 12], [13], [14, 15, 16]]
    padded = generate(*split, ROW_PROMPTS + extra, ROW_CONFIG, jnp.concatenate([keys, row_keys(1, [(0,), (1,), (2,)])]))
    reverse = generate(*split, ROW_PROMPTS[::-1], ROW_CONFIG, keys[::-1])
    for b, prompt in enumerate(ROW_PROMPTS):
        alone = generate(*split, [prompt], ROW_CONFIG, keys[b : b + 1])
        for other, row in ((alone, 0), (padded, b), (reverse, 7 - b)):
            assert other.tokens[row].tolist() == together.tokens[b].tolist(), b
            np.testing.assert_allclose(other.logprobs[row], together.logprobs[b], atol=1e-5)
    # The key decides: another key for row 0 changes row 0 only.
    moved = generate(*split, ROW_PROMPTS, ROW_CONFIG, keys.at[0].set(row_key(9, "other")))
    assert moved.tokens[0].tolist() != together.tokens[0].tolist()
    assert moved.tokens[1:].tolist() == together.tokens[1:].tolist()


def test_wrong_number_of_keys_is_rejected(split):
    with pytest.raises(ValueError, match="one key per prompt"):
        generate(*split, ROW_PROMPTS[:3], ROW_CONFIG, row_keys(0, [(0,), (1,)]))


def test_temperature_eos_and_stop_sequences_do_not_recompile(split):
    """Three temperatures x two stop sets (and their EOS ids) run on the prefill and decode compiled once."""
    base = SamplingConfig(max_new_tokens=8, temperature=0.5)
    keys = row_keys(0, [(b,) for b in range(len(PROMPTS))])
    generate(*split, PROMPTS, base, keys)
    compiled = (sampler._prefill._cache_size(), sampler._decode._cache_size())
    outputs = {}
    for temperature in (0.3, 0.7, 1.3):
        for stops in (((5, 6),), ((7,), (8, 9, 10))):
            config = dataclasses.replace(base, temperature=temperature, stop_sequences=stops, eos_ids=(stops[0][0],))
            outputs[temperature, stops] = generate(*split, PROMPTS, config, keys).tokens.tolist()
    assert (sampler._prefill._cache_size(), sampler._decode._cache_size()) == compiled
    assert outputs[0.3, ((5, 6),)] != outputs[1.3, ((5, 6),)]  # the temperature is read, not baked in


# --- RL sampling settings: the penalty and the n-gram ban see the current turn only ------------------------

RL = SamplingConfig(max_new_tokens=32, temperature=0.7, repetition_penalty=1.1, no_repeat_ngram_size=3)


class ScriptModel(nnx.Module):
    """Writes a fixed script by position, whatever the context: logit 30 for `script[p]` at position p (the
    token to follow it), 15 for `fallback`, 0 elsewhere. Only the sampler's bans and penalties can stop it."""

    def __init__(self, vocab: int, script: dict[int, int], fallback: int):
        self.config = ModelConfig.tiny(vocab_size=vocab)
        table = np.full(4096, fallback, np.int32)
        for position, token in script.items():
            table[position] = token
        self.table = nnx.Variable(jnp.asarray(table))
        self.fallback = fallback

    def __call__(self, tokens, positions, mask, *, cache=None, cache_index=None, use_lora=True):
        vocab = jnp.arange(self.config.vocab_size)
        want = self.table[...][positions][..., None]
        return jnp.where(vocab == want, 30.0, jnp.where(vocab == self.fallback, 15.0, 0.0)), cache


def scripted_turn(tokenizer, messages, turn: str, *, penalize_prompt: bool) -> tuple[list[int], list[int]]:
    """(what the script says, what the RL sampler wrote) for the doctor turn after `messages`."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    prompt = tokenizer(text, add_special_tokens=False)["input_ids"]
    want = tokenizer(turn, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    model = ScriptModel(len(tokenizer), {len(prompt) - 1 + i: t for i, t in enumerate(want)}, fallback=0)
    config = dataclasses.replace(RL, eos_ids=(tokenizer.eos_token_id,), penalize_prompt=penalize_prompt)
    out = generate(*nnx.split(model), [prompt], config, row_keys(0, [(0,)]))
    return want, out.sequences()[0]


def test_second_turn_can_start_with_question():
    from promed_jax.consult import protocol
    from promed_jax.data import synthetic

    tokenizer = build_tiny_tokenizer()
    case = synthetic.make_cases(1, seed=3)[0]
    messages = [
        {"role": "user", "content": protocol.doctor_first_message(case)},
        {"role": "assistant", "content": "question: Do you have a fever?"},
        {"role": "user", "content": "Yes, since yesterday."},
    ]
    want, got = scripted_turn(tokenizer, messages, "question: Do you smoke?", penalize_prompt=False)
    assert got == want
    # Over the whole dialogue (transformers' semantics) the 3-gram `assistant \n question` is banned.
    _, banned = scripted_turn(tokenizer, messages, "question: Do you smoke?", penalize_prompt=True)
    assert banned[0] != want[0]


def test_answer_can_carry_the_bracket_the_instruction_shows(smollm2_gguf):
    """SmolLM2's tokenizer: `answer` is one token, so the turn's own `answer:` and `【answer:` share no 3-gram
    (the tiny tokenizer splits it in two, and there the turn's first `answer:` bans the second)."""
    from promed_jax.consult import protocol
    from promed_jax.data import synthetic
    from promed_jax.text.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(smollm2_gguf)
    case = synthetic.make_cases(1, seed=3)[0]
    messages = [{"role": "user", "content": protocol.doctor_first_message(case)}]
    assert "【answer: X】" in messages[0]["content"]
    turn = "answer: the fever points to A 【answer: A】"
    want, got = scripted_turn(tokenizer, messages, turn, penalize_prompt=False)
    assert got == want and protocol.parse_doctor_turn(tokenizer.decode(got[:-1]), case.options).letters == ("A",)
    _, banned = scripted_turn(tokenizer, messages, turn, penalize_prompt=True)
    assert "【answer:" not in tokenizer.decode(banned)
