"""Batched multi-turn consultations: B cases x G samples, turn by turn, finished dialogues dropping out.

Every round asks the doctor (any `ChatBackend`: our model through the jitted sampler, a server, or a
scripted test double) for the next turn of every live dialogue in one batched call, parses the turns
(`protocol`), and sends every question of the round to the patient in one batched call. A dialogue ends
when the doctor answers, writes a turn with neither marker or a runaway loop, asks past `max_questions`,
or outgrows the token budget. `to_rollout` turns finished dialogues into the padded token arrays (ids,
doctor role mask, turn ids, old log-probs) that SIG and the RL stage consume.

Token in, token out. When the doctor can `sample_turns` (our model, `backends.local`) and `consult` is given
its tokenizer, each dialogue is kept as the token ids the doctor saw and sampled: the instruction and the
template's generation prompt, then per doctor turn exactly the sampled ids (an end-of-turn token only where
the model sampled it; a turn cut at the token limit gets the template's end-of-turn token outside the role
mask), then the template's text after the turn and the patient's reply, each encoded on its own
(`TokenTemplate`). The next turn is sampled from those ids, so the sampler's log-probs are the model's on
the rollout's own tokens (valid as `old_logps` for any number of updates). A text-only doctor (a server, a
test double) gets the text path: `to_rollout` re-tokenizes the messages (`text.dialogue`), which on
SmolLM2 at T = 0.7 re-encodes some turns to other ids and closes a cut turn with an end-of-turn token the
policy never sampled; those rollouts carry no old log-probs.

Keys per row: `keys(case, sample, turn)` names the PRNG key of every doctor turn (RL: `row_key(seed, "rl",
step, case id, sample, turn)`), so a dialogue is the same whatever batch it runs in.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from promed_jax.backends.base import ChatBackend, Message
from promed_jax.consult import protocol
from promed_jax.consult.patients import Patient, PatientRequest
from promed_jax.data.cases import Case
from promed_jax.text.dialogue import render_dialogue

_PLACEHOLDER = "\x00promed-turn\x00"
KeyFn = Callable[[Case, int, int], Any]  # (case, sample, doctor turn from 1) -> a typed PRNG key


@dataclasses.dataclass(frozen=True)
class DialogueTokens:
    """A dialogue as the token ids the doctor saw and sampled (T tokens).

    Attributes:
      ids: int32[T] template, instruction, sampled doctor turns and patient replies, in order.
      role_mask: bool[T] True on exactly the doctor's sampled ids (an end-of-turn token only where sampled).
      turn_ids: int32[T] 0 for the instruction, k for doctor turn k (its generation prompt, sampled ids and
        the template after it) and the patient reply that follows it.
      logprobs: float32[T] the sampler's raw-model log-probability of each sampled id; 0 off the role mask.
      stopped: bool[K] per doctor turn, True when the model ended it (EOS), False when cut at the limit.
    """

    ids: np.ndarray
    role_mask: np.ndarray
    turn_ids: np.ndarray
    logprobs: np.ndarray
    stopped: np.ndarray


class TokenTemplate:
    """The chat template's text between sampled turns, as token ids (each piece encoded on its own).

    Every piece is a difference of two renderings of the dialogue (the template must be prefix-stable), so
    templates that add system messages or headers are handled; the assistant header must equal the
    generation prompt, and the text after an assistant message's content must start with a special
    end-of-turn token (ChatML: `<|im_end|>` then a newline).
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.special_ids = set(tokenizer.all_special_ids)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    def render(self, messages: Sequence[Message], generation_prompt: bool = False) -> str:
        return self.tokenizer.apply_chat_template(
            [dict(m) for m in messages], tokenize=False, add_generation_prompt=generation_prompt
        )

    def _after(self, before: Sequence[Message], after: Sequence[Message], generation_prompt: bool = False) -> str:
        head, text = self.render(before), self.render(after, generation_prompt)
        if not text.startswith(head):
            raise ValueError("chat template is not prefix-stable: adding a message changes the text before it")
        return text[len(head) :]

    def opening(self, messages: Sequence[Message]) -> list[int]:
        """The first message(s), rendered."""
        return self.encode(self.render(messages))

    def generation_prompt(self, messages: Sequence[Message]) -> list[int]:
        """What the template adds before the doctor's next turn."""
        return self.encode(self._after(messages, messages, generation_prompt=True))

    def closing(self, messages: Sequence[Message], sampled: Sequence[int]) -> list[int]:
        """The template's text after a doctor turn's content (its end-of-turn token and what follows), less
        the end-of-turn token when the turn's last sampled id is it. `messages`: the dialogue before the turn."""
        probe = self._after(messages, [*messages, {"role": "assistant", "content": _PLACEHOLDER}])
        header, found, footer = probe.partition(_PLACEHOLDER)
        if not found or header != self._after(messages, messages, generation_prompt=True):
            raise ValueError("chat template: the assistant header is not the generation prompt")
        footer_ids = self.encode(footer)
        if not footer_ids or footer_ids[0] not in self.special_ids:
            raise ValueError("chat template puts no special end-of-turn token right after the assistant content")
        end_of_turn = footer_ids[0]
        if len(sampled) and int(sampled[-1]) == end_of_turn:
            return self.encode(footer[len(self.tokenizer.convert_ids_to_tokens(end_of_turn)) :])
        return footer_ids

    def reply(self, messages: Sequence[Message], content: str) -> list[int]:
        """The patient's reply `content` after `messages` (which end with the doctor's turn)."""
        return self.encode(self._after(messages, [*messages, {"role": "user", "content": content}]))


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
      tokens: the ids the doctor saw and sampled (token path), or None (text path; module doc).
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
    tokens: DialogueTokens | None = dataclasses.field(default=None, compare=False)  # arrays: not compared

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
      logprobs: float32[N, T] the sampler's raw-model log-probability of each doctor token, 0 off the role
        mask (token path); None when the dialogues were re-tokenized from text.
    """

    dialogues: tuple[Dialogue, ...]
    tokens: np.ndarray
    role_mask: np.ndarray
    turn_ids: np.ndarray
    lengths: np.ndarray
    group: np.ndarray
    correct: np.ndarray
    n_questions: np.ndarray
    logprobs: np.ndarray | None = None


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
    # Token path only: the ids so far with their role mask, turn ids and log-probs; per turn, stopped.
    ids: list[int] | None = None
    mask: list[bool] = dataclasses.field(default_factory=list)
    turns: list[int] = dataclasses.field(default_factory=list)
    logps: list[float] = dataclasses.field(default_factory=list)
    stopped: list[bool] = dataclasses.field(default_factory=list)

    def extend(self, ids: Sequence[int], turn: int, logprobs: Sequence[float] | None = None) -> None:
        """Append template/reply ids (off the role mask) or, with `logprobs`, sampled doctor ids (on it)."""
        self.ids.extend(int(i) for i in ids)
        self.turns.extend([turn] * len(ids))
        self.mask.extend([logprobs is not None] * len(ids))
        self.logps.extend([0.0] * len(ids) if logprobs is None else [float(x) for x in logprobs])

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
            tokens=None
            if self.ids is None
            else DialogueTokens(
                ids=np.asarray(self.ids, np.int32),
                role_mask=np.asarray(self.mask, bool),
                turn_ids=np.asarray(self.turns, np.int32),
                logprobs=np.asarray(self.logps, np.float32),
                stopped=np.asarray(self.stopped, bool),
            ),
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
    tokenizer=None,
    keys: KeyFn | None = None,
) -> list[Dialogue]:
    """Runs `samples` consultations per case to the end, all live dialogues batched per round.

    `reactive` and `full` modes allow no question (a question ends the dialogue unanswered), and a turn with
    neither marker is read as the answer (extraction as in promed.md §1). With `max_dialogue_tokens > 0`, a
    dialogue whose next doctor turn could overflow the budget ends with `END_LENGTH`; its length is its
    token count (token path) or `count_tokens` of its messages (text path, which needs it).

    With `tokenizer` (the doctor's) and a doctor that has `sample_turns`, dialogues keep their token ids
    (module doc). `keys(case, sample, turn)` gives each doctor turn's PRNG key (passed to the doctor as
    `keys=`); without it the doctor draws its own.
    """
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    limit = max_questions if mode == "proactive" else 0
    live = [
        _Live(
            case=c,
            sample=g,
            messages=[
                {"role": "user", "content": protocol.doctor_first_message(c, mode=mode, max_questions=max_questions)}
            ],
            revealed=[],
        )
        for c in cases
        for g in range(samples)
    ]
    template = TokenTemplate(tokenizer) if tokenizer is not None and hasattr(doctor, "sample_turns") else None
    if template is not None:
        for d in live:
            d.ids = []
            d.extend(template.opening(d.messages), turn=0)
    running = list(live)
    while running:
        turn_index = len(running[0].revealed) + 1  # all live dialogues are at the same doctor turn
        opening = [template.generation_prompt(d.messages) for d in running] if template else None
        if max_dialogue_tokens and (template is not None or count_tokens is not None):
            for i, d in enumerate(running):
                length = len(d.ids) + len(opening[i]) if template else count_tokens(d.messages)
                if length + max_new_tokens > max_dialogue_tokens:
                    d.finish(protocol.END_LENGTH)
            opening = [o for o, d in zip(opening, running, strict=True) if not d.end] if template else None
            running = [d for d in running if not d.end]
            if not running:
                break
        extra = {}
        if keys is not None:
            import jax.numpy as jnp  # only callers that pass keys need JAX here

            extra["keys"] = jnp.stack([keys(d.case, d.sample, turn_index) for d in running])
        if template is not None:
            for d, ids in zip(running, opening, strict=True):
                d.extend(ids, turn=turn_index)
            sampled = doctor.sample_turns(
                [d.ids for d in running], max_tokens=max_new_tokens, temperature=temperature, **extra
            )
            for d, turn in zip(running, sampled, strict=True):
                d.extend(turn.ids, turn=turn_index, logprobs=turn.logprobs)
                d.extend(template.closing(d.messages, turn.ids), turn=turn_index)
                d.stopped.append(bool(turn.stopped))
            replies = [turn.text for turn in sampled]
        else:
            replies = doctor.chat(
                [d.messages for d in running], max_tokens=max_new_tokens, temperature=temperature, **extra
            )
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
                if template is not None:
                    d.extend(template.reply(d.messages, reply.text), turn=turn_index)
                d.messages.append({"role": "user", "content": reply.text})
                d.history.append((question, reply.text))
                d.revealed.append(reply.facts)
        running = [d for d in running if not d.end]
    return [d.frozen() for d in live]


def to_rollout(dialogues: Sequence[Dialogue], tokenizer, *, pad_to_multiple: int = 64) -> Rollout:
    """Right-pads the dialogues' tokens into arrays: their sampled ids and log-probs when every dialogue has
    them (token path), else their messages rendered with the doctor's chat template (`text.dialogue`).

    T is rounded up to `pad_to_multiple` so that a training step sees few distinct shapes.
    """
    if not dialogues:
        raise ValueError("to_rollout: no dialogues")
    with_tokens = [d.tokens is not None for d in dialogues]
    if any(with_tokens) and not all(with_tokens):
        raise ValueError("to_rollout: dialogues mix the token path and the text path")
    if all(with_tokens):
        rows = [(d.tokens.ids, d.tokens.role_mask, d.tokens.turn_ids, d.tokens.logprobs) for d in dialogues]
    else:
        rendered = [render_dialogue(tokenizer, d.messages) for d in dialogues]
        rows = [(r.ids, r.role_mask, r.turn_ids, None) for r in rendered]
    lengths = np.array([len(ids) for ids, *_ in rows], dtype=np.int32)
    t = int(-(-lengths.max() // pad_to_multiple) * pad_to_multiple)
    n = len(rows)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    tokens = np.full((n, t), pad_id, dtype=np.int32)
    role_mask = np.zeros((n, t), dtype=bool)
    turn_ids = np.zeros((n, t), dtype=np.int32)
    logprobs = np.zeros((n, t), dtype=np.float32) if all(with_tokens) else None
    for row, (ids, mask, turns, logps) in enumerate(rows):
        length = len(ids)
        tokens[row, :length] = ids
        role_mask[row, :length] = mask
        turn_ids[row, :length] = turns
        if logprobs is not None:
            logprobs[row, :length] = np.where(mask, logps, 0.0)
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
        logprobs=logprobs,
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
    seed: int | None = None,
    step: int = 0,
) -> Rollout:
    """B cases x G samples of the proactive protocol, as training arrays (promed.md §4).

    A doctor with `sample_turns` takes the token path (module doc). With `seed`, doctor turn k of sample g
    of a case is drawn with `row_key(seed, "rl", step, case id, g, k)`.
    """
    key_of = None
    if seed is not None:
        from promed_jax.sampling.keys import row_key

        def key_of(case: Case, sample: int, turn: int):
            return row_key(seed, "rl", step, case.id, sample, turn)

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
        tokenizer=tokenizer,
        keys=key_of,
    )
    return to_rollout(dialogues, tokenizer)
