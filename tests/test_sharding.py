"""Logical axes -> a 2x4 mesh of fake CPU devices: kernels really split, logits unchanged."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType, PartitionSpec

from promed_jax.models import ModelConfig, Transformer, causal_mask, positions_from_mask
from promed_jax.models.checkpoints import load_hf, save_hf
from promed_jax.sharding import logical_to_spec, make_mesh, shard_model

CFG = ModelConfig.tiny(vocab_size=96, num_kv_heads=4, lora_rank=2, tie_word_embeddings=False)


@pytest.fixture(scope="module")
def mesh():
    if jax.device_count() < 8:
        pytest.skip("needs 8 (fake) devices")
    return make_mesh((2, 4), ("fsdp", "tensor"))


@pytest.fixture(scope="module")
def inputs():
    valid = jnp.ones((4, 12), bool).at[1, :5].set(False)
    tokens = jax.random.randint(jax.random.key(0), (4, 12), 0, CFG.vocab_size)
    return tokens, positions_from_mask(valid), causal_mask(valid)


@jax.jit
def _forward(graphdef, state, tokens, positions, mask):
    return nnx.merge(graphdef, state)(tokens, positions, mask)[0]


def _shard_shape(array: jax.Array) -> tuple[int, ...]:
    return array.addressable_shards[0].data.shape


def test_mesh_helper():
    mesh = make_mesh((2, -1), ("fsdp", "tensor"))
    assert dict(mesh.shape) == {"fsdp": 2, "tensor": jax.device_count() // 2}
    assert mesh.axis_types == (AxisType.Auto, AxisType.Auto)
    with pytest.raises(ValueError, match="devices"):
        make_mesh((jax.device_count() + 1,), ("data",))


def test_rules_replicate_what_cannot_split(mesh):
    assert logical_to_spec(("embed", "heads", None), (64, 4, 16), mesh) == PartitionSpec("fsdp", "tensor", None)
    # 3 heads do not divide over 4 devices; an unknown or absent name stays replicated.
    assert logical_to_spec(("embed", "heads", None), (64, 3, 16), mesh) == PartitionSpec("fsdp", None, None)
    assert logical_to_spec(("batch", "mlp"), (8, 128), mesh) == PartitionSpec(None, "tensor")


def test_sharded_forward_matches_single_device(mesh, inputs):
    model = Transformer(CFG, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    reference = _forward(graphdef, state, *inputs)
    shard_model(model, mesh)
    attn = model.layers[0].self_attn
    assert _shard_shape(attn.q_proj.kernel[...]) == (32, 1, 16)  # [D, H, hd] / (fsdp=2, tensor=4)
    assert _shard_shape(attn.o_proj.kernel[...]) == (1, 16, 32)
    assert _shard_shape(model.layers[0].mlp.down_proj.kernel[...]) == (32, 32)
    assert _shard_shape(model.embed[...]) == (24, 32)
    assert _shard_shape(model.lm_head[...]) == (32, 24)
    assert _shard_shape(attn.q_proj.lora.a[...]) == (32, 2)
    assert len(attn.q_proj.kernel[...].sharding.device_set) == 8
    graphdef, state = nnx.split(model)
    sharded = _forward(graphdef, state, *inputs)
    np.testing.assert_allclose(np.asarray(sharded), np.asarray(reference), atol=1e-5)


def test_checkpoint_loads_onto_the_mesh(mesh, inputs, tmp_path):
    source = Transformer(CFG.replace(lora_rank=0), rngs=nnx.Rngs(1))
    save_hf(source, tmp_path)
    model = load_hf(tmp_path, mesh=mesh)
    assert _shard_shape(model.layers[1].mlp.up_proj.kernel[...]) == (32, 32)
    np.testing.assert_allclose(
        np.asarray(_forward(*nnx.split(model), *inputs)), np.asarray(_forward(*nnx.split(source), *inputs)), atol=1e-5
    )
