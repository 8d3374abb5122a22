"""Answer extraction against hand-labelled doctor turns (tests/data/answer_turns.jsonl).

Each line is one real doctor turn: `source` (`smollm2:<mode>:<file>:<case>` for the final turn of an
evaluation run of the untrained SmolLM2, `hand:<language>:...` for a turn written in the style of a large
model), `language`, `multi_answer`, `options` {letter: text}, `text`, and `label`: the sorted letters a careful
grader reads as the doctor's answer, or null where the turn commits to no option (a listing of the options, a
letter contradicted by the option text after it, a restatement that names no option). Labels were written by
reading each turn, before the extractor was changed to agree with them.
"""

import collections
import json
import pathlib

import pytest

from promed_jax.consult import protocol

CORPUS = pathlib.Path(__file__).parent / "data" / "answer_turns.jsonl"
MIN_AGREEMENT = 0.98


@pytest.fixture(scope="module")
def turns():
    return [json.loads(line) for line in CORPUS.read_text(encoding="utf-8").splitlines()]


def test_corpus_is_large_and_varied(turns):
    assert len(turns) >= 150
    kinds = collections.Counter(":".join(t["source"].split(":")[:2]) for t in turns)
    assert {"smollm2:reactive", "smollm2:proactive", "smollm2:full", "hand:en", "hand:zh"} <= set(kinds)
    assert any(t["multi_answer"] for t in turns) and any(t["label"] is None for t in turns)
    for t in turns:
        assert set(t) == {"source", "language", "multi_answer", "options", "text", "label"}, t["source"]
        assert t["label"] is None or (t["label"] == sorted(set(t["label"])) and set(t["label"]) <= set(t["options"]))


def test_extractor_agrees_with_the_labels(turns):
    disagreements = []
    for t in turns:
        got = protocol.extract_answer(t["text"], t["options"], multi_answer=t["multi_answer"])
        if (list(got) or None) != t["label"]:
            disagreements.append(f"{t['source']}: label {t['label']}, extracted {list(got)}: {t['text'][:160]!r}")
    agreement = 1 - len(disagreements) / len(turns)
    assert agreement >= MIN_AGREEMENT, f"agreement {agreement:.1%} on {len(turns)} turns:\n" + "\n".join(disagreements)
