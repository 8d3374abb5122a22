"""Checkpoint I/O: HF folders (single, sharded, bf16) in, clear errors, safetensors format, export round trip."""

import json
import shutil

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from conftest import need_torch
from flax import nnx

from promed_jax.models import causal_mask, positions_from_mask
from promed_jax.models.checkpoints import (
    CheckpointError,
    _unpermute_rotary,
    load_hf,
    read_safetensors,
    save_hf,
    write_safetensors,
)

torch = need_torch()
from promed_jax.models.testing import random_hf_model, save_hf_model, torch_logits

TOL = 1e-4


@pytest.fixture(scope="module")
def llama():
    return random_hf_model("llama", seed=2, rope_theta=800.0, tie_word_embeddings=False)


@pytest.fixture(scope="module")
def folder(llama, tmp_path_factory):
    return save_hf_model(llama, tmp_path_factory.mktemp("single"))


@pytest.fixture(scope="module")
def batch():
    valid = np.ones((2, 12), bool)
    valid[1, :4] = False
    tokens = np.where(valid, np.random.default_rng(0).integers(0, 256, (2, 12)), 0).astype(np.int32)
    return tokens, valid


@nnx.jit
def _forward(model, tokens, positions, mask):
    return model(tokens, positions, mask)[0]


def _ours(model, tokens, valid):
    valid = jnp.asarray(valid)
    return np.asarray(_forward(model, jnp.asarray(tokens), positions_from_mask(valid), causal_mask(valid)))


def _reference(torch_model, tokens, valid):
    return torch_logits(torch_model, tokens, valid, np.asarray(positions_from_mask(jnp.asarray(valid))))


def _rewrite(folder, tmp_path, edit):
    """A copy of `folder` whose model.safetensors went through `edit(dict) -> dict`."""
    shutil.copytree(folder, tmp_path, dirs_exist_ok=True)
    tensors = {k: np.array(v) for k, v in read_safetensors(folder / "model.safetensors").items()}
    write_safetensors(tmp_path / "model.safetensors", edit(tensors))
    return tmp_path


def test_single_file_matches_torch(llama, folder, batch):
    model = load_hf(folder)
    assert model.lm_head is not None
    assert np.abs(_ours(model, *batch) - _reference(llama, *batch))[batch[1]].max() <= TOL


