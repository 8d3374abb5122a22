"""How often re-tokenizing a sampled doctor turn from its text gives other ids (issue 12): SmolLM2-135M-Instruct.

Runs token-path rollouts (`consult.rollout` with our sampler: the ids the doctor sampled are kept) on the
synthetic clinic with the paper's RL sampling settings (T = 0.7, repetition penalty 1.1, no repeated
3-grams, within the turn), then renders every dialogue from its text as the text path did
(`text.dialogue.render_dialogue`, one tokenization of the whole chat) and compares, per doctor turn, the
role-masked ids of that rendering with the sampled ids:
  * re-encoded: the turn's content re-tokenizes to other ids (the policy would be trained on tokens it never
    sampled, and the sampler's log-probs would not belong to them);
  * cut: the turn was cut at the token limit, so the text path closes it with an end-of-turn token inside
    the role mask that the policy never sampled (the token path puts it outside);
and either (the text path trains that turn on ids other than the sampled ones).

    python experiments/retokenization.py                        # 24 cases x 2 samples, 96 new tokens
    python experiments/retokenization.py --cases 4 --samples 1  # a smoke run
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from promed_jax import assets
from promed_jax.backends.local import LocalBackend
from promed_jax.consult.patients import FactSelectPatient
from promed_jax.consult.rollout import rollout
from promed_jax.data import synthetic
from promed_jax.models.checkpoints import load_gguf
from promed_jax.sampling.sampler import SamplingConfig
from promed_jax.text.dialogue import render_dialogue
from promed_jax.text.tokenizer import load_tokenizer


def compare(out, tokenizer) -> dict[str, int]:
    """Per doctor turn: sampled ids (token path) against the text path's role-masked ids."""
    counts = {"turns": 0, "re-encoded": 0, "cut": 0, "stopped": 0, "either": 0}
    eot = tokenizer.eos_token_id
    for row, d in enumerate(out.dialogues):
        rendered = render_dialogue(tokenizer, d.messages)
        for k, stopped in enumerate(d.tokens.stopped, start=1):
            sampled = out.tokens[row][out.role_mask[row] & (out.turn_ids[row] == k)].tolist()
            text_path = rendered.ids[rendered.role_mask & (rendered.turn_ids == k)].tolist()
            content = sampled[:-1] if stopped and sampled and sampled[-1] == eot else sampled
            counts["turns"] += 1
            counts["stopped" if stopped else "cut"] += 1
            re_encoded = text_path[:-1] != content  # the text path's last masked id is its end-of-turn
            counts["re-encoded"] += re_encoded
            counts["either"] += re_encoded or not stopped
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=24)
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--max-questions", type=int, default=3)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    print(f"load average at start: {os.getloadavg()}")
    path = assets.smollm2_gguf_path()
    tokenizer = load_tokenizer(path)
    sampling = SamplingConfig(repetition_penalty=1.1, no_repeat_ngram_size=3)
    doctor = LocalBackend.from_model(load_gguf(path), tokenizer, sampling=sampling, max_batch=args.batch)
    cases = synthetic.make_cases(args.cases, seed=args.seed)
    start = time.perf_counter()
    out = rollout(
        cases,
        doctor,
        FactSelectPatient(),
        tokenizer,
        samples=args.samples,
        max_questions=args.max_questions,
        max_new_tokens=args.max_new_tokens,
        temperature=0.7,
        seed=args.seed,
    )
    elapsed = time.perf_counter() - start
    counts = compare(out, tokenizer)
    turns = counts["turns"]
    ends = {}
    for d in out.dialogues:
        ends[d.end] = ends.get(d.end, 0) + 1
    print(
        f"{len(out.dialogues)} dialogues, {turns} doctor turns (max {args.max_new_tokens} new tokens, T 0.7, "
        f"penalty 1.1, no repeated 3-grams), ends {ends}; rollout {elapsed:.0f} s; load {os.getloadavg()[0]:.1f}"
    )
    print(
        f"re-encoded to other ids: {counts['re-encoded']} / {turns} turns ({counts['re-encoded'] / turns:.3f}); "
        f"cut at the limit (text path adds an unsampled end-of-turn in the mask): {counts['cut']} / {turns} "
        f"({counts['cut'] / turns:.3f}); either: {counts['either']} / {turns} ({counts['either'] / turns:.3f})"
    )


if __name__ == "__main__":
    main()
