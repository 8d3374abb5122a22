"""Per-turn reward inputs of a rollout, built on the host: turn kinds, format rewards, SIG per question.

The GRPO step sees a rollout as token arrays (`consult.rollout.Rollout`: `turn_ids`, `role_mask`, ...). What a
reward needs per doctor turn k = 1..K of each dialogue is read here from its `Dialogue` and padded to
K_max = the largest turn id of the rollout, so that `rewards` can gather it per token:

- the turn's kind, decided by its first marker (`protocol.turn_kind`); a turn cut off at the token limit or
  ending in a runaway loop counts as `OTHER` (promed.md §4: "a turn with neither marker, or cut off: its
  format reward only");
- its format reward (`protocol.format_score`, scaled to `grpo.format_reward_start` / `_contains`);
- SIG_k = s_k − s_{k−1} of the turn (`shapley.sig`), from the case's cached fact weights and the coverage
  after each turn: exact, from `Dialogue.revealed_turn` (the patient reported which facts it revealed), or
  the paper's, from `paper_coverages` (an understanding model and a judge). Only questions reveal facts, so
  SIG is 0 on every other turn;
- Σ_i w_i c_i(T), the dialogue's final state, for the trajectory-level reward.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import jax
import numpy as np

from promed_jax.backends.base import ChatBackend
from promed_jax.consult import protocol
from promed_jax.consult.rollout import Dialogue, Rollout
from promed_jax.errors import CacheError, DataError
from promed_jax.shapley import sig as sig_lib

# Turn kinds as int codes; padding turns are OTHER with zero format reward and zero SIG.
OTHER, QUESTION, ANSWER = 0, 1, 2
_KIND_CODES = {protocol.QUESTION: QUESTION, protocol.ANSWER: ANSWER, protocol.INVALID: OTHER}


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TurnArrays:
    """Per doctor turn k = 1..K_max of N dialogues (column k − 1), zero-padded past each dialogue's K turns.

    Attributes:
      kind: int32[N, K_max] OTHER (0), QUESTION (1) or ANSWER (2).
      format_reward: float32[N, K_max] the turn's format reward.
      sig: float32[N, K_max] SIG_k of question turns, 0 elsewhere.
      n_turns: int32[N] doctor turns K of each dialogue.
      final_state: float32[N] s_T = Σ_i w_i c_i(T), initially known facts included.
    """

    kind: np.ndarray
    format_reward: np.ndarray
    sig: np.ndarray
    n_turns: np.ndarray
    final_state: np.ndarray


def dialogue_turns(dialogue: Dialogue) -> list[tuple[str, str]]:
    """(question, reply) pairs of a dialogue, as the patient was asked them (what `paper_coverage` reads)."""
    texts = dialogue.messages
    case = dialogue.case
    out = []
    for m in range(1, len(texts) - 1, 2):
        if texts[m]["role"] == "assistant" and texts[m + 1]["role"] == "user":
            turn = protocol.parse_doctor_turn(texts[m]["content"], case.options, multi_answer=case.multi_answer)
            out.append((turn.question, texts[m + 1]["content"]))
    return out


def paper_coverages(
    backend: ChatBackend, dialogues: Sequence[Dialogue], *, temperature: float = 0.0, understanding_tokens: int = 512
) -> list[np.ndarray]:
    """The paper's coverage bool[Q + 1, n] of each dialogue (Q questions answered), in two batched calls."""
    results = sig_lib.paper_coverage(
        backend,
        [(d.case, dialogue_turns(d)) for d in dialogues],
        temperature=temperature,
        understanding_tokens=understanding_tokens,
    )
    return [r.coverage for r in results]


def exact_turn_coverage(dialogue: Dialogue) -> np.ndarray:
    """bool[K + 1, n]: row k, the facts known after doctor turn k, from `Dialogue.revealed_turn`."""
    if any(facts is None for facts in dialogue.revealed):
        raise DataError(
            f"dialogue of case {dialogue.case.id}: the patient did not say which facts it revealed, so exact SIG "
            "cannot be computed; use shapley.sig_mode='paper'"
        )
    k = len(dialogue.doctor_turns)
    turn = np.asarray(dialogue.revealed_turn, dtype=np.int64)
    return (turn[None, :] >= 0) & (turn[None, :] <= np.arange(k + 1)[:, None])


