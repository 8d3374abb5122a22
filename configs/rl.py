"""The whole of ProMed: data, Shapley cache, MCTS, SFT, SIG-augmented policy optimisation, evaluation.

`python -m promed_jax.main --config=configs/rl.py` is the README's main job; it runs the stages that exist.
`--config.mode=rl` runs Stage 2 alone (`promed_jax.rl.loop`) from `grpo.init_checkpoint` (a Stage 1 output
or a Hugging Face folder; '' = this workdir's Stage 1 output when there is one, else the `model` section).

Presets: tiny (the CPU default: a few short batches), smollm (SmolLM2-135M, LoRA r = 8, the paper's Stage 2
settings at B = 2 cases x G = 4), qwen7b / llama8b (the paper's settings; an fsdp mesh, microbatches).
"""

from __future__ import annotations

import ml_collections

from configs import base


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = base.get_config(arg)
    c.mode = "pipeline"
    preset = arg or "tiny"
    if preset == "tiny":
        c.grpo.steps = 2
        c.grpo.eval_every = 2
        c.grpo.eval_cases = 4
        c.sampling.max_new_tokens = 64  # the random tiny model rarely stops on its own
        c.eval.max_new_tokens = 64
    elif preset == "smollm":
        c.grpo.steps = 100
        c.grpo.eval_every = 20
        c.grpo.eval_cases = 50
        c.grpo.vocab_chunk = 8192  # SmolLM2's 49,152 columns in 6 blocks
        # One microbatch of 8 dialogues (8 x 512 tokens in experiments/bench_grpo.py) took a CPU process past
        # 14 GB: one dialogue per microbatch, blocks rematerialised.
        c.grpo.grad_accum = 8
        c.model.remat = True
    else:
        c.grpo.steps = 500
        c.grpo.batch_cases = 8
        c.grpo.grad_accum = 8  # 32 dialogues of up to 8,192 tokens: 4 per microbatch
        c.grpo.eval_every = 50
        c.mesh.shape = (1, -1)
        c.mesh.axis_names = ("data", "fsdp")
    return c


def sweep(add) -> None:
    """The paper's method and its ablations (promed.md §4), one per point."""
    add(**{"grpo.reward": "distributed", "shapley.weighting": "shapley"})
    add(**{"grpo.reward": "trajectory", "grpo.advantage": "group_std"})  # trajectory-level reward, GRPO's baseline
    add(**{"shapley.weighting": "uniform"})  # no Shapley weighting
    add(**{"grpo.reward": "no_distribution"})  # no reward distribution over turns
    add(**{"grpo.reward": "outcome_only"})  # correctness and format only, no SIG
    add(**{"grpo.advantage": "traj_mean"})  # each dialogue counts once in the baseline