def test_sharded_index_loads_the_same(llama, folder, batch, tmp_path):
    save_hf_model(llama, tmp_path, max_shard_size="100KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    np.testing.assert_array_equal(_ours(load_hf(tmp_path), *batch), _ours(load_hf(folder), *batch))


def test_bf16_safetensors(llama, batch, tmp_path):
    bf16 = random_hf_model("llama", seed=2, rope_theta=800.0, tie_word_embeddings=False).to(torch.bfloat16)
    save_hf_model(bf16, tmp_path)
    assert read_safetensors(tmp_path / "model.safetensors")["model.norm.weight"].dtype == ml_dtypes.bfloat16
    # The fp32 reference with bf16-rounded weights (casting the torch model would also round its rotary table).
    reference = random_hf_model("llama", seed=2, rope_theta=800.0, tie_word_embeddings=False)
    reference.load_state_dict({k: v.float() for k, v in bf16.state_dict().items()})
    model = load_hf(tmp_path)  # upcast to fp32 parameters: exactly torch's bf16 weights
    assert model.embed[...].dtype == jnp.float32
    assert np.abs(_ours(model, *batch) - _reference(reference, *batch))[batch[1]].max() <= TOL
    assert load_hf(tmp_path, param_dtype="bfloat16").embed[...].dtype == jnp.bfloat16


def test_pickle_is_refused(folder, tmp_path):
    shutil.copy(folder / "config.json", tmp_path / "config.json")
    torch.save({"w": torch.zeros(2)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pickle"):
        load_hf(tmp_path)
    with pytest.raises(CheckpointError, match="pickle"):
        load_hf(tmp_path / "pytorch_model.bin")


def test_unmapped_tensor_is_an_error(folder, tmp_path):
    edited = _rewrite(folder, tmp_path, lambda t: {**t, "model.layers.0.mlp.extra.weight": np.zeros(3, np.float32)})
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*model\.layers\.0\.mlp\.extra\.weight"):
        load_hf(edited)


def test_missing_tensor_is_an_error(folder, tmp_path):
    edited = _rewrite(
        folder, tmp_path, lambda t: {k: v for k, v in t.items() if k != "model.layers.1.mlp.up_proj.weight"}
    )
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        load_hf(edited)


def test_misshaped_tensor_is_an_error(folder, tmp_path):
    key = "model.layers.0.mlp.down_proj.weight"
    edited = _rewrite(folder, tmp_path, lambda t: {**t, key: np.ascontiguousarray(t[key].T)})
    with pytest.raises(
        CheckpointError, match=r"model\.safetensors: tensor model\.layers\.0\.mlp\.down_proj\.weight has shape"
    ):
        load_hf(edited)


def test_bad_config_is_an_error(folder, tmp_path):
    shutil.copytree(folder, tmp_path, dirs_exist_ok=True)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    with pytest.raises(CheckpointError, match=r"config\.json.*gpt2"):
        load_hf(tmp_path)


def test_our_safetensors_writer_is_read_by_the_safetensors_library(tmp_path):
    from safetensors.torch import load_file

    tensors = {
        "a": np.arange(6, dtype=np.float32).reshape(2, 3),
        "b": np.array([1.5, -2.0, 3.25], dtype=ml_dtypes.bfloat16),
    }
    write_safetensors(tmp_path / "x.safetensors", tensors)
    loaded = load_file(tmp_path / "x.safetensors")
    np.testing.assert_array_equal(loaded["a"].numpy(), tensors["a"])
    assert loaded["b"].dtype == torch.bfloat16
    np.testing.assert_array_equal(loaded["b"].float().numpy(), tensors["b"].astype(np.float32))


@pytest.mark.parametrize(
    "model_type,config",
    [
        ("llama", {"tie_word_embeddings": True}),
        ("qwen2", {"tie_word_embeddings": False, "rope_theta": 3000.0}),
        (
            "llama",
            {
                "rope_scaling": {
                    "rope_type": "llama3",
                    "factor": 4.0,
                    "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 32,
                }
            },
        ),
    ],
)
def test_export_round_trip_with_merged_lora(model_type, config, batch, tmp_path):
    """Our model with non-zero adapters -> HF folder -> transformers loads it -> our adapted logits."""
    from transformers import AutoModelForCausalLM

    source = save_hf_model(random_hf_model(model_type, seed=3, **config), tmp_path / "source")
    model = load_hf(source, lora_rank=2, lora_alpha=4.0)
    for i, block in enumerate(model.layers):
        for proj in (block.self_attn.q_proj, block.self_attn.v_proj):
            proj.lora.b.set_value(0.5 * jax.random.normal(jax.random.key(i), proj.lora.b.shape))
    adapted = _ours(model, *batch)
    save_hf(model, tmp_path / "export")
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "export", attn_implementation="eager").eval()
    assert np.abs(_reference(exported, *batch) - adapted)[batch[1]].max() <= TOL


def test_gguf_rotary_permutation_is_undone():
    """llama.cpp's convert_hf_to_gguf permutes q/k rows like this; `_unpermute_rotary` must invert it."""
    heads, head_dim, d = 3, 8, 5
    w = np.random.default_rng(0).normal(size=(heads * head_dim, d)).astype(np.float32)
    permuted = w.reshape(heads, 2, head_dim // 2, d).swapaxes(1, 2).reshape(w.shape)
    np.testing.assert_array_equal(_unpermute_rotary(permuted, heads), w)
