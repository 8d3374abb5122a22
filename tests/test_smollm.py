"""SmolLM2-135M-Instruct from its GGUF package: our logits against transformers' (same GGUF), export round trip.

Generation tests live in the sampler's test file.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import need_smollm2, need_torch
from flax import nnx

from promed_jax.models import causal_mask, positions_from_mask
from promed_jax.models.checkpoints import save_hf
from promed_jax.models.loader import load_model

pytestmark = pytest.mark.slow
GGUF = need_smollm2()
torch = need_torch()
from promed_jax.models.testing import torch_logits

MESSAGES = [
    {"role": "user", "content": "I am a 45 year old man with chest pain that spreads to my left arm."},
    {"role": "assistant", "content": "question: How long have you had the pain?"},
    {"role": "user", "content": "About two hours. What is the most likely diagnosis?"},
]


@pytest.fixture(scope="module")
def smollm():
    """(our model with LoRA adapters, its tokenizer, transformers' model from the same GGUF, prompt ids [1, T])."""
    from transformers import AutoModelForCausalLM

    path = GGUF
    section = {"kind": "gguf", "path": "", "lora_rank": 2, "lora_alpha": 4.0, "lora_targets": ("q_proj", "v_proj")}
    model, tokenizer = load_model(section)
    reference = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    text = tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    ids = np.asarray([tokenizer(text, add_special_tokens=False)["input_ids"]], dtype=np.int32)
    return model, tokenizer, reference.eval(), ids


@nnx.jit(static_argnames="use_lora")
def _forward(model, tokens, use_lora=True):
    valid = jnp.ones(tokens.shape, bool)
    return model(tokens, positions_from_mask(valid), causal_mask(valid), use_lora=use_lora)[0]


def test_config_from_gguf(smollm):
    model, tokenizer, _, ids = smollm
    cfg = model.config
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (30, 576, 9, 3, 64)
    assert cfg.tie_word_embeddings and cfg.rope_theta == 100_000.0 and cfg.vocab_size == 49152
    assert ids.shape[1] > 40 and tokenizer.convert_ids_to_tokens(int(ids[0, 0])) == "<|im_start|>"


def test_logits_match_transformers_on_a_chat_prompt(smollm):
    model, _, reference, ids = smollm
    ours = np.asarray(_forward(model, jnp.asarray(ids), use_lora=False))  # fresh adapters are zero anyway
    ref = torch_logits(reference, ids)
    assert ref.std() > 1.0
    assert np.abs(ours - ref).max() <= 1e-3


def test_export_round_trip_with_merged_lora(smollm, tmp_path):
    from transformers import AutoModelForCausalLM

    model, tokenizer, _, ids = smollm
    adapted = nnx.clone(model)
    for i, block in enumerate(adapted.layers):
        for proj in (block.self_attn.q_proj, block.self_attn.v_proj):
            proj.lora.b.set_value(0.05 * jax.random.normal(jax.random.key(i), proj.lora.b.shape))
    ours = np.asarray(_forward(adapted, jnp.asarray(ids)))
    assert np.abs(ours - np.asarray(_forward(model, jnp.asarray(ids)))).max() > 0.1
    save_hf(adapted, tmp_path, tokenizer=tokenizer)
    exported = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert np.abs(torch_logits(exported, ids) - ours).max() <= 1e-3
