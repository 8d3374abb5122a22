"""Shapley Information Gain: s_t = Σ_i w_i c_i(t) and SIG_t = s_t − s_{t−1} (promed.md §2).

Coverage c(t) comes two ways: exact tracking, where the patient returns facts verbatim and says which
(`exact_coverage`), and the paper's way, where an understanding LLM writes U_t from the initial information
and the dialogue and a judge LLM answers True/False per fact (`paper_coverage`), both roles behind the
shared `ChatBackend`. Row 0 of a coverage matrix is the start of the dialogue: the initially known facts.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

import numpy as np

from promed_jax.backends.base import BackendError, ChatBackend
from promed_jax.data.cases import Case
from promed_jax.text import prompts

Turns = Sequence[tuple[str, str]]  # (doctor question, patient reply), oldest first


@dataclasses.dataclass(frozen=True)
class Sig:
    """SIG of one dialogue with T questions and n facts.

    Attributes:
      coverage: bool[T + 1, n]; row t says which facts are covered after question t (row 0: the start).
      state: float64[T + 1]; s_t = Σ_i w_i c_i(t).
      per_turn: float64[T]; SIG_t = s_t − s_{t−1} for question t = 1..T.
      total: s_T − s_0, the dialogue's SIG (= Σ per_turn).
    """

    coverage: np.ndarray
    state: np.ndarray
    per_turn: np.ndarray
    total: float


def exact_coverage(n: int, known: Sequence[int], revealed: Sequence[Sequence[int]]) -> np.ndarray:
    """bool[T + 1, n] from the facts known at the start and the facts revealed at each of T turns."""
    coverage = np.zeros((len(revealed) + 1, n), bool)
    for row, facts in enumerate([known, *revealed]):
        bad = [i for i in facts if not 0 <= i < n]
        if bad:
            raise ValueError(f"fact indices {bad} out of range for {n} facts (turn {row})")
        coverage[row, list(facts)] = True
    return np.logical_or.accumulate(coverage, axis=0)


def sig_from_coverage(w: np.ndarray, coverage: np.ndarray) -> Sig:
    """s_t, SIG_t and the total from fact weights w float[n] and coverage bool[T + 1, n]."""
    w = np.asarray(w, dtype=np.float64)
    coverage = np.asarray(coverage, dtype=bool)
    if coverage.ndim != 2 or coverage.shape[1] != w.shape[0]:
        raise ValueError(f"coverage must be bool[T + 1, {w.shape[0]}], got shape {coverage.shape}")
    state = coverage @ w
    return Sig(coverage=coverage, state=state, per_turn=np.diff(state), total=float(state[-1] - state[0]))


def exact_sig(w: np.ndarray, known: Sequence[int], revealed: Sequence[Sequence[int]]) -> Sig:
    """SIG when the patient reports which facts each reply revealed (exact mode)."""
    return sig_from_coverage(w, exact_coverage(len(w), known, revealed))


_TRUE = re.compile(r"\b(true|false)\b|(正确|错误)", re.IGNORECASE)


def parse_judgement(reply: str) -> bool | None:
    """The judge's verdict: the first True/False word in the reply; None when it has neither."""
    match = _TRUE.search(reply)
    if match is None:
        return None
    word = match.group(0).lower()
    return word in ("true", "正确")


@dataclasses.dataclass(frozen=True)
class PaperCoverage:
    """Coverage from the understanding model and the judge, with what they wrote.

    Attributes:
      coverage: bool[T + 1, n] (row 0: the initially known facts).
      understanding: the T understanding texts U_1..U_T.
      unparsed: int; judge replies with neither True nor False (counted as not covered).
    """

    coverage: np.ndarray
    understanding: tuple[str, ...]
    unparsed: int


def paper_coverage(
    backend: ChatBackend,
    dialogues: Sequence[tuple[Case, Turns]],
    *,
    temperature: float = 0.0,
    understanding_tokens: int = 512,
) -> list[PaperCoverage]:
    """The paper's coverage for several dialogues in two batched backend calls.

    One call writes U_t for every dialogue and every turn t ≥ 1 (from the initial information and the first
    t question/reply pairs); one call judges every (U_t, fact) pair.
    """
    jobs = [(d, t) for d, (_, turns) in enumerate(dialogues) for t in range(1, len(turns) + 1)]
    understanding_prompts = [
        prompts.understanding_prompt(
            language=dialogues[d][0].language, initial_info=dialogues[d][0].initial_info, turns=dialogues[d][1][:t]
        )
        for d, t in jobs
    ]
    texts = _chat(backend, understanding_prompts, max_tokens=understanding_tokens, temperature=temperature)
    judge_jobs = [(j, i) for j, (d, _) in enumerate(jobs) for i in range(dialogues[d][0].n_facts)]
    judge_prompts = [
        prompts.fact_judge_prompt(
            language=dialogues[jobs[j][0]][0].language, understanding=texts[j], fact=dialogues[jobs[j][0]][0].facts[i]
        )
        for j, i in judge_jobs
    ]
    verdicts = [parse_judgement(r) for r in _chat(backend, judge_prompts, max_tokens=8, temperature=temperature)]

    # Both batches are ordered dialogue by dialogue, turn by turn (and fact by fact): read them back in order.
    text_iter, verdict_iter = iter(texts), iter(verdicts)
    results = []
    for case, turns in dialogues:
        coverage = np.zeros((len(turns) + 1, case.n_facts), bool)
        coverage[0, list(case.known)] = True
        understanding, unparsed = [], 0
        for t in range(1, len(turns) + 1):
            understanding.append(next(text_iter))
            for i in range(case.n_facts):
                verdict = next(verdict_iter)
                coverage[t, i] = bool(verdict)
                unparsed += verdict is None
        results.append(PaperCoverage(coverage=coverage, understanding=tuple(understanding), unparsed=unparsed))
    return results


def _chat(backend: ChatBackend, user_prompts: list[str], *, max_tokens: int, temperature: float) -> list[str]:
    if not user_prompts:
        return []
    replies = backend.chat(
        [[{"role": "user", "content": p}] for p in user_prompts], max_tokens=max_tokens, temperature=temperature
    )
    if len(replies) != len(user_prompts):
        raise BackendError(f"backend returned {len(replies)} replies for {len(user_prompts)} conversations")
    return list(replies)
