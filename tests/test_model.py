"""The decoder against transformers' torch Llama/Qwen2, and its mask/position/cache contract."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import need_torch
from flax import nnx

from promed_jax.models import ModelConfig, Transformer, causal_mask, init_cache, positions_from_mask
from promed_jax.models.checkpoints import hf_tensors, load_hf
from promed_jax.rl.step import _forward as _grpo_forward
from promed_jax.training.sft import sequence_logprobs as sft_forward

torch = need_torch()
from promed_jax.models.testing import random_hf_model, save_hf_model, torch_logits

TOL = 1e-4
LLAMA3_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}
CASES = {
    "llama": {"model_type": "llama", "rope_theta": 500.0, "tie_word_embeddings": True, "head_dim": 16},
    "qwen2": {"model_type": "qwen2", "rope_theta": 2000.0, "tie_word_embeddings": False},
    "llama3_rope": {
        "model_type": "llama",
        "rope_theta": 500_000.0,
        "rope_scaling": LLAMA3_SCALING,
        "attention_bias": True,
    },
}


@pytest.fixture(scope="module", params=sorted(CASES))
def pair(request, tmp_path_factory):
    """(torch model, our model loaded from its safetensors folder, folder)."""
    case = dict(CASES[request.param])
    torch_model = random_hf_model(case.pop("model_type"), seed=1, **case)
    folder = save_hf_model(torch_model, tmp_path_factory.mktemp(request.param))
    return torch_model, load_hf(folder), folder


def _batch(vocab: int, lengths: list[int], total: int, seed: int = 0):
    """Left-padded random tokens: (tokens [B, T], valid [B, T])."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, size=(len(lengths), total), dtype=np.int32)
    valid = np.arange(total)[None, :] >= (total - np.asarray(lengths))[:, None]
    return np.where(valid, tokens, 0).astype(np.int32), valid


@nnx.jit
def _forward(model, tokens, positions, mask):
    return model(tokens, positions, mask)[0]


def _ours(model, tokens, positions, mask):
    return np.asarray(_forward(model, jnp.asarray(tokens), jnp.asarray(positions, jnp.int32), jnp.asarray(mask)))


def test_logits_have_spread(pair):
    torch_model, _, _ = pair
    tokens, _ = _batch(torch_model.config.vocab_size, [12], 12)
    assert torch_logits(torch_model, tokens).std() >= 1.0


def test_left_padded_batch_matches_torch(pair):
    torch_model, model, _ = pair
    tokens, valid = _batch(model.config.vocab_size, [20, 13, 5], 20)
    positions = np.asarray(positions_from_mask(jnp.asarray(valid)))
    ref = torch_logits(torch_model, tokens, valid, positions)
    ours = _ours(model, tokens, positions, causal_mask(jnp.asarray(valid)))
    assert np.abs(ours - ref)[valid].max() <= TOL


def test_custom_positions_match_torch(pair):
    """Positions far from 0 (offset, with a gap) exercise every rotary frequency, scaled ones included."""
    torch_model, model, _ = pair
    tokens, valid = _batch(model.config.vocab_size, [16, 16], 16, seed=1)
    positions = np.stack([np.arange(16) + 300, np.concatenate([np.arange(8) + 3000, np.arange(8) + 3100])])
    ref = torch_logits(torch_model, tokens, valid, positions)
    ours = _ours(model, tokens, positions, causal_mask(jnp.asarray(valid)))
    assert np.abs(ours - ref).max() <= TOL


def test_masked_spans_match_torch_on_compacted_sequence(pair):
    """Masking spans out of one sequence (keys dropped, positions recomputed over the kept tokens) gives, at
    the kept tokens, torch's logits of the compacted sequence."""
    torch_model, model, _ = pair
    tokens, _ = _batch(model.config.vocab_size, [24], 24, seed=2)
    keep = np.ones(24, bool)
    keep[[3, 4, 5, 11, 12, 19]] = False
    ref = torch_logits(torch_model, tokens[:, keep])
    mask = causal_mask(jnp.asarray(keep)[None]) & jnp.asarray(keep)[None, None, :]
    ours = _ours(model, tokens, positions_from_mask(jnp.asarray(keep)[None]), mask)
    assert np.abs(ours[:, keep] - ref).max() <= TOL


