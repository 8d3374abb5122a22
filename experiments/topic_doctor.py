"""The topic doctor's dialogues on a real case file: what its questions get from the patient, and their length.

  python experiments/topic_doctor.py [--data FILE] [--limit N] [--patient semantic] [--out FILE]

Consults every case of FILE (default the MedQA dev file; all splits) with the topic doctor at the config's
defaults (`sft.seed`, `sft.naive_max_questions`, `consult.max_questions`) and prints: the share of questions
whose reply revealed the targeted fact, any fact, no fact; the fallback share; per topic, its questions and
how often the target came back; the dialogues' token lengths with SmolLM2's chat template; the wall time
and the load average.
"""

from __future__ import annotations

import argparse
import collections
import os
import pathlib
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from configs import base
from promed_jax import assets
from promed_jax.consult.patients import make_patient
from promed_jax.data.cases import load_cases
from promed_jax.text.dialogue import render_dialogue
from promed_jax.text.tokenizer import load_tokenizer
from promed_jax.training import topic_doctor


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(ROOT / base.MEDQA_PATH))
    ap.add_argument("--limit", type=int, default=0)
    ap.add_argument("--patient", default="semantic")
    ap.add_argument("--out", default="/tmp/topic_doctor.jsonl")
    args = ap.parse_args()
    config = base.get_config()
    config.patient.kind = args.patient
    cases = load_cases(args.data, on_error="skip", limit=args.limit)
    start = time.perf_counter()
    records = topic_doctor.write_dialogues(
        cases,
        make_patient(config.patient),
        args.out,
        seed=config.sft.seed,
        max_questions=config.sft.naive_max_questions,
        protocol_max_questions=config.consult.max_questions,
    )
    seconds = time.perf_counter() - start
    asked = target = anything = 0
    per_topic: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
    for r in records:
        for topic, fact, revealed in zip(r["topics"], r["targets"], r["revealed"], strict=True):
            hit = fact in revealed
            asked, target, anything = asked + 1, target + hit, anything + bool(revealed)
            per_topic[topic][0] += 1
            per_topic[topic][1] += hit
    print(f"{len(records)} dialogues, {asked} questions ({asked / len(records):.2f} per case), {seconds:.0f} s, "
          f"load {os.getloadavg()[0]:.1f}")
    print(f"reply holds the target {target / asked:.1%}, any fact {anything / asked:.1%}, "
          f"no fact {1 - anything / asked:.1%}; fallback questions {per_topic['fallback'][0] / asked:.1%}")
    print(f"answers right {np.mean([r['correct'] for r in records]):.1%}")
    for topic, (n, hits) in sorted(per_topic.items(), key=lambda kv: -kv[1][0]):
        print(f"  {topic:28s} {n:5d}  target {hits / n:6.1%}")
    tokenizer = load_tokenizer(assets.smollm2_gguf_path())
    lengths = np.array([len(render_dialogue(tokenizer, r["messages"]).ids) for r in records])
    print(
        f"SmolLM2 tokens per dialogue: median {np.median(lengths):.0f}, p90 {np.percentile(lengths, 90):.0f}, "
        f"max {lengths.max()}, mean {lengths.mean():.0f}"
    )


if __name__ == "__main__":
    main()
