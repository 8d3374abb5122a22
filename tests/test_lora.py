"""LoRA adapters: non-zero adapters change the output, `use_lora=False` is the base model, merging is exact."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from promed_jax.models import LoRAParam, ModelConfig, Transformer, causal_mask, positions_from_mask
from promed_jax.models.lora import merge_lora, merged_weights
from promed_jax.models.transformer import from_weights

CFG = ModelConfig.tiny(vocab_size=97, lora_rank=4, lora_alpha=8.0, lora_dropout=0.1)


@pytest.fixture(scope="module")
def model():
    """A LoRA model whose B matrices are random (a fresh adapter is zero and would prove nothing)."""
    model = Transformer(CFG, rngs=nnx.Rngs(0))
    keys = iter(jax.random.split(jax.random.key(7), 2 * CFG.num_layers))
    for block in model.layers:
        for proj in (block.self_attn.q_proj, block.self_attn.v_proj):
            proj.lora.b.set_value(0.3 * jax.random.normal(next(keys), proj.lora.b.shape))
    return model


@pytest.fixture(scope="module")
def inputs():
    valid = jnp.ones((2, 10), bool).at[1, :3].set(False)
    tokens = jax.random.randint(jax.random.key(1), (2, 10), 0, CFG.vocab_size)
    return tokens, positions_from_mask(valid), causal_mask(valid), valid


@nnx.jit(static_argnames="use_lora")
def _logits(model, tokens, positions, mask, use_lora=True):
    return model(tokens, positions, mask, use_lora=use_lora)[0]


def _base_model(model: Transformer) -> Transformer:
    """The same base weights in a model built without adapters."""
    weights = {".".join(map(str, p)): v[...] for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    return from_weights(CFG.replace(lora_rank=0), weights)


def test_adapters_exist_only_on_targets(model):
    attn = model.layers[0].self_attn
    assert attn.q_proj.lora is not None and attn.v_proj.lora is not None
    assert attn.k_proj.lora is None and attn.o_proj.lora is None and model.layers[0].mlp.up_proj.lora is None
    assert attn.q_proj.lora.a.shape == (64, 4) and attn.q_proj.lora.b.shape == (4, 4, 16)


def test_on_differs_from_off_and_off_is_base(model, inputs):
    tokens, positions, mask, valid = inputs
    on = _logits(model, tokens, positions, mask)
    off = _logits(model, tokens, positions, mask, use_lora=False)
    base = _logits(_base_model(model), tokens, positions, mask)
    assert jnp.abs(on - off)[valid].max() > 0.1
    np.testing.assert_array_equal(np.asarray(off), np.asarray(base))


def test_merged_equals_on(model, inputs):
    tokens, positions, mask, _valid = inputs
    merged = merge_lora(model)
    assert merged.config.lora_rank == 0
    on = _logits(model, tokens, positions, mask)
    np.testing.assert_allclose(np.asarray(_logits(merged, tokens, positions, mask)), np.asarray(on), atol=1e-5)
    assert not any(".lora." in k for k in merged_weights(model))


def test_fresh_adapters_leave_the_model_unchanged(inputs):
    tokens, positions, mask, _valid = inputs
    fresh = Transformer(CFG, rngs=nnx.Rngs(3))
    on = _logits(fresh, tokens, positions, mask)
    np.testing.assert_array_equal(np.asarray(on), np.asarray(_logits(fresh, tokens, positions, mask, use_lora=False)))


def test_optimizer_on_lora_params_trains_only_adapters(model, inputs):
    tokens, positions, mask, _valid = inputs
    student = nnx.clone(model)
    optimizer = nnx.Optimizer(student, optax.sgd(0.1), wrt=LoRAParam)

    def loss(m):
        return jnp.mean(m(tokens, positions, mask)[0] ** 2)

    grads = nnx.jit(nnx.grad(loss, argnums=nnx.DiffState(0, LoRAParam)))(student)
    optimizer.update(student, grads)
    before, after = nnx.state(model, nnx.Param), nnx.state(student, nnx.Param)
    for (path, old), (_, new) in zip(nnx.to_flat_state(before), nnx.to_flat_state(after), strict=True):
        changed = not np.array_equal(np.asarray(old[...]), np.asarray(new[...]))
        assert changed == ("lora" in map(str, path)), path


def test_dropout_only_in_training_mode(model, inputs):
    tokens, positions, mask, valid = inputs
    noisy = nnx.clone(model)
    noisy.train()
    first, second = noisy(tokens, positions, mask)[0], noisy(tokens, positions, mask)[0]
    assert jnp.abs(first - second)[valid].max() > 0
    np.testing.assert_allclose(
        np.asarray(noisy(tokens, positions, mask, use_lora=False)[0]),
        np.asarray(_logits(model, tokens, positions, mask, use_lora=False)),
        atol=1e-5,
    )
    noisy.eval()
    np.testing.assert_allclose(
        np.asarray(noisy(tokens, positions, mask)[0]), np.asarray(_logits(model, tokens, positions, mask)), atol=1e-5
    )


def test_bad_lora_config_is_an_error():
    with pytest.raises(ValueError, match="lora_targets"):
        ModelConfig.tiny(lora_rank=2, lora_targets=("q_proj", "wq"))