def test_training_gradients_match_torch(pair):
    """The SFT loss's gradient of every parameter against torch autograd on the same model: the custom VJPs
    of the projections (`models/dense.py`) and of the chunked log-softmax (`training/logprobs.py`), the
    blocked causal attention and the tied head, on a right-padded batch with a loss mask."""
    torch = need_torch()
    torch_model, model, _ = pair
    vocab = model.config.vocab_size
    rng = np.random.default_rng(5)
    tokens = rng.integers(0, vocab, (2, 19)).astype(np.int32)
    valid = np.arange(19)[None] < np.array([[19], [12]])
    targets = np.where(valid, rng.integers(0, vocab, (2, 19)), 0).astype(np.int32)
    weights = valid & (rng.random((2, 19)) < 0.7)
    cfg = model.config.replace(attention_block=8)  # 19 tokens: three query blocks, the last short
    ours = nnx.merge(nnx.graphdef(Transformer(cfg, rngs=nnx.Rngs(0))), nnx.state(model))
    batch = {k: jnp.asarray(v) for k, v in {"tokens": tokens, "targets": targets, "valid": valid}.items()}

    def loss(m):
        return -(sft_forward(m, batch, chunk=40) * jnp.asarray(weights, jnp.float32)).sum()

    grads = nnx.jit(nnx.grad(loss))(ours)
    as_model = nnx.merge(nnx.graphdef(ours), grads)
    ours_by_name = dict(hf_tensors(as_model))

    torch_model.zero_grad()
    logits = torch_model(
        input_ids=torch.tensor(tokens, dtype=torch.int64), attention_mask=torch.tensor(valid, dtype=torch.int64)
    ).logits.float()
    logp = torch.log_softmax(logits, -1).gather(-1, torch.tensor(targets, dtype=torch.int64)[..., None])[..., 0]
    (-(logp * torch.tensor(weights, dtype=torch.float32)).sum()).backward()
    ref = {n: p.grad.numpy() for n, p in torch_model.named_parameters() if p.grad is not None}
    assert set(ours_by_name) == set(ref)
    for name, g in ref.items():
        assert np.abs(ours_by_name[name] - g).max() <= 1e-4 * max(np.abs(g).max(), 1.0), name


def test_wrong_rope_theta_fails_tolerance(pair):
    """The parity tolerance is tight enough to catch a wrong theta (the tests can fail)."""
    torch_model, model, folder = pair
    wrong = load_hf(folder, rope_theta=model.config.rope_theta * 1.5)
    tokens, valid = _batch(model.config.vocab_size, [20], 20)
    ref = torch_logits(torch_model, tokens)
    ours = _ours(wrong, tokens, positions_from_mask(jnp.asarray(valid)), causal_mask(jnp.asarray(valid)))
    assert np.abs(ours - ref).max() > 100 * TOL


def test_config_layouts_agree(pair):
    """transformers 5 writes `rope_parameters`; the transformers 4 layout (`rope_theta` + `rope_scaling`) of
    the same model reads to the same config."""
    _, model, folder = pair
    hf5 = json.loads((folder / "config.json").read_text())
    assert "rope_parameters" in hf5
    hf4 = {k: v for k, v in hf5.items() if k != "rope_parameters"}
    params = dict(hf5["rope_parameters"])
    hf4["rope_theta"] = params.pop("rope_theta")
    if params.pop("rope_type") != "default":
        hf4["rope_scaling"] = {"type": "llama3", **params}
    assert ModelConfig.from_hf(hf4) == ModelConfig.from_hf(hf5) == model.config


@pytest.fixture(scope="module")
def tiny():
    return Transformer(ModelConfig.tiny(vocab_size=97), rngs=nnx.Rngs(0))


def test_masking_property_in_jax(tiny):
    """Masked-out spans + recomputed positions == the compacted sequence, in a left-padded batch."""
    tokens, valid = _batch(97, [18, 10], 18, seed=3)
    keep = valid.copy()
    keep[0, [2, 3, 9]] = False
    keep[1, [9, 14]] = False
    mask = causal_mask(jnp.asarray(keep))
    full = _ours(tiny, tokens, positions_from_mask(jnp.asarray(keep)), mask)
    for row in range(2):
        kept = tokens[row, keep[row]][None]
        ones = jnp.ones(kept.shape, bool)
        compact = _ours(tiny, kept, positions_from_mask(ones), causal_mask(ones))
        np.testing.assert_allclose(full[row, keep[row]], compact[0], atol=1e-5)


