"""Tokenizers: a model's own (Hugging Face folder or GGUF file) and a tiny offline one for tests.

Every tokenizer returned here is a transformers fast tokenizer with a chat template, an end-of-turn
`eos_token` and a `pad_token`, so the dialogue renderer and the sampler treat all of them alike.
"""

from __future__ import annotations

import copy
import functools
import os
import pathlib
from collections.abc import Iterable

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from promed_jax.errors import CheckpointError

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
ENDOFTEXT = "<|endoftext|>"

# ChatML, as SmolLM2 and Qwen2 use it, without a default system message.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

TINY_VOCAB_SIZE = 1024

# The tiny tokenizer's training text: the words of doctor/patient consultations and of chat prompts, so
# that test dialogues tokenize to a realistic number of tokens. Byte-level BPE encodes any other text.
_TINY_CORPUS = """
You are a doctor. Ask the patient one question at a time, then give your final answer.
The patient is a 45 year old man with chest pain that started two hours ago.
What is the most likely diagnosis? Options: A. myocardial infarction B. pneumonia C. asthma D. gastritis
Doctor: Do you have a fever or a cough? Patient: I have had a mild fever since yesterday and a dry cough.
Doctor: Does the pain spread to your arm, neck or jaw? Patient: Yes, it goes to my left arm.
Doctor: Have you felt short of breath, dizzy or sick to your stomach? Patient: I feel short of breath.
Doctor: Do you smoke, and do you have high blood pressure or diabetes? Patient: I do not know.
Doctor: How long have you had these symptoms? Patient: About three days, and the headache is worse at night.
Doctor: Are you taking any medication? Patient: I take aspirin and metformin every morning.
Doctor: Is there any family history of heart disease or cancer? Patient: My father had a heart attack.
The final answer is A. The answer is B because the fever, cough and chest x-ray suggest an infection.
Blood test results: white blood cell count 14000 per microliter, hemoglobin 13.5 g/dL, platelets normal.
Physical examination shows tenderness in the right lower abdomen, nausea, vomiting and loss of appetite.
The child has a rash on the face and arms, itching, a sore throat and swollen lymph nodes in the neck.
She reports fatigue, weight loss, night sweats, joint pain, back pain, abdominal pain and frequent urination.
Heart rate 110 beats per minute, temperature 38.9 degrees, blood pressure 150/95 mmHg, oxygen saturation 92%.
Hello! How can I help you today? Thank you, I understand. Please tell me more about your symptoms.
user assistant system question answer information fact facts known unknown which of the following
"""


def load_tokenizer(path: str | os.PathLike) -> PreTrainedTokenizerBase:
    """A model's tokenizer and chat template: a Hugging Face folder, or a `.gguf` file (metadata).

    Raises CheckpointError (naming the path) when the folder holds no tokenizer, or it has no chat template or
    no end-of-turn token.
    """
    path = pathlib.Path(path)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file not found: {path}")
        # A copy: callers may change the tokenizer (padding side, template) without touching the cache.
        tokenizer = copy.deepcopy(_load_gguf_tokenizer(str(path.resolve())))
    elif path.is_dir():
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError) as err:
            first = next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)
            raise CheckpointError(f"{path}: no tokenizer could be loaded from the folder ({first})") from None
    else:
        raise FileNotFoundError(f"tokenizer path is neither a folder nor a .gguf file: {path}")
    if not tokenizer.chat_template:
        raise CheckpointError(f"tokenizer at {path} has no chat template")
    if tokenizer.eos_token is None:
        raise CheckpointError(f"tokenizer at {path} has no eos_token (the end-of-turn token)")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


@functools.lru_cache(maxsize=4)
def _load_gguf_tokenizer(path: str) -> PreTrainedTokenizerBase:
    # Parsing GGUF metadata takes seconds (SmolLM2: ~8 s); the cached tokenizer is only ever copied.
    file = pathlib.Path(path)
    return AutoTokenizer.from_pretrained(str(file.parent), gguf_file=file.name, local_files_only=True)


def build_tiny_tokenizer(
    vocab_size: int = TINY_VOCAB_SIZE, corpus: Iterable[str] | None = None
) -> PreTrainedTokenizerFast:
    """A small byte-level BPE tokenizer trained in-process on a fixed corpus (or the lines of `corpus`), with a
    ChatML template.

    Deterministic and offline; any text encodes (byte fallback). Special tokens: `<|endoftext|>` (id 0,
    also the pad token), `<|im_start|>` (1), `<|im_end|>` (2, the eos / end-of-turn token).
    """
    tokenizer = tokenizers.Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[ENDOFTEXT, IM_START, IM_END],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    lines = _TINY_CORPUS.strip().splitlines() if corpus is None else list(corpus)
    tokenizer.train_from_iterator(lines, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=IM_START,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        unk_token=ENDOFTEXT,
        chat_template=CHATML_TEMPLATE,
        clean_up_tokenization_spaces=False,
    )
