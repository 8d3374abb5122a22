"""SmolLM2-135M-Instruct from its GGUF: our greedy generation equals transformers' (same GGUF) for 32 tokens."""

import jax
import numpy as np
import pytest
from conftest import need_torch
from flax import nnx

from promed_jax.sampling.sampler import SamplingConfig, decode_texts, generate
from promed_jax.sampling.scorer import score_continuations
from promed_jax.text.dialogue import render_dialogue
from promed_jax.text.tokenizer import load_tokenizer

pytestmark = pytest.mark.slow

CHAT = [{"role": "user", "content": "I have had a fever and a dry cough for three days. What could it be?"}]
STEPS = 32


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf):
    from promed_jax.models.checkpoints import load_gguf

    model = load_gguf(smollm2_gguf)
    model.materialize_head()
    return nnx.split(model), load_tokenizer(smollm2_gguf)


def test_greedy_32_tokens_equal_transformers(smollm2, smollm2_gguf):
    torch = need_torch()
    from transformers import AutoModelForCausalLM

    split, tokenizer = smollm2
    prompt = render_dialogue(tokenizer, CHAT, add_generation_prompt=True).ids.tolist()
    config = SamplingConfig(max_new_tokens=STEPS, greedy=True, eos_ids=(tokenizer.eos_token_id,))
    ours = generate(*split, [prompt], config, jax.random.key(0))

    path = smollm2_gguf
    reference = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    # One torch thread: on shared, busy cores torch's spinning thread pool makes generate ~10x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.inference_mode():
            expected = reference.generate(
                input_ids=torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                do_sample=False, max_new_tokens=STEPS, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )[0, len(prompt) :].tolist()
    finally:
        torch.set_num_threads(threads)
    assert len(expected) == STEPS  # a real answer is longer than 32 tokens: the comparison covers all of them
    assert ours.sequences()[0] == expected
    assert decode_texts(tokenizer, ours)[0] == tokenizer.decode(expected, skip_special_tokens=True)

    # The sampler's log-probs are the model's: the scorer finds the same on the generated tokens.
    scored = score_continuations(*split, [prompt], ours.sequences())
    np.testing.assert_allclose(scored.logprobs[0], ours.logprobs[0], atol=1e-3)
