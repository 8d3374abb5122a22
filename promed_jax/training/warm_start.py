"""The warm start (`mode=warm_start`, the pipeline's first training stage): a model that speaks the protocol.

Before Shapley weights, MCTS or RL mean anything, the doctor must write `question: ...` and
`answer: ... 【answer: ...】` and know the medicine; the search and the RL then teach it which questions to ask.
On the synthetic clinic (`warm_start.source='naive'`) the training set is

- the scripted naive doctor's consultations (`training.naive_doctor`: random findings until one is
  confirmed, then an answer by the table), and
- answer-at-once examples (`direct_examples`): each case's reactive prompt, its full-information prompt and
  two random subsets of its facts, each answered with an option the findings shown fit. These teach the
  table ("which disease explains these findings") that the answer needs; without them the model sees each
  disease only in the naive doctor's few right answers.

With `model.kind='tiny'` the tokenizer is a byte-level BPE trained on these dialogues (`clinic_tokenizer`:
the doctor prompt takes ~180 tokens instead of ~500 with the tests' tokenizer) and the model is a fresh random
one of `model.tiny`'s sizes with its vocabulary. On real data (`warm_start.source='topic'`) the scripted
topic doctor's consultations are the training set and the configured model is fine-tuned.

Outputs under `{workdir}/warm_start/`, as the SFT stage's (`training.run.train`): the dialogues, orbax
checkpoints, `metrics.jsonl`, `loss.png`, `model/` (a Hugging Face folder with its tokenizer; every later
stage of the pipeline starts from it) and `summary.json`. The budget is the `warm_start` section (the SFT
section's fields).
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Sequence

import numpy as np

from promed_jax.data.cases import Case

STAGE = "warm_start"
DIRECT_FILE = "direct_answers.jsonl"
# Per case: the answer-at-once prompts of `direct_examples` (reactive, full information, two random subsets).
DIRECT_KINDS = ("reactive", "full", "part", "part")


def answer_turn(case: Case, present: set[str], rng: np.random.Generator) -> str:
    """An answer in the naive doctor's words: an option whose disease explains the findings `present`."""
    from promed_jax.data import synthetic
    from promed_jax.training.naive_doctor import answer_text

    alive = [letter for letter, d in sorted(case.options.items()) if synthetic.fits(d, present)] or sorted(case.options)
    return answer_text(dict(case.options), present, alive[int(rng.integers(len(alive)))])


def direct_examples(cases: Sequence[Case], *, seed: int, max_questions: int) -> list[dict]:
    """Answer-at-once dialogues (the module doc), in the dialogue export schema; deterministic in `seed`."""
    from promed_jax.consult import protocol
    from promed_jax.data import synthetic

    rng = np.random.default_rng([seed, 1])
    out = []
    for case in cases:
        complaint = synthetic.complaint_of(case)
        for kind in DIRECT_KINDS:
            facts = {"reactive": (), "full": case.facts}.get(kind)
            if facts is None:
                k = int(rng.integers(1, len(case.facts)))
                facts = tuple(case.facts[i] for i in sorted(rng.choice(len(case.facts), size=k, replace=False)))
            shown = dataclasses.replace(case, facts=facts)
            mode = "full" if facts else "reactive"
            first = protocol.doctor_first_message(shown, mode=mode, max_questions=max_questions)
            answer = answer_turn(case, {complaint} | synthetic.findings_of(facts), rng)
            letters = protocol.extract_answer(answer, case.options)
            out.append(
                {
                    "case_id": case.id,
                    "fingerprint": case.fingerprint,
                    "messages": [{"role": "user", "content": first}, {"role": "assistant", "content": answer}],
                    "letters": list(letters),
                    "correct": set(letters) == set(case.answer),
                    "end": protocol.END_ANSWER,
                    "policy": {"kind": "direct", "shown": kind, "seed": seed},
                    "search": {"kind": "none"},
                    "llm_calls": {"doctor_turns": 0, "patient_replies": 0},
                }
            )
    return out


def clinic_tokenizer(records: Sequence[dict], vocab_size: int):
    """A byte-level BPE trained on the dialogues' texts and the clinic's findings and diseases (any text still
    encodes: byte fallback)."""
    from promed_jax.data import synthetic
    from promed_jax.text.tokenizer import build_tiny_tokenizer

    texts = [m["content"] for r in records for m in r["messages"]]
    texts += [f.fact for f in synthetic.FINDINGS.values()] + list(synthetic.DISEASES)
    return build_tiny_tokenizer(vocab_size, corpus=texts)


def stage_dir(workdir: str | pathlib.Path) -> pathlib.Path:
    return pathlib.Path(workdir) / STAGE


def run(config, workdir: str) -> pathlib.Path:
    """Trains the warm start and exports it; returns `{workdir}/warm_start/model`."""
    from promed_jax.training.run import train

    return train(config, workdir, stage=STAGE)
