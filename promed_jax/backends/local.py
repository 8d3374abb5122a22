"""Our own JAX model as a `ChatBackend`: chat template -> token ids -> the jitted sampler -> text or ids.

The doctor in rollouts and evaluation, and the `llm` patient, talk to the model through this interface.
Conversations are rendered with the tokenizer's chat template (one tokenization of the whole text, as
`text.dialogue` renders them for training) and sampled together in batches of at most `max_batch`.
`sample_turns` is the token-in / token-out form the RL rollouts use: prompts as token ids, and per row the
sampled ids, their raw-model log-probs, whether the row stopped, and the text.

Keys. `keys` gives one typed PRNG key per conversation (`sampling.keys.row_key(seed, ...)`, named by what
is sampled: MCTS and RL always pass them); a row's tokens then depend only on its prompt and its key, never
on the batch it shares, its place in it, `max_batch` or earlier calls. Without `keys` a row's key is
`row_key(seed, "local", h0, h1, k)`: (h0, h1) a 64-bit hash of the prompt's token ids and k the number of
rows with the same prompt this backend sampled before (earlier calls and earlier rows of this call). So the
k-th sample of a prompt is the same whatever batch it falls in, repeated prompts (G samples of a case in one
call) and repeated calls still differ, and a run that asks the same prompts in the same order reproduces
itself. Greedy calls ignore keys.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
from collections.abc import Iterator, Mapping, Sequence

import jax
import numpy as np
from flax import nnx

from promed_jax import registry
from promed_jax.backends.base import Message
from promed_jax.sampling.keys import row_key
from promed_jax.sampling.prefix_cache import PrefixCache
from promed_jax.sampling.sampler import (
    SampledTurn,
    SamplingConfig,
    generate,
    sampled_turns,
    stop_sequences_for,
    truncate_at_stop_strings,
)
from promed_jax.text.tokenizer import IM_END


@dataclasses.dataclass
class LocalBackend:
    """Samples replies from `(graphdef, params)` (split once from the model, head materialized).

    Attributes:
      graphdef, params: the model, as `nnx.split` gives it.
      tokenizer: the model's tokenizer, with a chat template.
      sampling: the fixed part of the sampler config (top-k/p, penalties, LoRA on/off); each call sets
        `max_new_tokens`, temperature, EOS ids and stop sequences (data to the compiled sampler).
      seed: base of the keys drawn when a call passes none (module doc).
      max_batch: conversations per sampler call (bounds memory; smaller batches compile another bucket).
      prefix_cache: while set (`caching_prefixes`), every prompt's KV is kept and a prompt extending a cached
        one prefills only its new tokens (the MCTS search sets it for one batch of trees).
    """

    graphdef: nnx.GraphDef
    params: nnx.State
    tokenizer: object
    sampling: SamplingConfig = dataclasses.field(default_factory=SamplingConfig)
    seed: int = 0
    max_batch: int = 16
    prefix_cache: PrefixCache | None = None
    _seen: dict[bytes, int] = dataclasses.field(default_factory=dict, repr=False)  # prompt hash -> rows sampled

    @classmethod
    def from_model(cls, model: nnx.Module, tokenizer, **kwargs) -> LocalBackend:
        if hasattr(model, "materialize_head"):  # a [D, V] head reads faster than the tied [V, D] embedding
            model.materialize_head()
        graphdef, params = nnx.split(model)
        return cls(graphdef=graphdef, params=params, tokenizer=tokenizer, **kwargs)

    @contextlib.contextmanager
    def caching_prefixes(self, max_bytes: int) -> Iterator[PrefixCache]:
        """Keep prompt KV caches (at most `max_bytes`, 0: unbounded) for the calls inside the block."""
        self.prefix_cache = PrefixCache(max_bytes=max_bytes)
        try:
            yield self.prefix_cache
        finally:
            self.prefix_cache = None

    @property
    def eos_ids(self) -> tuple[int, ...]:
        ids = {self.tokenizer.eos_token_id}
        end_of_turn = self.tokenizer.convert_tokens_to_ids(IM_END)
        if isinstance(end_of_turn, int) and end_of_turn != self.tokenizer.unk_token_id:
            ids.add(end_of_turn)
        return tuple(sorted(i for i in ids if i is not None))

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

    def encode(self, conversation: Sequence[Message]) -> list[int]:
        text = self.tokenizer.apply_chat_template(list(conversation), tokenize=False, add_generation_prompt=True)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def default_keys(self, prompts: Sequence[Sequence[int]]) -> jax.Array:
        """key[len(prompts)] for a call without keys (module doc); advances the per-prompt counts."""
        keys = []
        for prompt in prompts:
            digest = hashlib.blake2b(np.asarray(prompt, np.int64).tobytes(), digest_size=8).digest()
            k = self._seen.get(digest, 0)
            self._seen[digest] = k + 1
            h0, h1 = int.from_bytes(digest[:4], "little"), int.from_bytes(digest[4:], "little")
            keys.append(row_key(self.seed, "local", h0, h1, k))
        return jax.numpy.stack(keys)

    def sample_turns(
        self,
        prompts: Sequence[Sequence[int] | Sequence[Message]],
        *,
        max_tokens: int = 256,
        temperature: float = 0.0,
        stop: Sequence[str] = (),
        keys: jax.Array | None = None,
    ) -> list[SampledTurn]:
        """One `SampledTurn` per prompt: token ids (as the model will see them) or a conversation (rendered
        with the chat template and its generation prompt). `keys`: key[len(prompts)], or None (module doc)."""
        if not prompts:
            return []
        ids = [self.encode(p) if _is_conversation(p) else [int(t) for t in p] for p in prompts]
        if keys is None:
            keys = self.default_keys(ids)
        elif getattr(keys, "shape", None) != (len(ids),):
            raise ValueError(
                f"LocalBackend: keys must be one key per prompt ({len(ids)}), got shape {getattr(keys, 'shape', None)}"
            )
        config = dataclasses.replace(
            self.sampling,
            max_new_tokens=max_tokens,
            temperature=float(temperature),
            greedy=temperature == 0,
            eos_ids=self.eos_ids,
            stop_sequences=stop_sequences_for(self.tokenizer, stop),
            pad_id=self.pad_id,
        )
        turns: list[SampledTurn] = []
        for start in range(0, len(ids), self.max_batch):
            end = start + self.max_batch
            out = generate(
                self.graphdef, self.params, ids[start:end], config, keys[start:end], prefix=self.prefix_cache
            )
            if stop:
                out = truncate_at_stop_strings(self.tokenizer, out, stop, pad_id=self.pad_id)
            turns += sampled_turns(self.tokenizer, out, stop)
        return turns

    def chat(
        self,
        conversations: Sequence[Sequence[Message]],
        *,
        max_tokens: int = 256,
        temperature: float = 0.0,
        stop: Sequence[str] = (),
        keys: jax.Array | None = None,
    ) -> list[str]:
        turns = self.sample_turns(conversations, max_tokens=max_tokens, temperature=temperature, stop=stop, keys=keys)
        return [t.text for t in turns]


def _is_conversation(prompt) -> bool:
    return len(prompt) > 0 and isinstance(prompt[0], Mapping)


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
