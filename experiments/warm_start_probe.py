"""Can a tiny model trained here learn the synthetic clinic? A probe for the embedded default's warm start.

Trains a fresh tiny transformer (full fine-tuning) on the scripted naive doctor's consultations of
`--cases` synthetic cases (`--order`, `--whole-table`, `--naive-max-questions` choose its variant), plus the
warm start's answer-at-once examples (`training.warm_start.direct_examples`, of the first `--direct-cases`)
and, with `--drills K`, K short option-lookup drills (an option list, a disease, its letter). The tokenizer is a
byte-level BPE trained on the clinic's own prompts (the tests' tiny tokenizer spends ~500 tokens on the
doctor prompt; this one ~180). Then it evaluates held-out cases (seed 1, disjoint from training's seed 0)
greedily in the full, reactive and proactive modes, and splits each mode's accuracy into "names the gold
disease in its answer" and "writes the gold letter": the two skills the warm start must teach.

    python experiments/warm_start_probe.py --hidden 128 --layers 4 --epochs 2 --order table --whole-table \
        --naive-max-questions 10      # the embedded default's naive doctor

Measured 2026-12-02 and 03 on 2 cores (README, "The embedded default", one row per variant): the model
learns the medicine (100% with the full information) within a few hundred steps; the letter lookup in the
option list it does not (22-28% with letters in the marker, also with 3,072 drills), hence the option's text
in the marker; the proactive accuracy is 25-44% depending on the naive doctor.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import tempfile
import time

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import numpy as np


def drills(n: int, rng: np.random.Generator) -> list[dict]:
    from promed_jax.data import synthetic

    names = sorted(synthetic.DISEASES)
    out = []
    for i in range(n):
        chosen = [names[j] for j in rng.choice(len(names), size=4, replace=False)]
        options = dict(zip("ABCD", chosen, strict=True))
        asked = chosen[int(rng.integers(4))]
        letter = next(k for k, d in options.items() if d == asked)
        text = "Options:\n" + "\n".join(f"{k}: {d}" for k, d in options.items()) + f"\nWhich option is {asked}?"
        out.append(
            {"case_id": f"drill:{i}", "messages": [{"role": "user", "content": text}, {"role": "assistant", "content": f"answer: {asked}. 【answer: {letter}】"}]}
        )
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", type=int, default=512)
    p.add_argument("--heldout", type=int, default=64)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--drills", type=int, default=0)
    p.add_argument("--naive-max-questions", type=int, default=6)
    p.add_argument("--order", choices=("random", "table"), default="random", help="the naive doctor's question order")
    p.add_argument("--whole-table", action="store_true", help="the naive doctor asks any finding, not the differential's")
    p.add_argument("--direct-cases", type=int, default=0, help="cases with answer-at-once examples (0 = all)")
    args = p.parse_args()

    from flax import nnx

    from configs import base
    from promed_jax.backends.local import LocalBackend
    from promed_jax.consult.patients import make_patient
    from promed_jax.data import synthetic
    from promed_jax.evaluation.evaluate import evaluate_mode
    from promed_jax.models.config import ModelConfig
    from promed_jax.models.transformer import Transformer
    from promed_jax.sharding import make_mesh
    from promed_jax.training.naive_doctor import write_dialogues
    from promed_jax.training.run import Trainer, prepare_examples
    from promed_jax.training.warm_start import clinic_tokenizer, direct_examples

    print(f"load average at start: {os.getloadavg()}")
    config = base.get_config()
    config.patient.kind = "fact_select"
    patient = make_patient(config.patient)
    train_cases = synthetic.make_cases(args.cases, seed=0)
    held_cases = synthetic.make_cases(args.heldout, seed=1)
    rng = np.random.default_rng(0)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="warm_probe_"))
    from promed_jax.training.naive_doctor import NaiveDoctor

    NaiveDoctor.fixed_order = args.order == "table"
    NaiveDoctor.ask_differential = not args.whole_table
    naive = write_dialogues(
        train_cases, patient, tmp / "naive.jsonl", seed=0, max_questions=args.naive_max_questions,
        protocol_max_questions=10,
    )
    print(f"naive doctor: {len(naive)} dialogues, accuracy {np.mean([r['correct'] for r in naive]):.3f}")
    records = naive + direct_examples(train_cases[: args.direct_cases or None], seed=0, max_questions=10) + drills(args.drills, rng)
    tokenizer = clinic_tokenizer(records[:400], args.vocab)
    lengths = (128, 192, 256, 320, 384, 512, 768, 1024)
    train, held, _ = prepare_examples(records, tokenizer, lengths=lengths, pad_id=0, eval_fraction=0.05)
    print(f"{len(train)} train / {len(held)} held-out examples, mean {np.mean([e.length for e in train]):.0f} tokens")
    h = args.hidden
    cfg = ModelConfig.tiny(
        vocab_size=len(tokenizer), hidden_size=h, intermediate_size=2 * h, num_layers=args.layers, num_heads=4,
        num_kv_heads=2, head_dim=h // 4, max_position_embeddings=2048,
    )
    sft = {
        "batch_size": args.batch_size, "grad_accum": 1, "seed": 0, "epochs": args.epochs, "learning_rate": args.lr,
        "warmup_steps": 20, "final_lr_fraction": 0.1, "weight_decay": 0.0, "max_grad_norm": 1.0, "vocab_chunk": 8192,
    }
    trainer = Trainer(
        Transformer(cfg, rngs=nnx.Rngs(0)), train, sft=sft, lora=False, mesh=make_mesh((-1,), ("data",)), pad_id=0,
        lengths=lengths,
    )
    t0 = time.perf_counter()
    for i in range(trainer.total_steps):
        r = trainer.step()
        if i % 50 == 0 or i == trainer.total_steps - 1:
            print(f"step {r['step']}: loss {r['loss']:.3f} ({time.perf_counter() - t0:.0f}s)", flush=True)
    held_loss = trainer.eval_loss(held)
    held_text = "n/a" if held_loss is None else f"{held_loss:.3f}"
    print(f"trained {trainer.total_steps} steps in {time.perf_counter() - t0:.0f}s, held-out loss {held_text}")
    backend = LocalBackend.from_model(trainer.model(), tokenizer, max_batch=32)
    by_id = {c.id: c for c in held_cases}
    for mode in ("full", "reactive", "proactive"):
        res = evaluate_mode(
            held_cases, backend, patient, tmp / f"{mode}.jsonl", mode=mode, batch_size=32, max_questions=10,
            max_new_tokens=128, temperature=0.0, model="probe", patient_name="fact_select",
        )
        named = np.mean([f"【answer: {by_id[r['id']].options[r['gold'][0]]}】" in r["turns"][-1]["content"] for r in res])
        print(
            f"{mode}: gold letter {np.mean([r['correct'] for r in res]):.1%}, gold disease named {named:.1%}, "
            f"questions {np.mean([r['n_questions'] for r in res]):.2f}, answered {np.mean([r['answered'] for r in res]):.1%}"
        )
    print(f"load average at end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
