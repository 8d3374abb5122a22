"""Dialogue rendering: ids equal the chat template's own tokenization; role mask and turn ids per STYLE.md."""

import numpy as np
import pytest
from conftest import need_smollm2

from promed_jax.text.dialogue import render_dialogue
from promed_jax.text.tokenizer import build_tiny_tokenizer, load_tokenizer

DIALOGUE = [
    {"role": "user", "content": "You are a doctor. A 45 year old man has chest pain. Ask, then answer."},
    {"role": "assistant", "content": "Does the pain spread to your left arm?"},
    {"role": "user", "content": "Yes, it goes to my left arm."},
    {"role": "assistant", "content": "Do you smoke?"},
    {"role": "user", "content": "I do not know."},
    {"role": "assistant", "content": "The final answer is A."},
]

# A Llama-3-like template: a different header, content trimmed, and no newline after the end-of-turn token.
TRIMMING_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + ':\n\n' + message['content'] | trim + '<|im_end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant:\n\n' }}{% endif %}"
)


def _tokenizers():
    yield pytest.param(build_tiny_tokenizer, id="tiny")
    yield pytest.param(lambda: load_tokenizer(need_smollm2()), id="smollm2")


@pytest.fixture(scope="module", params=list(_tokenizers()))
def tokenizer(request):
    return request.param()


def _decode(tokenizer, ids):
    return tokenizer.decode(ids, skip_special_tokens=False)


def test_ids_equal_the_templates_own_tokenization(tokenizer):
    rendered = render_dialogue(tokenizer, DIALOGUE)
    assert rendered.ids.tolist() == tokenizer.apply_chat_template(DIALOGUE)["input_ids"]
    with_prompt = render_dialogue(tokenizer, DIALOGUE[:3], add_generation_prompt=True)
    expected = tokenizer.apply_chat_template(DIALOGUE[:3], add_generation_prompt=True)["input_ids"]
    assert with_prompt.ids.tolist() == expected


def test_role_mask_covers_doctor_content_and_end_of_turn(tokenizer):
    rendered = render_dialogue(tokenizer, DIALOGUE)
    eos = tokenizer.eos_token
    masked = _decode(tokenizer, rendered.ids[rendered.role_mask])
    assert masked == f"Does the pain spread to your left arm?{eos}Do you smoke?{eos}The final answer is A.{eos}"
    # Each masked run is one doctor message: content then its end-of-turn token, nothing else.
    masked_at = np.flatnonzero(rendered.role_mask)
    runs = np.split(masked_at, np.flatnonzero(np.diff(masked_at) > 1) + 1)
    assert len(runs) == 3
    assert all(rendered.ids[run[-1]] == tokenizer.eos_token_id for run in runs)


def test_turn_ids(tokenizer):
    rendered = render_dialogue(tokenizer, DIALOGUE, add_generation_prompt=True)
    assert rendered.turn_ids[0] == 0 and np.all(np.diff(rendered.turn_ids) >= 0)
    messages_of_turn = {0: [0], 1: [1, 2], 2: [3, 4], 3: [5]}
    for turn, members in messages_of_turn.items():
        text = _decode(tokenizer, rendered.ids[rendered.turn_ids == turn])
        for m, message in enumerate(DIALOGUE):
            assert (message["content"] in text) == (m in members), (turn, m)
    # The trailing generation prompt opens the next doctor turn.
    assert _decode(tokenizer, rendered.ids[rendered.turn_ids == 4]) == "<|im_start|>assistant\n"


def test_message_ids_partition_the_tokens(tokenizer):
    rendered = render_dialogue(tokenizer, DIALOGUE[:2])
    # Each message's tokens form one run, in message order, and the runs together are the whole text.
    assert rendered.message_ids[0] == 0 and np.all(np.diff(rendered.message_ids) >= 0)
    assert set(rendered.message_ids.tolist()) == {0, 1}
    runs = [_decode(tokenizer, rendered.ids[rendered.message_ids == m]) for m in range(2)]
    assert "".join(runs) == rendered.text
    for m, message in enumerate(DIALOGUE[:2]):
        text = _decode(tokenizer, rendered.ids[rendered.message_ids == m])
        assert message["content"] in text and text.endswith(f"{tokenizer.eos_token}\n")


def test_trimming_template_with_other_header():
    tokenizer = build_tiny_tokenizer()
    tokenizer.chat_template = TRIMMING_TEMPLATE
    dialogue = [{"role": "user", "content": "  Chest pain.  "}, {"role": "assistant", "content": " Any fever?\n"}]
    rendered = render_dialogue(tokenizer, dialogue)
    assert rendered.ids.tolist() == tokenizer.apply_chat_template(dialogue)["input_ids"]
    assert _decode(tokenizer, rendered.ids[rendered.role_mask]) == "Any fever?<|im_end|>"
    assert rendered.turn_ids.tolist() == [0] * int((rendered.message_ids == 0).sum()) + [1] * int(
        (rendered.message_ids == 1).sum()
    )


def test_errors_name_the_message():
    tokenizer = build_tiny_tokenizer()
    with pytest.raises(TypeError, match=r"messages\[1\]\.content"):
        render_dialogue(tokenizer, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None}])
    with pytest.raises(ValueError, match="no messages"):
        render_dialogue(tokenizer, [])
    tokenizer.chat_template = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
    with pytest.raises(ValueError, match=r"messages\[1\].*end-of-turn"):
        render_dialogue(tokenizer, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}])
