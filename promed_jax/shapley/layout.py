"""The token layout of the Shapley value game: one case's prompt in pieces, and the padded shapes of its forwards.

A coalition's prompt is the concatenation of separately tokenized pieces (`ValuePrompt`), so dropping a fact
drops exactly its tokens (`coalition_ids` is the definition, one prompt at a time; promed.md §2). Batched rows
are padded to few shapes so that a dataset compiles a handful of times: rows to min_batch·2^j
(`padded_rows`, `chunk_sizes`), token segments to multiples of 8 or ~2^(1/4) steps (`segment_bucket`,
`length_bucket`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from promed_jax.data.cases import Case
from promed_jax.text import prompts


@dataclasses.dataclass(frozen=True)
class ValuePrompt:
    """One case's value prompt, tokenized piece by piece.

    Attributes:
      prefix: int32[P]; the tokenizer's leading special tokens and the header (shared by every coalition).
      facts: n arrays int32[L_i]; each fact with its separator.
      question: int32[Q], Q ≥ 1; the question and the answer cue.
      answer: int32[A], A ≥ 1; the gold answer text (the teacher-forced targets).
    """

    prefix: np.ndarray
    facts: tuple[np.ndarray, ...]
    question: np.ndarray
    answer: np.ndarray

    @property
    def n(self) -> int:
        return len(self.facts)

    @property
    def fact_lens(self) -> np.ndarray:
        """int64[n]: tokens of each fact."""
        return np.array([f.size for f in self.facts], dtype=np.int64)

    @property
    def length(self) -> int:
        """Tokens of the prompt with every fact: the longest coalition's."""
        return self.prefix.size + int(self.fact_lens.sum()) + self.question.size + self.answer.size


def leading_special_ids(tokenizer) -> list[int]:
    """Tokens the tokenizer puts before any text (a BOS for Llama-3; nothing for ChatML tokenizers)."""
    plain = tokenizer("x", add_special_tokens=False)["input_ids"]
    full = tokenizer("x", add_special_tokens=True)["input_ids"]
    end = len(full) - len(plain)
    if end < 0 or full[end:][: len(plain)] != plain:
        return []
    return list(full[:end])


def tokenize_value_prompt(tokenizer, case: Case) -> ValuePrompt:
    """Tokenizes the pieces of `prompts.shapley_value_pieces` separately (raises naming the case if empty)."""
    header, facts, question, answer = prompts.shapley_value_pieces(
        language=case.language, facts=case.facts, question=case.question, answer=case.gold_text
    )

    def ids(text: str) -> np.ndarray:
        return np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=np.int32)

    prompt = ValuePrompt(
        prefix=np.concatenate([np.asarray(leading_special_ids(tokenizer), np.int32), ids(header)]),
        facts=tuple(ids(f) for f in facts),
        question=ids(question),
        answer=ids(answer),
    )
    if prompt.answer.size == 0:
        raise ValueError(f"case {case.id}: field answer: the gold option text {case.gold_text!r} is empty")
    if any(f.size == 0 for f in prompt.facts):
        raise ValueError(f"case {case.id}: field facts: a fact tokenizes to nothing")
    return prompt


def kept_facts(prompt: ValuePrompt, coalition: Sequence[bool]) -> list[np.ndarray]:
    """The token ids of the coalition's facts, in their original order."""
    return [f for f, keep in zip(prompt.facts, coalition, strict=True) if keep]


def coalition_ids(prompt: ValuePrompt, coalition: Sequence[bool]) -> tuple[np.ndarray, int]:
    """The definition of a coalition's prompt: (token ids int32[T], index of the first answer token)."""
    context = np.concatenate([prompt.prefix, *kept_facts(prompt, coalition), prompt.question])
    return np.concatenate([context, prompt.answer]), context.size


def answer_tail(prompt: ValuePrompt, pad_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The scored tail, padded to a multiple of 8 slots (A8): (tokens int32[A8] = question[-1] + answer[:-1],
    targets int32[A8] = answer, valid bool[A8])."""
    a = prompt.answer.size
    slots = -(-a // 8) * 8
    tail = np.full(slots, pad_id, np.int32)
    tail[:a] = np.concatenate([prompt.question[-1:], prompt.answer[:-1]])
    targets = np.zeros(slots, np.int32)
    targets[:a] = prompt.answer
    return tail, targets, np.arange(slots) < a


def length_bucket(length: int, minimum: int = 16) -> int:
    """Rounds up to 16, 32, 48, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320, ... (steps of about 2^(1/4),
    multiples of 16): at most ~19% padding, for about twice the compiled shapes of √2 steps."""
    bucket = minimum
    k = 0
    while bucket < length:
        k += 1
        bucket = int(-(-minimum * 2 ** (k / 4) // 16) * 16)
    return bucket


def segment_bucket(length: int) -> int:
    """Slots for a segment of `length` new tokens: a multiple of 8 up to 64 (fact runs and leaves are short,
    and padding them costs as much as computing them), `length_bucket` above."""
    return -(-max(length, 1) // 8) * 8 if length <= 64 else length_bucket(length)


def chunk_sizes(k: int, min_batch: int, batch_size: int) -> list[int]:
    """Splits K rows into chunks of min_batch·2^j rows (at most batch_size), largest first, so that padding
    to those shapes wastes little (18 rows: 16 + 2, not 32); only a last chunk under min_batch is padded."""
    sizes = []
    while k > 0:
        size = min_batch
        while size * 2 <= min(k, batch_size):
            size *= 2
        sizes.append(min(size, k))
        k -= sizes[-1]
    return sizes


def padded_rows(k: int, min_batch: int, batch_size: int) -> int:
    """Rows a chunk of k rows is padded to: min_batch·2^j, at most batch_size (few compiled shapes)."""
    k_pad = min_batch
    while k_pad < k:
        k_pad *= 2
    return min(k_pad, batch_size)


def chunk_nodes(lengths: np.ndarray, *, min_batch: int, batch_size: int) -> list[tuple[np.ndarray, int]]:
    """How the game cuts a level's nodes into forwards: the nodes with new tokens (length > 0) sorted by
    length, in chunks of `chunk_sizes`; each chunk is (node indices, slots written = its longest, rounded up)."""
    order = np.argsort(lengths, kind="stable")
    order = order[lengths[order] > 0]
    chunks, at = [], 0
    for size in chunk_sizes(len(order), min_batch, batch_size):
        nodes = order[at : at + size]
        chunks.append((nodes, segment_bucket(int(lengths[nodes[-1]]))))
        at += size
    return chunks
