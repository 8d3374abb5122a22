"""Batched multi-turn consultations: B cases x G samples, turn by turn, finished dialogues dropping out.

Every round asks the doctor (any `ChatBackend`: our model through the jitted sampler, a server, or a
scripted test double) for the next turn of every live dialogue in one batched call, parses the turns
(`protocol`), and sends every question of the round to the patient in one batched call. A dialogue ends
when the doctor answers, writes a turn with neither marker or a runaway loop, asks past `max_questions`,
or outgrows the token budget. `to_rollout` renders finished dialogues with the model's chat template into
the padded token arrays (ids, doctor role mask, turn ids) that SIG and the RL stage consume.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np

from promed_jax.backends.base import ChatBackend, Message
from promed_jax.consult import protocol
from promed_jax.consult.patients import Patient, PatientRequest
from promed_jax.data.cases import Case
from promed_jax.text.dialogue import render_dialogue


@dataclasses.dataclass(frozen=True)
class Dialogue:
    """One finished consultation.

    Attributes:
      case: the case (the doctor never sees it; only its first message and the patient's replies).
      sample: index of this sample among the G of its case.
      messages: [M] the instruction (user), then K doctor (assistant) turns, each but possibly the last
        followed by the patient's (user) reply: M = 2K, or 2K + 1 when the token budget ended it after a reply.
      revealed: [K] per doctor turn, the fact indices the patient's reply to it revealed, in reply order
        (() for the last turn when no reply followed; None where the patient cannot know, an LLM patient).
      revealed_turn: [n_facts] the doctor turn after which each fact was first known: 0 for facts known at the
        start, k for a fact first revealed by the reply to doctor turn k, -1 if never (all -1 but the known
        facts when the patient cannot know).
      n_questions: questions the patient was asked.
      letters: the final answer's letters, sorted; () when the doctor never answered.
      correct: the whole set of letters equals the gold set.
      end: why it ended (`protocol.END_*`).
    """

    case: Case
    sample: int
    messages: tuple[Message, ...]
    revealed: tuple[tuple[int, ...] | None, ...]
    revealed_turn: tuple[int, ...]
    n_questions: int
    letters: tuple[str, ...]
    correct: bool
    end: str

    @property
    def answered(self) -> bool:
        return self.end == protocol.END_ANSWER

    @property
    def doctor_turns(self) -> list[str]:
        return [m["content"] for m in self.messages if m["role"] == "assistant"]


@dataclasses.dataclass(frozen=True)
class Rollout:
    """N = B x G dialogues rendered with the doctor's chat template, right-padded to T tokens.

    Attributes:
      dialogues: [N] the dialogues, case-major (the G samples of a case are adjacent).
      tokens: int32[N, T] token ids (pad id beyond `lengths`).
      role_mask: bool[N, T] True on the doctor's tokens (content and end-of-turn token).
      turn_ids: int32[N, T] 0 for the instruction, k for doctor turn k and the patient reply after it.
      lengths: int32[N] valid tokens per row.
      group: int32[N] index of the row's case in the batch (rows sharing it form a group).
      correct: bool[N] the final answer is right.
      n_questions: int32[N] questions asked.
    """

    dialogues: tuple[Dialogue, ...]
    tokens: np.ndarray
    role_mask: np.ndarray
    turn_ids: np.ndarray
    lengths: np.ndarray
    group: np.ndarray
    correct: np.ndarray
    n_questions: np.ndarray


@dataclasses.dataclass
class _Live:
    """Host-side state of one dialogue while it runs (mutable, private)."""

    case: Case
    sample: int
    messages: list[Message]
    revealed: list[tuple[int, ...] | None]
    history: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (question, reply) pairs so far
    letters: tuple[str, ...] = ()
    end: str = ""

    @property
    def n_questions(self) -> int:
        return len(self.history)

    def finish(self, end: str, letters: tuple[str, ...] = ()) -> None:
        self.end, self.letters = end, letters

    def frozen(self) -> Dialogue:
        turn = [0 if i in self.case.known else -1 for i in range(self.case.n_facts)]
        for k, facts in enumerate(self.revealed, start=1):
            for i in facts or ():
                if turn[i] == -1:
                    turn[i] = k
        return Dialogue(
            case=self.case,
            sample=self.sample,
            messages=tuple(self.messages),
            revealed=tuple(self.revealed),
            revealed_turn=tuple(turn),
            n_questions=self.n_questions,
            letters=self.letters,
            correct=protocol.is_correct(self.letters, self.case.answer),
            end=self.end,
        )


def consult(
    cases: Sequence[Case],
    doctor: ChatBackend,
    patient: Patient,
    *,
    samples: int = 1,
    mode: str = "proactive",
    max_questions: int = 10,
    max_new_tokens: int = 256,
    temperature: float = 0.7,
    max_dialogue_tokens: int = 0,
    count_tokens: Callable[[Sequence[Message]], int] | None = None,
) -> list[Dialogue]:
    """Runs `samples` consultations per case to the end, all live dialogues batched per round.

    `reactive` and `full` modes allow no question (a question ends the dialogue unanswered), and a turn with
    neither marker is read as the answer (extraction as in promed.md §1). With
    `max_dialogue_tokens > 0` and `count_tokens` (the rendered length of a message list), a dialogue whose
    next doctor turn could overflow the budget ends with `END_LENGTH`.
    """
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    limit = max_questions if mode == "proactive" else 0
    live = [
        _Live(case=c, sample=g, messages=[{"role": "user", "content": protocol.doctor_first_message(c, mode=mode, max_questions=max_questions)}], revealed=[])
        for c in cases
        for g in range(samples)
    ]
    running = list(live)
    while running:
        if max_dialogue_tokens and count_tokens is not None:
            for d in running:
                if count_tokens(d.messages) + max_new_tokens > max_dialogue_tokens:
                    d.finish(protocol.END_LENGTH)
            running = [d for d in running if not d.end]
            if not running:
                break
        replies = doctor.chat([d.messages for d in running], max_tokens=max_new_tokens, temperature=temperature)
        asking: list[tuple[_Live, str]] = []
        for d, text in zip(running, replies, strict=True):
            d.messages.append({"role": "assistant", "content": text})
            turn = protocol.parse_doctor_turn(
                text, d.case.options, questions_allowed=limit > 0, multi_answer=d.case.multi_answer
            )
            if turn.kind == protocol.ANSWER:
                d.revealed.append(())
                d.finish(protocol.END_ANSWER if turn.letters else protocol.END_NO_LETTER, turn.letters)
            elif turn.kind == protocol.INVALID:
                d.revealed.append(())
                d.finish(turn.reason)
            elif d.n_questions >= limit:
                d.revealed.append(())
                d.finish(protocol.END_QUESTION_LIMIT)
            else:
                asking.append((d, turn.question))
        if asking:
            requests = [PatientRequest(case=d.case, question=q, history=tuple(d.history)) for d, q in asking]
            for (d, question), reply in zip(asking, patient.reply(requests), strict=True):
                d.messages.append({"role": "user", "content": reply.text})
                d.history.append((question, reply.text))
                d.revealed.append(reply.facts)
        running = [d for d in running if not d.end]
    return [d.frozen() for d in live]


def to_rollout(dialogues: Sequence[Dialogue], tokenizer, *, pad_to_multiple: int = 64) -> Rollout:
    """Renders dialogues with the doctor's chat template (`text.dialogue`) and right-pads them into arrays.

    T is rounded up to `pad_to_multiple` so that a training step sees few distinct shapes.
    """
    if not dialogues:
        raise ValueError("to_rollout: no dialogues")
    rendered = [render_dialogue(tokenizer, d.messages) for d in dialogues]
    lengths = np.array([r.length for r in rendered], dtype=np.int32)
    t = int(-(-lengths.max() // pad_to_multiple) * pad_to_multiple)
    n = len(rendered)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    tokens = np.full((n, t), pad_id, dtype=np.int32)
    role_mask = np.zeros((n, t), dtype=bool)
    turn_ids = np.zeros((n, t), dtype=np.int32)
    for row, r in enumerate(rendered):
        tokens[row, : r.length] = r.ids
        role_mask[row, : r.length] = r.role_mask
        turn_ids[row, : r.length] = r.turn_ids
    case_index: dict[str, int] = {}
    group = np.array([case_index.setdefault(d.case.id, len(case_index)) for d in dialogues], dtype=np.int32)
    return Rollout(
        dialogues=tuple(dialogues),
        tokens=tokens,
        role_mask=role_mask,
        turn_ids=turn_ids,
        lengths=lengths,
        group=group,
        correct=np.array([d.correct for d in dialogues], dtype=bool),
        n_questions=np.array([d.n_questions for d in dialogues], dtype=np.int32),
    )


def rollout(
    cases: Sequence[Case],
    doctor: ChatBackend,
    patient: Patient,
    tokenizer,
    *,
    samples: int,
    max_questions: int = 10,
    max_new_tokens: int = 256,
    temperature: float = 0.7,
    max_dialogue_tokens: int = 8192,
) -> Rollout:
    """B cases x G samples of the proactive protocol, rendered for training (promed.md §4)."""

    def count_tokens(messages: Sequence[Message]) -> int:
        text = tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    dialogues = consult(
        cases,
        doctor,
        patient,
        samples=samples,
        mode="proactive",
        max_questions=max_questions,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        max_dialogue_tokens=max_dialogue_tokens,
        count_tokens=count_tokens,
    )
    return to_rollout(dialogues, tokenizer)
