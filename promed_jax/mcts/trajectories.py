"""Search a batch of cases and export every finished dialogue; read and select exported dialogues for SFT.

The export schema (one JSON object per line, shared with the scripted naive doctor and read by SFT):
`case_id`, `fingerprint`, `messages` (alternating, the user instruction first, at least one assistant turn),
`turn_sig` (per doctor turn; 0.0 for a turn that asked nothing), `total_sig`, `reward` (the paper's path reward
Σ SIG + the correctness bonus), `return` (the discounted return the search backed up), `letters`, `correct`,
`end`, `policy`, `search`, `llm_calls` (what the case's whole search cost), `tree`, `path` (tree slots; a
rollout's turns follow them, counted in `rollout_turns`), and `batch` / `batch_lines`, which let a resumed run
tell a finished batch from a torn one. Readers require `case_id` and `messages`; the rest is optional and
type-checked when present.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from promed_jax.backends.base import ChatBackend
from promed_jax.consult.patients import Patient
from promed_jax.data.cases import Case
from promed_jax.errors import DataError
from promed_jax.io import resume_jsonl
from promed_jax.mcts import environment
from promed_jax.mcts import search as search_lib
from promed_jax.mcts.environment import ROLLOUT_SLOT, DialogueEnv, Scorer
from promed_jax.sampling.keys import row_keys

REQUIRED = ("case_id", "messages")
_OPTIONAL_TYPES: Mapping[str, type | tuple[type, ...]] = {
    "fingerprint": str,
    "turn_sig": list,
    "total_sig": (int, float),
    "reward": (int, float),
    "return": (int, float),
    "letters": list,
    "correct": bool,
    "end": str,
    "policy": dict,
    "search": dict,
    "llm_calls": dict,
    "tree": int,
    "path": list,
    "rollout_turns": int,
    "batch": int,
    "batch_lines": int,
}


@dataclasses.dataclass(frozen=True)
class SearchSettings:
    """What a search does (the `mcts` section, the protocol and the doctor's decoding), names and numbers.

    The defaults are a bare search's (tests, benchmarks); the stage takes every field from its config
    (`mcts.run.settings_from_config`), where the leaf value defaults to the paper's `rollout`."""

    policy: str = "paper_uct"
    iterations: int = 5
    c_uct: float = 2.2
    max_children: int = 8
    decay: float = 0.9
    correct_bonus: float = 2.0  # 0 when mcts.use_correct_bonus is off
    expansion: str = "lazy"
    leaf_value: str = "zero"
    temperature: float = 0.7
    max_new_tokens: int = 256
    max_questions: int = 10
    max_dialogue_tokens: int = 0
    sig_mode: str = "exact"
    seed: int = 0
    max_state_bytes: int = 0

    def to_json(self) -> dict[str, Any]:
        """The `search` field of an export (everything but the policy's own settings and the memory budget)."""
        out = dataclasses.asdict(self)
        for key in ("policy", "c_uct", "max_state_bytes"):
            out.pop(key)
        return out


@dataclasses.dataclass(frozen=True)
class TreeStats:
    """Statistics of one case's tree: nodes, the deepest node, distinct finished dialogues, the best reward."""

    nodes: int
    depth: int
    dialogues: int
    distinct: int
    best_total_sig: float
    best_reward: float


def search_cases(
    cases: Sequence[Case],
    weights: Sequence[np.ndarray],
    doctor: ChatBackend,
    patient: Patient,
    settings: SearchSettings,
    *,
    scorer: Scorer | None = None,
    judge: ChatBackend | None = None,
    count_tokens=None,
) -> tuple[list[list[dict]], list[TreeStats], DialogueEnv]:
    """Searches the B cases together; returns per case its export records (every finished dialogue), its tree
    statistics, and the environment (host tables, call counts)."""
    env = DialogueEnv(
        cases,
        weights,
        doctor,
        patient,
        num_actions=settings.max_children,
        seed=settings.seed,
        expansion=settings.expansion,
        leaf_value=settings.leaf_value,
        decay=settings.decay,
        correct_bonus=settings.correct_bonus,
        temperature=settings.temperature,
        max_new_tokens=settings.max_new_tokens,
        max_questions=settings.max_questions,
        scorer=scorer,
        sig_mode=settings.sig_mode,
        judge=judge,
        max_dialogue_tokens=settings.max_dialogue_tokens,
        count_tokens=count_tokens,
        max_state_bytes=settings.max_state_bytes,
    )
    keys = row_keys(settings.seed, [("mcts", case.id) for case in cases])
    tree = environment.search(
        env, keys, policy=settings.policy, num_simulations=settings.iterations, c_uct=settings.c_uct
    )
    records, stats = [], []
    node_visits = np.asarray(tree.node_visits)
    depths = np.asarray(tree.embeddings.depth)
    policy = search_lib.policy_settings(settings.policy, settings.c_uct)
    for b, case in enumerate(cases):
        mine = [export_record(env, b, h, policy=policy, search=settings.to_json()) for h in env.finished(b)]
        records.append(mine)
        visited = node_visits[b] > 0
        distinct = {tuple(m["content"] for m in r["messages"]) for r in mine}
        stats.append(
            TreeStats(
                nodes=int(visited.sum()),
                depth=int(depths[b][visited].max()),
                dialogues=len(mine),
                distinct=len(distinct),
                best_total_sig=max((r["total_sig"] for r in mine), default=0.0),
                best_reward=max((r["reward"] for r in mine), default=0.0),
            )
        )
    return records, stats, env


def export_record(env: DialogueEnv, b: int, handle: int, *, policy: dict, search: dict) -> dict:
    """One finished dialogue of tree b in the export schema."""
    case = env.cases[b]
    nodes = env.path(b, handle)
    last = nodes[-1]
    turn_sig = [node.sig for node in nodes]
    total_sig = math.fsum(turn_sig)
    ret, scale = 0.0, 1.0
    for node in nodes:
        ret += scale * node.reward
        scale *= env.decay
    calls = env.calls[b]
    return {
        "case_id": case.id,
        "fingerprint": case.fingerprint,
        "messages": env.messages(b, handle),
        "turn_sig": turn_sig,
        "total_sig": total_sig,
        "reward": total_sig + (env.correct_bonus if last.correct else 0.0),
        "return": ret,
        "letters": list(last.letters),
        "correct": last.correct,
        "end": last.end,
        "policy": policy,
        "search": search,
        "llm_calls": {"doctor_turns": calls.doctor_turns, "patient_replies": calls.patient_replies},
        "tree": b,
        "path": [node.slot for node in nodes if node.slot != ROLLOUT_SLOT],
        "rollout_turns": sum(node.slot == ROLLOUT_SLOT for node in nodes),
    }


# --- reading and selecting --------------------------------------------------------------------------------


def validate(record: dict, where: str) -> dict:
    """An export line's fields: `case_id` and `messages` required (alternating roles, the user instruction
    first, at least one assistant turn), the optional ones type-checked; a DataError names `where` and the field."""
    for field in REQUIRED:
        if field not in record:
            raise DataError(f"{where}: field '{field}' is missing")
    if not isinstance(record["case_id"], str) or not record["case_id"]:
        raise DataError(f"{where}: field 'case_id' must be a non-empty string")
    messages = record["messages"]
    if not isinstance(messages, list) or len(messages) < 2:
        raise DataError(f"{where}: field 'messages' must be a list of at least 2 messages")
    for i, m in enumerate(messages):
        want = "user" if i % 2 == 0 else "assistant"
        if not (isinstance(m, dict) and set(m) == {"role", "content"} and isinstance(m["content"], str)):
            raise DataError(f"{where}: field 'messages[{i}]' must be {{role, content}} with a string content")
        if m["role"] != want:
            raise DataError(f"{where}: field 'messages[{i}].role' is {m['role']!r}, want {want!r} (roles alternate)")
    for field, kind in _OPTIONAL_TYPES.items():
        value = record.get(field)
        if value is not None and (not isinstance(value, kind) or (kind is not bool and isinstance(value, bool))):
            raise DataError(f"{where}: field '{field}' has type {type(value).__name__}")
    return record


def read_dialogues(path: str | pathlib.Path) -> list[dict]:
    """The validated lines of an export file (a torn last line dropped)."""
    return [validate(r, f"{path} line {i}") for i, r in enumerate(resume_jsonl(path), start=1)]


@dataclasses.dataclass(frozen=True)
class Selection:
    """Which exported dialogues SFT trains on: per case the `top_k` best by reward (0 = all) among the distinct
    dialogues with reward >= `min_reward` (and a right answer if `require_correct`)."""

    top_k: int = 1
    min_reward: float = 0.0
    require_correct: bool = True


def select(records: Sequence[dict], selection: Selection) -> list[dict]:
    """The selected records: cases in order of first appearance, best reward first (ties: file order)."""
    by_case: dict[str, list[tuple[int, dict]]] = {}
    for i, r in enumerate(records):
        if r.get("reward", 0.0) < selection.min_reward:
            continue
        if selection.require_correct and not r.get("correct", False):
            continue
        by_case.setdefault(r["case_id"], []).append((i, r))
    out = []
    for group in by_case.values():
        seen, kept = set(), []
        for _, r in sorted(group, key=functools.cmp_to_key(_better)):
            messages = tuple((m["role"], m["content"]) for m in r["messages"])
            if messages in seen:
                continue
            seen.add(messages)
            kept.append(r)
        out += kept[: selection.top_k] if selection.top_k else kept
    return out


def _better(a: tuple[int, dict], b: tuple[int, dict]) -> int:
    ra, rb = a[1].get("reward", 0.0), b[1].get("reward", 0.0)
    if ra != rb:
        return -1 if ra > rb else 1
    return a[0] - b[0]