def test_kv_cache_decode_equals_full_forward(tiny):
    tokens, valid = _batch(97, [12, 7], 12, seed=4)
    positions = positions_from_mask(jnp.asarray(valid))
    full = _ours(tiny, tokens, positions, causal_mask(jnp.asarray(valid)))
    size, prefix = 16, 8
    cache = init_cache(tiny.config, 2, size)
    slot_valid = jnp.zeros((2, size), bool).at[:, :12].set(jnp.asarray(valid))
    slots = jnp.arange(size)
    mask = slot_valid[:, None, :] & (slots[None, None, :] <= jnp.arange(prefix)[None, :, None])
    step = nnx.jit(lambda model, *args, cache, index: model(*args, cache=cache, cache_index=index))
    step_logits, cache = step(tiny, jnp.asarray(tokens[:, :prefix]), positions[:, :prefix], mask, cache=cache, index=0)
    pieces = [np.asarray(step_logits)]
    for t in range(prefix, 12):
        mask = (slot_valid & (slots <= t))[:, None, :]
        args = (jnp.asarray(tokens[:, t : t + 1]), positions[:, t : t + 1], mask)
        step_logits, cache = step(tiny, *args, cache=cache, index=jnp.int32(t))
        pieces.append(np.asarray(step_logits))
    decoded = np.concatenate(pieces, axis=1)
    np.testing.assert_allclose(decoded[valid], full[valid], atol=1e-5)


def test_materialized_head_and_remat_keep_logits(tiny):
    tokens, valid = _batch(97, [9], 9, seed=5)
    args = (tokens, positions_from_mask(jnp.asarray(valid)), causal_mask(jnp.asarray(valid)))
    base = _ours(tiny, *args)
    graphdef, state = nnx.split(tiny)
    headed = nnx.merge(graphdef, state)
    headed.materialize_head()
    assert headed.head_kernel().shape == (64, 97)
    np.testing.assert_allclose(_ours(headed, *args), base, atol=1e-5)
    remat = Transformer(tiny.config.replace(remat=True), rngs=nnx.Rngs(0))
    np.testing.assert_allclose(_ours(remat, *args), base, atol=1e-5)

    def loss(model):
        return model(*map(jnp.asarray, args))[0].mean()

    grad = nnx.jit(nnx.grad(loss))
    grads, remat_grads = grad(tiny), grad(remat)
    for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(remat_grads), strict=True):
        np.testing.assert_allclose(g, r, atol=1e-6)


def test_bf16_parameters_run_close_to_fp32(tiny):
    tokens, valid = _batch(97, [9], 9, seed=6)
    args = (tokens, positions_from_mask(jnp.asarray(valid)), causal_mask(jnp.asarray(valid)))
    graphdef, _ = nnx.split(
        Transformer(tiny.config.replace(dtype="bfloat16", param_dtype="bfloat16"), rngs=nnx.Rngs(0))
    )
    weights = jax.tree.map(lambda x: x.astype(jnp.bfloat16), nnx.state(tiny))
    bf16 = nnx.merge(graphdef, weights)
    assert bf16.layers[0].mlp.up_proj.kernel[...].dtype == jnp.bfloat16
    out = _ours(bf16, *args)
    assert out.dtype == np.float32
    assert np.abs(out - _ours(tiny, *args)).max() < 0.1


def test_bad_shapes_are_clear_errors(tiny):
    tokens = jnp.zeros((1, 4), jnp.int32)
    with pytest.raises(ValueError, match="mask"):
        tiny(tokens, jnp.zeros((1, 4), jnp.int32), jnp.ones((1, 4, 5), bool))
    with pytest.raises(ValueError, match="together"):
        tiny(tokens, jnp.zeros((1, 4), jnp.int32), jnp.ones((1, 4, 4), bool), cache=init_cache(tiny.config, 1, 4))


def test_load_model_tiny_from_the_base_config():
    from configs.base import model_config
    from promed_jax.models.loader import load_model

    section = model_config()
    model, tokenizer = load_model(section)
    assert model.config.vocab_size == len(tokenizer)
    assert model.config.lora_rank == section.lora_rank and model.config.num_layers == section.tiny.num_layers
    ids = jnp.asarray([tokenizer("Do you have a fever?")["input_ids"]], jnp.int32)
    valid = jnp.ones(ids.shape, bool)
    assert np.isfinite(_ours(model, ids, positions_from_mask(valid), causal_mask(valid))).all()
    with pytest.raises(ValueError, match="model.kind"):
        load_model({**section.to_dict(), "kind": "onnx"})


