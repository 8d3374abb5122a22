"""Stage 1b: SFT on dialogues, loss on doctor tokens only (promed.md §3).

Presets (the paper's SFT settings are unknown; these are ours):
- tiny (default): the random tiny model, fully fine-tuned on the scripted naive doctor's dialogues of the
  synthetic clinic: the CPU warm start that teaches a fresh model the protocol.
- smollm: SmolLM2-135M-Instruct, LoRA (the paper's r = 8, alpha = 32 on q, v), warm-started on the scripted
  topic doctor's consultations of the MedQA dev file's training split (`sft.source='topic'`).
- qwen7b / llama8b: LoRA in bfloat16 with remat, batch 16 in 4 microbatches, an fsdp mesh; point
  `--config.sft.source=files --config.sft.dialogues="('<workdir>/mcts/<file>.jsonl',)"` at MCTS's selected
  dialogues (the synthetic warm start is the default here too).
"""

from __future__ import annotations

import ml_collections

from configs import base


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = base.get_config(arg)
    c.mode = "sft"
    # The naive doctor plays the synthetic clinic (sft.source='naive'); MCTS exports come with source='files'.
    c.data.kind = "synthetic"
    c.data.paths = ()
    c.data.synthetic_n = 256
    preset = arg or "tiny"
    if preset == "tiny":
        c.model.lora_rank = 0  # full fine-tuning: a random model must learn the whole protocol
        c.sft.learning_rate = 1e-3
        c.sft.batch_size = 8
        c.sft.epochs = 3
    elif preset == "smollm":
        # The MedQA warm start: the topic doctor consults the training split of the MedQA dev file.
        c.data.kind = "files"
        c.data.paths = (base.MEDQA_PATH,)
        c.sft.source = "topic"
        c.sft.learning_rate = 2e-4
        c.sft.batch_size = 8
        c.sft.epochs = 2
        # Without remat a step of 8 x 1,024 tokens asked XLA for 40 GB (30 layers' attention kept for the
        # backward pass); with it, experiments/sft_memory.py estimates the step's need.
        c.model.remat = True
    else:
        c.sft.learning_rate = 1e-4
        c.sft.batch_size = 16
        c.sft.grad_accum = 4
        c.sft.epochs = 2
        c.mesh.shape = (1, -1)
        c.mesh.axis_names = ("data", "fsdp")
    return c


def sweep(add) -> None:
    for lr in (5e-6, 1e-5, 2e-5):
        add(**{"sft.learning_rate": lr})
