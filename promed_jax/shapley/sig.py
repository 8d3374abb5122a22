"""Shapley Information Gain: s_t = Σ_i w_i c_i(t) and SIG_t = s_t − s_{t−1} (promed.md §2).

Coverage c(t) comes two ways: exact tracking, where the patient returns facts verbatim and says which
(`exact_coverage`), and the paper's way, where an understanding LLM writes U_t from the initial information
and the dialogue and a judge LLM answers True/False per fact (`paper_coverage`), both roles behind the
shared `ChatBackend`. Row 0 of a coverage matrix is the start of the dialogue: the initially known facts.

Coverage is cumulative in both ways (promed.md §2, Decision): a fact once known or acquired stays acquired,
c_i(t) >= c_i(t-1), so SIG_t >= 0. In the paper's way this matters: an understanding text U_t can leave out a
fact that U_{t-1} had, and the judge then says False; SIG counts newly acquired facts, so that fact is not
lost again (`PaperCoverage.dropped` counts how often it happened).
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
    return cumulative(coverage)


def cumulative(coverage: np.ndarray) -> np.ndarray:
    """bool[T + 1, n]: fact i counts as covered after turn t if it was covered at any turn <= t."""
    return np.logical_or.accumulate(np.asarray(coverage, dtype=bool), axis=0)


def sig_from_coverage(w: np.ndarray, coverage: np.ndarray) -> Sig:
    """s_t, SIG_t and the total from fact weights w float[n] and coverage bool[T + 1, n]."""
    w = np.asarray(w, dtype=np.float64)
    coverage = np.asarray(coverage, dtype=bool)
    if coverage.ndim != 2 or coverage.shape[1] != w.shape[0]:
        raise ValueError(f"coverage must be bool[T + 1, {w.shape[0]}], got shape {coverage.shape}")
    lost = np.argwhere(coverage[:-1] & ~coverage[1:])
    if lost.size:
        turn, fact = lost[0]
        raise ValueError(f"coverage must only grow (promed.md §2): fact {fact} is covered at turn {turn}, not at {turn + 1}")
    state = coverage @ w
    return Sig(coverage=coverage, state=state, per_turn=np.diff(state), total=float(state[-1] - state[0]))


def exact_sig(w: np.ndarray, known: Sequence[int], revealed: Sequence[Sequence[int]]) -> Sig:
    """SIG when the patient reports which facts each reply revealed (exact mode)."""
    return sig_from_coverage(w, exact_coverage(len(w), known, revealed))


# The judge's verdict words; 不正确 and 不对 are False words of their own (the leftmost match wins, so 正确 inside
# them is never read), and 对于 ("regarding") is no verdict.
_VERDICT = re.compile(r"(?<![A-Za-z])(?P<en>untrue|true|false)(?![A-Za-z])|不正确|不对|正确|错误|对(?!于)|错", re.IGNORECASE)
# A negation right before the verdict word, in the same clause: `not true`, `isn't true`, `not entirely true`,
# `不是正确的`, `并非正确`.
_NEGATED = re.compile(r"(?:(?<![A-Za-z])not|n't|(?<![A-Za-z])never)(?:\s+[A-Za-z]+)?\s*$|(?:不是|并非|并不|没有)\s*$", re.IGNORECASE)
# The prompt's own question, echoed back: `True or False?`, `True/False`.
_ECHOED_QUESTION = re.compile(r"(?<![A-Za-z])true\s*(?:or|/)\s*false(?![A-Za-z])\s*[?？]?", re.IGNORECASE)
# An echoed rule sentence names both words after an `if` ("Answer True if the context states the input,
# otherwise False."); it is dropped, unlike a reasoned reply that names both ("False, not True.").
_SENTENCE = re.compile(r"[^.。!！?？\n]*[.。!！?？\n]?")
_RULE_WORD = re.compile(r"(?<![A-Za-z])if(?![A-Za-z])|如果|否则", re.IGNORECASE)


def parse_judgement(reply: str) -> bool | None:
    """The judge's verdict on one fact: True (covered), False (not covered) or None (no verdict).

    The echoed question (`True or False?`) and echoed rule sentences are removed first; then the first verdict
    word decides (`true` for True, `false`/`untrue` for False, in any case; 正确/对 for True, 错误/错/不正确/不对
    for False), flipped when a negation comes right before it in the same clause (`Not true.` and `不是正确的`
    are False, `not false` is True). An empty reply, or one without a verdict word, is None, which
    `paper_coverage` counts as not covered (and as `unparsed`).
    """
    text = "".join(s for s in _SENTENCE.findall(_ECHOED_QUESTION.sub(" ", reply)) if not _is_echoed_rule(s))
    match = _VERDICT.search(text)
    if match is None:
        return None
    verdict = match.group(0).lower() in ("true", "正确", "对")
    return not verdict if _NEGATED.search(text[: match.start()]) else verdict


def _is_echoed_rule(sentence: str) -> bool:
    words = {m.group("en").lower() for m in _VERDICT.finditer(sentence) if m.group("en")}
    return words == {"true", "false"} and _RULE_WORD.search(sentence) is not None


@dataclasses.dataclass(frozen=True)
class PaperCoverage:
    """Coverage from the understanding model and the judge, with what they wrote.

    Attributes:
      coverage: bool[T + 1, n], cumulative (row 0: the initially known facts).
      understanding: the T understanding texts U_1..U_T.
      unparsed: int; judge replies with no verdict (`parse_judgement` is None; counted as not covered).
      dropped: int; (turn, fact) pairs judged not covered although covered at an earlier turn (kept covered).
    """

    coverage: np.ndarray
    understanding: tuple[str, ...]
    unparsed: int
    dropped: int


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
        judged = np.zeros((len(turns) + 1, case.n_facts), bool)
        judged[0, list(case.known)] = True
        understanding, unparsed = [], 0
        for t in range(1, len(turns) + 1):
            understanding.append(next(text_iter))
            for i in range(case.n_facts):
                verdict = next(verdict_iter)
                judged[t, i] = bool(verdict)
                unparsed += verdict is None
        coverage = cumulative(judged)
        results.append(
            PaperCoverage(
                coverage=coverage,
                understanding=tuple(understanding),
                unparsed=unparsed,
                dropped=int((coverage[1:] & ~judged[1:]).sum()),
            )
        )
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