def test_grown_prefix_cache_continues_like_the_full_forward(tiny):
    """A one-row prefix cache, grown to two rows with free slots, then two different continuations."""
    prefix = jnp.asarray(_batch(97, [6], 6, seed=7)[0])
    tails = jnp.asarray(_batch(97, [4, 4], 4, seed=8)[0])
    full_tokens = jnp.concatenate([jnp.broadcast_to(prefix, (2, 6)), tails], axis=1)
    ones = jnp.ones((2, 10), bool)
    full = _ours(tiny, full_tokens, positions_from_mask(ones), causal_mask(ones))
    step = nnx.jit(lambda model, *args, cache, index: model(*args, cache=cache, cache_index=index))
    positions = jnp.arange(10, dtype=jnp.int32)[None]
    _, cache = step(
        tiny, prefix, positions[:, :6], causal_mask(ones[:1, :6]), cache=init_cache(tiny.config, 1, 6), index=0
    )
    cache = cache.grow(2, 4)
    assert cache.size == 10 and cache.k[0].shape[0] == 2
    mask = jnp.broadcast_to(causal_mask(ones)[:, 6:], (2, 4, 10))
    logits, _ = step(tiny, tails, jnp.broadcast_to(positions[:, 6:], (2, 4)), mask, cache=cache, index=jnp.int32(6))
    np.testing.assert_allclose(np.asarray(logits), full[:, 6:], atol=1e-5)


@pytest.mark.parametrize("remat", [False, True])
def test_causal_blocks_keep_hidden_states_and_gradients(tiny, remat):
    """`hidden_states(causal=True)` skips the key blocks above the diagonal (`attend`'s causal_block): the
    same hidden states at every attended position and the same gradients, with a length that is not a
    multiple of the block, padding on either side and masked-out spans."""
    cfg = tiny.config.replace(attention_block=8, remat=remat)
    model = nnx.merge(nnx.graphdef(Transformer(cfg, rngs=nnx.Rngs(0))), nnx.state(tiny))
    tokens, valid = _batch(97, [37, 20], 37, seed=8)
    valid[0, [3, 17]] = False
    valid = jnp.asarray(valid)
    args = (jnp.asarray(tokens), positions_from_mask(valid), causal_mask(valid))

    def hidden(m, causal):
        return m.hidden_states(*args, causal=causal)[0]

    graphdef, state = nnx.split(model)
    scores = "f32[2,2,2,37,37]"  # [B, KV, G, T, S]: the one-block scores
    for causal in (True, False):
        jaxpr = str(jax.make_jaxpr(lambda st, c=causal: hidden(nnx.merge(graphdef, st), c))(state))
        assert (scores in jaxpr) is not causal  # the blocked forward never forms them
    batch = {"tokens": args[0], "targets": args[0], "valid": valid}
    # the training losses ask for blocks
    for name, forward in [("sft", sft_forward), ("grpo", functools.partial(_grpo_forward, use_lora=True))]:
        assert scores not in str(jax.make_jaxpr(lambda st, f=forward: f(nnx.merge(graphdef, st), batch))(state)), name
    blocked, whole = nnx.jit(hidden, static_argnums=1)(model, True), nnx.jit(hidden, static_argnums=1)(model, False)
    np.testing.assert_allclose(blocked[valid], whole[valid], atol=1e-5)
    weights = valid.astype(jnp.float32)[..., None]

    def loss(m, causal):
        return (hidden(m, causal) * weights).sum()

    grads = [nnx.jit(nnx.grad(loss), static_argnums=1)(model, c) for c in (True, False)]
    for g, w in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1]), strict=True):
        assert np.abs(g - w).max() <= 1e-5 * np.abs(w).max()  # gradients reach ~400 here: a relative bound
    with pytest.raises(ValueError, match="cache-free"):
        cache = init_cache(cfg, 2, 40)
        model.hidden_states(*args[:2], jnp.ones((2, 37, 40), bool), cache=cache, cache_index=jnp.int32(0), causal=True)
    with pytest.raises(ValueError, match="attention_block"):
        cfg.replace(attention_block=-1)
