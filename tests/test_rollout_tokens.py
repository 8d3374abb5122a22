"""Token in, token out: rollouts train on what was sampled (tiny random model plus a bigram bias that makes it
open every turn with `question:` and end some turns itself; the tiny tokenizer's ChatML template)."""

import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from promed_jax.backends.local import LocalBackend
from promed_jax.consult import protocol
from promed_jax.consult.patients import FactSelectPatient
from promed_jax.consult.rollout import TokenTemplate, rollout
from promed_jax.data import synthetic
from promed_jax.models import ModelConfig, Transformer
from promed_jax.models.transformer import causal_mask, positions_from_mask
from promed_jax.text.dialogue import render_dialogue
from promed_jax.text.tokenizer import build_tiny_tokenizer

MAX_NEW = 8
SEED = 11


class BiasedTransformer(nnx.Module):
    """A tiny random Transformer whose logits get `bias[previous token]` added: a real model of the whole
    context (the bias is part of it, so a full forward recomputes the sampler's log-probs)."""

    def __init__(self, tokenizer):
        self.base = Transformer(ModelConfig.tiny(vocab_size=len(tokenizer)), rngs=nnx.Rngs(0))
        self.config = self.base.config
        vocab = self.config.vocab_size
        bias = np.zeros((vocab, vocab), np.float32)
        bias[:, tokenizer.eos_token_id] = 4.0  # each token ends the turn with probability ~0.2 at T = 0.7
        # "assistant\n" -> "question:" (the tiny tokenizer: "\n", "qu", "estion", ":")
        chain = tokenizer("\nquestion:", add_special_tokens=False)["input_ids"]
        for a, b in itertools.pairwise(chain):
            bias[a, b] = 40.0
        self.bias = nnx.Variable(jnp.asarray(bias))

    def materialize_head(self):
        self.base.materialize_head()

    def __call__(self, tokens, positions, mask, *, cache=None, cache_index=None, use_lora=True):
        logits, cache = self.base(tokens, positions, mask, cache=cache, cache_index=cache_index, use_lora=use_lora)
        return logits + self.bias[...][tokens], cache


class Recording:
    """The real backend's `sample_turns`, recording every prompt and sampled turn."""

    def __init__(self, backend):
        self.backend, self.calls = backend, []

    def sample_turns(self, prompts, **kwargs):
        turns = self.backend.sample_turns(prompts, **kwargs)
        self.calls.append(([list(p) for p in prompts], turns))
        return turns


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer):
    return BiasedTransformer(tokenizer)


@pytest.fixture(scope="module")
def cases():
    # A longer history puts every turn's prompt in one length bucket (513..1024 tokens): one compilation.
    history = " She reports fatigue, weight loss, night sweats, joint pain, back pain and frequent urination." * 4
    return [dataclasses.replace(c, initial_info=c.initial_info + history) for c in synthetic.make_cases(2, seed=5)]


def run(model, tokenizer, cases, **kwargs):
    # Batches of 2 rows, whichever cases run: one batch bucket.
    doctor = Recording(LocalBackend.from_model(model, tokenizer, max_batch=2))
    out = rollout(
        cases,
        doctor,
        FactSelectPatient(),
        tokenizer,
        samples=2,
        max_questions=2,
        max_new_tokens=MAX_NEW,
        temperature=0.7,
        seed=SEED,
        **kwargs,
    )
    return out, doctor


@pytest.fixture(scope="module")
def result(model, tokenizer, cases):
    return run(model, tokenizer, cases)


def test_doctor_positions_hold_exactly_the_sampled_ids(result):
    out, doctor = result
    assert out.logprobs is not None and out.tokens.shape[1] % 64 == 0
    assert [d.end for d in out.dialogues] == [protocol.END_QUESTION_LIMIT] * 4  # 3 doctor turns each
    assert 512 < min(len(p) for p in doctor.calls[0][0]) and max(len(p) for p in doctor.calls[-1][0]) <= 1024
    # Round r's live rows are the dialogues in order (all run to the question limit).
    for k, (prompts, turns) in enumerate(doctor.calls, start=1):
        for row, (prompt, turn) in enumerate(zip(prompts, turns, strict=True)):
            ids, mask, turn_ids = out.tokens[row], out.role_mask[row], out.turn_ids[row]
            assert ids[mask & (turn_ids == k)].tolist() == turn.ids.tolist()
            np.testing.assert_array_equal(out.logprobs[row][mask & (turn_ids == k)], turn.logprobs)
            assert ids[: len(prompt)].tolist() == prompt  # each turn was sampled from the rollout's own ids
            assert out.dialogues[row].messages[2 * k - 1]["content"] == turn.text
    assert (out.logprobs[~out.role_mask] == 0).all()


