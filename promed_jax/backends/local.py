"""Our own JAX model as a `ChatBackend`: chat template -> token ids -> the jitted sampler -> text.

The doctor in rollouts and evaluation, and the `llm` patient, talk to the model through this interface.
Conversations are rendered with the tokenizer's chat template (one tokenization of the whole text, as
`text.dialogue` renders them for training) and sampled together in batches of at most `max_batch`.
Each call draws a fresh key from `seed` and a call counter, so repeated calls sample differently and a run
with the same seed and call order reproduces itself.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence

import jax
from flax import nnx

from promed_jax import registry
from promed_jax.backends.base import Message
from promed_jax.sampling.sampler import (
    SamplingConfig,
    decode_texts,
    generate,
    stop_sequences_for,
)
from promed_jax.text.tokenizer import IM_END


@dataclasses.dataclass
class LocalBackend:
    """Samples replies from `(graphdef, params)` (split once from the model, head materialized).

    Attributes:
      graphdef, params: the model, as `nnx.split` gives it.
      tokenizer: the model's tokenizer, with a chat template.
      sampling: the fixed part of the sampler config (top-k/p, penalties, LoRA on/off); `chat` sets the
        per-call `max_new_tokens`, temperature, EOS ids and stop sequences.
      seed: base of the per-call PRNG keys.
      max_batch: conversations per sampler call (bounds memory; smaller batches compile another bucket).
    """

    graphdef: nnx.GraphDef
    params: nnx.State
    tokenizer: object
    sampling: SamplingConfig = dataclasses.field(default_factory=SamplingConfig)
    seed: int = 0
    max_batch: int = 16
    _calls: itertools.count = dataclasses.field(default_factory=itertools.count, repr=False)

    @classmethod
    def from_model(cls, model: nnx.Module, tokenizer, **kwargs) -> LocalBackend:
        if hasattr(model, "materialize_head"):  # a [D, V] head reads faster than the tied [V, D] embedding
            model.materialize_head()
        graphdef, params = nnx.split(model)
        return cls(graphdef=graphdef, params=params, tokenizer=tokenizer, **kwargs)

    @property
    def eos_ids(self) -> tuple[int, ...]:
        ids = {self.tokenizer.eos_token_id}
        end_of_turn = self.tokenizer.convert_tokens_to_ids(IM_END)
        if isinstance(end_of_turn, int) and end_of_turn != self.tokenizer.unk_token_id:
            ids.add(end_of_turn)
        return tuple(sorted(i for i in ids if i is not None))

    def encode(self, conversation: Sequence[Message]) -> list[int]:
        text = self.tokenizer.apply_chat_template(list(conversation), tokenize=False, add_generation_prompt=True)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def chat(
        self,
        conversations: Sequence[Sequence[Message]],
        *,
        max_tokens: int = 256,
        temperature: float = 0.0,
        stop: Sequence[str] = (),
    ) -> list[str]:
        if not conversations:
            return []
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        config = dataclasses.replace(
            self.sampling,
            max_new_tokens=max_tokens,
            temperature=float(temperature),
            greedy=temperature == 0,
            eos_ids=self.eos_ids,
            stop_sequences=stop_sequences_for(self.tokenizer, stop),
            pad_id=pad,
        )
        prompts = [self.encode(c) for c in conversations]
        key = jax.random.fold_in(jax.random.key(self.seed), next(self._calls))
        texts: list[str] = []
        for start in range(0, len(prompts), self.max_batch):
            chunk_key = jax.random.fold_in(key, start)
            out = generate(self.graphdef, self.params, prompts[start : start + self.max_batch], config, chunk_key)
            texts += decode_texts(self.tokenizer, out, stop)
        return texts


@registry.register("backend", "local")
def make_local_backend(cfg, *, model: nnx.Module, tokenizer, **_) -> LocalBackend:
    """From the `sampling` config section plus the model and its tokenizer."""
    sampling = SamplingConfig(
        top_k=int(cfg.get("top_k", 0)),
        top_p=float(cfg.get("top_p", 1.0)),
        repetition_penalty=float(cfg.get("repetition_penalty", 1.0)),
        no_repeat_ngram_size=int(cfg.get("no_repeat_ngram_size", 0)),
    )
    return LocalBackend.from_model(
        model, tokenizer, sampling=sampling, seed=int(cfg.get("seed", 0)), max_batch=int(cfg.get("max_batch", 16))
    )
