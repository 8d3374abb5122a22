"""Tokenizers: the tiny offline one (deterministic, encodes anything, ChatML) and SmolLM2's from GGUF."""

import pytest

from promed_jax.text.tokenizer import IM_END, IM_START, build_tiny_tokenizer, load_tokenizer

MESSAGES = [
    {"role": "user", "content": "I have had chest pain since this morning."},
    {"role": "assistant", "content": "Does the pain spread to your left arm?"},
]


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_tokenizer()


def test_tiny_tokenizer_is_deterministic(tiny):
    again = build_tiny_tokenizer()
    assert tiny.get_vocab() == again.get_vocab()
    text = "Do you have a fever or a cough?"
    assert tiny(text).input_ids == again(text).input_ids


def test_tiny_tokenizer_special_tokens_and_size(tiny):
    assert 256 < len(tiny) <= 1024
    assert tiny.eos_token == IM_END and tiny.bos_token == IM_START
    assert tiny.pad_token_id is not None and tiny.pad_token_id != tiny.eos_token_id
    # The corpus words are merged: a common medical sentence needs far fewer tokens than bytes.
    assert len(tiny("The patient has chest pain and a fever.").input_ids) < 20


@pytest.mark.parametrize("text", ["头痛三天，伴发热。", "émoji 🙂 and\ttabs\n", "zzqxj 12345"])
def test_tiny_tokenizer_round_trips_any_text(tiny, text):
    ids = tiny(text, add_special_tokens=False).input_ids
    assert tiny.decode(ids) == text


def test_tiny_chat_template_is_chatml(tiny):
    text = tiny.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_start|>user\nI have had chest pain since this morning.<|im_end|>\n"
        "<|im_start|>assistant\nDoes the pain spread to your left arm?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    ids = tiny(text, add_special_tokens=False).input_ids
    assert ids.count(tiny.eos_token_id) == 2 and ids.count(tiny.convert_tokens_to_ids(IM_START)) == 3


def test_load_tokenizer_rejects_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.gguf"):
        load_tokenizer(tmp_path / "missing.gguf")
    with pytest.raises(FileNotFoundError, match="nothing"):
        load_tokenizer(tmp_path / "nothing")


def test_load_tokenizer_from_folder(tiny, tmp_path):
    tiny.save_pretrained(tmp_path)
    loaded = load_tokenizer(tmp_path)
    assert loaded.chat_template == tiny.chat_template
    assert loaded.apply_chat_template(MESSAGES)["input_ids"] == tiny.apply_chat_template(MESSAGES)["input_ids"]


def test_smollm2_tokenizer_from_gguf(smollm2_gguf):
    tokenizer = load_tokenizer(smollm2_gguf)
    assert len(tokenizer) == 49152
    assert tokenizer.eos_token == IM_END and tokenizer.pad_token is not None
    text = tokenizer.apply_chat_template(MESSAGES, tokenize=False)
    # SmolLM2's template inserts its default system message when the dialogue has none.
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False).input_ids) == text
    assert tokenizer("Hello world", add_special_tokens=False).input_ids == [19556, 905]