def test_a_cut_turn_gets_its_end_of_turn_token_outside_the_mask(result, tokenizer):
    out, doctor = result
    eot = tokenizer.eos_token_id
    seen = {True: 0, False: 0}
    for k, (_, turns) in enumerate(doctor.calls, start=1):
        for row, turn in enumerate(turns):
            at = np.flatnonzero(out.turn_ids[row] == k)
            doctor_at = at[out.role_mask[row, at]]
            after = doctor_at[-1] + 1
            seen[bool(turn.stopped)] += 1
            if turn.stopped:  # the model sampled the end-of-turn token: it is the turn's last masked id
                assert turn.ids[-1] == eot and out.tokens[row, doctor_at[-1]] == eot
                assert out.tokens[row, after] != eot
            else:  # cut at the limit: the template's end-of-turn token follows, off the mask
                assert len(turn.ids) == MAX_NEW and eot not in turn.ids.tolist()
                assert out.tokens[row, after] == eot and not out.role_mask[row, after]
    assert seen[True] and seen[False], seen


def test_full_forward_recomputes_the_samplers_logprobs(result, model):
    out, _ = result
    graphdef, params = nnx.split(model)

    @jax.jit
    def logprobs(params, tokens, valid):
        logits, _ = nnx.merge(graphdef, params)(tokens, positions_from_mask(valid), causal_mask(valid))
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)[:, :-1]
        return jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]

    valid = np.arange(out.tokens.shape[1])[None] < out.lengths[:, None]
    recomputed = np.asarray(logprobs(params, jnp.asarray(out.tokens), jnp.asarray(valid)))
    mask = out.role_mask[:, 1:]
    assert mask.sum() > 40
    np.testing.assert_allclose(recomputed[mask], out.logprobs[:, 1:][mask], atol=1e-4)


def test_a_dialogue_is_the_same_in_any_batch(result, model, tokenizer, cases):
    """Keys per row (seed, "rl", step, case, sample, turn): the second case alone reproduces its rows; another
    step samples otherwise."""
    out, _ = result
    alone, _ = run(model, tokenizer, cases[1:])
    for row in range(2):
        np.testing.assert_array_equal(alone.dialogues[row].tokens.ids, out.dialogues[2 + row].tokens.ids)
    later, _ = run(model, tokenizer, cases[1:], step=1)
    assert later.dialogues[0].tokens.ids.tolist() != alone.dialogues[0].tokens.ids.tolist()


@pytest.mark.parametrize("which", ["tiny", "smollm2"])
def test_template_pieces_rebuild_the_rendered_dialogue(which, tokenizer):
    """Opening, generation prompts, sampled ids, closings and replies, as ids, give exactly what the chat
    template renders (SmolLM2's adds a system message); a cut turn's closing starts with the end-of-turn id."""
    if which == "smollm2":
        from conftest import need_smollm2

        from promed_jax.text.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(need_smollm2())
    template = TokenTemplate(tokenizer)
    messages = [
        {"role": "user", "content": "You are a doctor. Options: A. asthma B. pneumonia"},
        {"role": "assistant", "content": "question: Do you have a fever?"},
        {"role": "user", "content": "Yes, since yesterday."},
        {"role": "assistant", "content": "answer: the fever points to B 【answer: B】"},
    ]
    eot = tokenizer.eos_token_id
    ids = template.opening(messages[:1])
    for k in (1, 3):
        ids += template.generation_prompt(messages[:k])
        sampled = tokenizer(messages[k]["content"], add_special_tokens=False)["input_ids"] + [eot]
        ids += sampled + template.closing(messages[:k], sampled)
        if k + 1 < len(messages):
            ids += template.reply(messages[: k + 1], messages[k + 1]["content"])
    assert ids == render_dialogue(tokenizer, messages).ids.tolist()
    cut = tokenizer("question: Do you", add_special_tokens=False)["input_ids"]
    assert template.closing(messages[:1], cut) == [eot, *template.closing(messages[:1], [*cut, eot])]
