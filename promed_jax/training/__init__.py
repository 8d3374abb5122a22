"""promed_jax.training: the train state and the sharded step shared by SFT and GRPO, chunked log-probs, SFT
data and loss, orbax checkpoints, the scripted naive doctor; the SFT stage is `promed_jax.training.run`."""

from promed_jax.training.checkpointing import Checkpointer
from promed_jax.training.data import Example, read_dialogues, render_example, validate_record
from promed_jax.training.logprobs import masked_nll, token_logprobs
from promed_jax.training.sft import sequence_logprobs, sft_loss
from promed_jax.training.state import (
    OptimizerConfig,
    TrainState,
    accumulate,
    compile_step,
    init_state,
    make_eval_step,
    make_optimizer,
    make_train_step,
    split_for_training,
)

__all__ = [
    "Checkpointer",
    "Example",
    "OptimizerConfig",
    "TrainState",
    "accumulate",
    "compile_step",
    "init_state",
    "make_eval_step",
    "make_optimizer",
    "make_train_step",
    "masked_nll",
    "read_dialogues",
    "render_example",
    "sequence_logprobs",
    "sft_loss",
    "split_for_training",
    "token_logprobs",
    "validate_record",
]