def _format_reward(text: str, *, start: float, contains: float) -> float:
    score = protocol.format_score(text)
    return start if score == 1.0 else contains if score == 0.5 else 0.0


def turn_arrays(
    rollout: Rollout,
    weights: Mapping[str, np.ndarray],
    *,
    format_start: float = 1.0,
    format_contains: float = 0.5,
    coverages: Sequence[np.ndarray] | None = None,
    truncated: Sequence[Sequence[bool]] | None = None,
) -> TurnArrays:
    """The per-turn reward inputs of a rollout's N dialogues.

    Args:
      rollout: the rollout; row n's doctor tokens carry turn ids 1..K_n.
      weights: fact weights w float[n_facts] by case id (`shapley.load_weights`, uniform for the ablation).
      format_start / format_contains: the format reward of a turn that starts with / only contains a marker.
      coverages: None for exact SIG from each dialogue's `revealed_turn`; else the paper's coverage of each
        dialogue, bool[Q + 1, n_facts] (`paper_coverages`), row q after its q-th answered question.
      truncated: per dialogue, per doctor turn, whether the sampler cut the turn off at its token limit.
    """
    dialogues = rollout.dialogues
    n = len(dialogues)
    if coverages is not None and len(coverages) != n:
        raise ValueError(f"{len(coverages)} coverages for {n} dialogues")
    if truncated is not None and len(truncated) != n:
        raise ValueError(f"{len(truncated)} truncation flags for {n} dialogues")
    k_max = max(int(rollout.turn_ids[rollout.role_mask].max(initial=0)), max(len(d.doctor_turns) for d in dialogues))
    kind = np.zeros((n, k_max), np.int32)
    fmt = np.zeros((n, k_max), np.float32)
    sig = np.zeros((n, k_max), np.float32)
    final = np.zeros(n, np.float32)
    n_turns = np.zeros(n, np.int32)
    for row, d in enumerate(dialogues):
        texts = d.doctor_turns
        k = len(texts)
        doctor_turn_ids = rollout.turn_ids[row][rollout.role_mask[row]]
        if doctor_turn_ids.size and int(doctor_turn_ids.max()) != k:
            raise ValueError(
                f"rollout row {row} has doctor tokens of {int(doctor_turn_ids.max())} turns, its dialogue {k}"
            )
        cut = list(truncated[row]) if truncated is not None else [False] * k
        if len(cut) != k:
            raise ValueError(f"dialogue {row}: {len(cut)} truncation flags for {k} doctor turns")
        for t, text in enumerate(texts):
            runaway = t == k - 1 and d.end == protocol.END_RUNAWAY
            kind[row, t] = OTHER if cut[t] or runaway else _KIND_CODES[protocol.turn_kind(text)]
            fmt[row, t] = _format_reward(text, start=format_start, contains=format_contains)
        if d.case.id not in weights:
            raise CacheError(f"no fact weights for case {d.case.id}; run the shapley stage first")
        w = np.asarray(weights[d.case.id], dtype=np.float64)
        if w.shape != (d.case.n_facts,):
            raise DataError(f"case {d.case.id}: {w.shape[0]} fact weights for {d.case.n_facts} facts")
        coverage = exact_turn_coverage(d) if coverages is None else _per_turn(coverages[row], d)
        s = sig_lib.sig_from_coverage(w, coverage)
        sig[row, :k] = np.where(kind[row, :k] == QUESTION, s.per_turn, 0.0)
        final[row] = s.state[-1]
        n_turns[row] = k
    return TurnArrays(kind=kind, format_reward=fmt, sig=sig, n_turns=n_turns, final_state=final)


def _per_turn(coverage: np.ndarray, dialogue: Dialogue) -> np.ndarray:
    """A coverage over the Q answered questions, bool[Q + 1, n], as one over all K doctor turns (the questions
    are turns 1..Q; the turns after them reveal nothing)."""
    coverage = np.asarray(coverage, dtype=bool)
    k, q = len(dialogue.doctor_turns), len(dialogue_turns(dialogue))
    if coverage.shape != (q + 1, dialogue.case.n_facts):
        raise ValueError(
            f"coverage of case {dialogue.case.id} has shape {coverage.shape}, want ({q + 1}, {dialogue.case.n_facts})"
        )
    return np.concatenate([coverage, np.repeat(coverage[-1:], k - q, axis=0)])
