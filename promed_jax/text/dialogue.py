"""Render a multi-turn dialogue with the model's own chat template to token ids, a role mask and turn ids.

Roles: the doctor is the `assistant`; the instruction and the patient are `user` (a `system` message may
come first). The role mask covers the doctor's content tokens and the end-of-turn token that closes each
doctor message, which is exactly what the doctor generates. Turn ids are 0 for the first message and k for
the k-th doctor message and the patient reply that follows it.

The ids are one tokenization of the whole rendered text (never a concatenation of separately tokenized
pieces), so they equal what `apply_chat_template(..., tokenize=True)` gives. Message boundaries are found on
the text: the template is rendered for every prefix of the dialogue (which must be prefix-stable), and each
message's header and footer are found by rendering it with a placeholder content, so templates that trim or
otherwise decorate the content are handled. Tokens are mapped to messages by their character offsets.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np
from transformers import PreTrainedTokenizerBase

DOCTOR_ROLE = "assistant"
_PLACEHOLDER = "\x00promed-content\x00"


@dataclasses.dataclass(frozen=True)
class RenderedDialogue:
    """A dialogue as the model sees it.

    Attributes:
      text: the rendered chat-template text.
      ids: int32[T] token ids of `text`.
      role_mask: bool[T] True on the doctor's content tokens and on the end-of-turn token closing them.
      turn_ids: int32[T] 0 for the first message, k for the k-th doctor message and the reply after it.
      message_ids: int32[T] index of the message each token belongs to (header, content and footer);
        `len(messages)` for the trailing generation prompt.
    """

    text: str
    ids: np.ndarray
    role_mask: np.ndarray
    turn_ids: np.ndarray
    message_ids: np.ndarray

    @property
    def length(self) -> int:
        return int(self.ids.shape[0])


def render_dialogue(
    tokenizer: PreTrainedTokenizerBase,
    messages: Sequence[Mapping[str, str]],
    *,
    add_generation_prompt: bool = False,
    doctor_role: str = DOCTOR_ROLE,
) -> RenderedDialogue:
    """Render `messages` ([{role, content}, ...]) with `tokenizer`'s chat template. See the module doc."""
    messages = _validated(messages)
    prefixes = [""] + [_render(tokenizer, messages[: k + 1]) for k in range(len(messages))]
    for k in range(1, len(prefixes)):
        if not prefixes[k].startswith(prefixes[k - 1]):
            raise ValueError(
                f"chat template is not prefix-stable: rendering messages[:{k}] changes the text of messages[:{k - 1}]"
            )
    text = _render(tokenizer, messages, add_generation_prompt=True) if add_generation_prompt else prefixes[-1]
    if not text.startswith(prefixes[-1]):
        raise ValueError("chat template's generation prompt changes the text of the dialogue before it")

    content_spans = [
        _content_span(tokenizer, messages, m, prefixes[m], prefixes[m + 1]) for m in range(len(messages))
    ]
    segment_ends = np.array([len(p) for p in prefixes[1:]], dtype=np.int64)

    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = np.asarray(encoding["input_ids"], dtype=np.int32)
    offsets = np.asarray(encoding["offset_mapping"], dtype=np.int64).reshape(-1, 2)
    starts, ends = offsets[:, 0], offsets[:, 1]
    # A token belongs to the message whose rendered segment contains its first character.
    message_ids = np.searchsorted(segment_ends, starts, side="right").astype(np.int32)

    is_doctor = np.array([m["role"] == doctor_role for m in messages] + [False])
    turn_of_message = np.concatenate([np.cumsum(is_doctor[:-1]), [is_doctor.sum() + 1]]).astype(np.int32)
    turn_ids = turn_of_message[message_ids]

    role_mask = np.zeros(ids.shape, dtype=bool)
    special_ids = set(tokenizer.all_special_ids)
    for m, (content_start, content_end) in enumerate(content_spans):
        if not is_doctor[m]:
            continue
        in_message = message_ids == m
        role_mask |= in_message & (starts < content_end) & (ends > content_start)
        after_content = np.flatnonzero(in_message & (starts >= content_end))
        if after_content.size == 0 or int(ids[after_content[0]]) not in special_ids:
            raise ValueError(
                f"messages[{m}] (role {doctor_role!r}): the chat template puts no special end-of-turn token "
                "right after the content"
            )
        role_mask[after_content[0]] = True
    return RenderedDialogue(text=text, ids=ids, role_mask=role_mask, turn_ids=turn_ids, message_ids=message_ids)


def _validated(messages: Sequence[Mapping[str, str]]) -> list[dict[str, str]]:
    if not messages:
        raise ValueError("dialogue has no messages")
    out = []
    for i, message in enumerate(messages):
        for field in ("role", "content"):
            if not isinstance(message.get(field), str):
                raise TypeError(f"messages[{i}].{field} must be a string, got {message.get(field)!r}")
        if _PLACEHOLDER in message["content"]:
            raise ValueError(f"messages[{i}].content contains the reserved placeholder {_PLACEHOLDER!r}")
        out.append({"role": message["role"], "content": message["content"]})
    return out


def _render(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], **kwargs) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)


def _content_span(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], m: int, before: str, through: str
) -> tuple[int, int]:
    """Character span [start, end) of messages[m]'s content in the rendered text."""
    probe = messages[:m] + [{"role": messages[m]["role"], "content": _PLACEHOLDER}]
    probe_segment = _render(tokenizer, probe)[len(before) :]
    header, found, footer = probe_segment.partition(_PLACEHOLDER)
    segment = through[len(before) :]
    if not found or not segment.startswith(header) or not segment.endswith(footer):
        raise ValueError(f"cannot locate the content of messages[{m}] in the rendered chat template")
    start = len(before) + len(header)
    end = len(through) - len(footer)
    if end < start:
        raise ValueError(f"cannot locate the content of messages[{m}] in the rendered chat template")
    return start, end
