"""Batched sampling from the decoder: a jitted prefill, then a jitted `lax.while_loop` decode over a
static-size KV cache, with the sampler state donated from one to the other.

Layout: prompts are LEFT-padded to a common length P, so every row writes its next token to the same
buffer index and cache slot (`cursor`); the token buffer and the KV cache have L = P + N slots for N new
tokens, and buffer index == cache slot. Batch, P and N are rounded up to powers of two, so calls with other
sizes reuse the compiled functions. The prefill runs the prompt through the cache in chunks (512 tokens by
default) and keeps only the last position's logits, so an 8k-token dialogue never holds [B, 8k, V] logits.

Per step the logits of the last token are processed in the order transformers' `generate` uses: repetition
penalty and no-repeat n-gram ban, then temperature, top-k, top-p; greedy takes the argmax of the penalised
logits. The penalty and the ban see only the tokens sampled in this call (promed.md §4 Decision: within the
current doctor turn; over the whole dialogue they would forbid the protocol's own markers, `question:` from
the second turn on and `【answer:` because the instruction shows it); `penalize_prompt=True` gives
transformers' semantics, prompt included. The returned log-probabilities are those of the raw model
(temperature 1, no penalty): what the scorer and the RL losses compute for the same tokens.

Keys per row: `rng` holds one typed key per prompt, and the token at new position t of a row is drawn with
`fold_in(row_key, t)`, never from its batch position, the batch size or the padding, so a prompt sampled in
any batch gives the same tokens as sampled alone with the same key (a single key is still accepted: it is
split by batch position, which is NOT batch-invariant).

A row stops after an EOS id or after a stop sequence of token ids (both included in its tokens), or after
`max_new_tokens`. Stop *strings* can tokenize differently in context, so `truncate_at_stop_strings` cuts the
decoded text afterwards; their canonical tokenizations, passed as stop sequences, stop the loop early.

Compilation: temperature, EOS ids and stop sequences are data (`Controls`, padded to power-of-two buckets),
not compile-time constants; only greedy-vs-sampling, top-k/top-p, the penalties, the pad id, LoRA on/off and
the bucketed shapes select a compiled prefill/decode.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from transformers import PreTrainedTokenizerBase

from promed_jax.models.transformer import KVCache, init_cache, positions_from_mask
from promed_jax.sampling.prefix_cache import PrefixCache

MIN_PROMPT_BUCKET = 16
MIN_NEW_TOKENS_BUCKET = 16
PREFILL_CHUNK = 512
MIN_EOS_BUCKET = 4  # EOS ids per call, padded with -1
MIN_STOPS_BUCKET = 4  # stop sequences per call, padded with empty ones
MIN_STOP_LEN_BUCKET = 8  # tokens per stop sequence, left-padded with -1


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How to sample. Hashable. `temperature`, `eos_ids`, `stop_sequences` and `max_new_tokens` (within its
    power-of-two bucket) are passed to the compiled prefill/decode as data; the other fields, and whether the
    call is greedy, select the compiled functions.

    `temperature == 0` or `greedy` takes the argmax; `top_k == 0` and `top_p == 1` switch those filters
    off; `repetition_penalty == 1` and `no_repeat_ngram_size == 0` switch those off (the paper's RL stage
    uses 1.1 and 3). Both look only at the tokens sampled in this call unless `penalize_prompt` (then at the
    prompt too, as transformers does). `pad_id` fills the buffer after a row stops.
    """

    max_new_tokens: int = 256
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    greedy: bool = False
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    eos_ids: tuple[int, ...] = ()
    stop_sequences: tuple[tuple[int, ...], ...] = ()
    pad_id: int = 0
    use_lora: bool = True
    penalize_prompt: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "eos_ids", tuple(int(i) for i in self.eos_ids))
        object.__setattr__(self, "stop_sequences", tuple(tuple(int(i) for i in s) for s in self.stop_sequences))
        if self.max_new_tokens < 1:
            raise ValueError(f"SamplingConfig.max_new_tokens={self.max_new_tokens}; must be >= 1")
        if self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1:
            raise ValueError(
                f"SamplingConfig: temperature={self.temperature} (>= 0), top_k={self.top_k} (>= 0), "
                f"top_p={self.top_p} (in (0, 1])"
            )
        if self.repetition_penalty <= 0 or self.no_repeat_ngram_size < 0:
            raise ValueError(
                f"SamplingConfig: repetition_penalty={self.repetition_penalty} (> 0), "
                f"no_repeat_ngram_size={self.no_repeat_ngram_size} (>= 0)"
            )
        if any(len(s) == 0 for s in self.stop_sequences):
            raise ValueError("SamplingConfig.stop_sequences contains an empty sequence")

    @property
    def is_greedy(self) -> bool:
        return self.greedy or self.temperature == 0


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SamplerState:
    """The decode loop's carry (B rows, L = P + N buffer slots, N new-token slots, V vocabulary).

    Attributes:
      tokens: int32[B, L] left-padded prompt in [0, P), new tokens from P on.
      valid: bool[B, L] False on left padding; the attention mask over cache slots.
      cursor: int32[] buffer index of the newest token (the next decode step's input).
      positions: int32[B] position id of the newest token.
      cache: KVCache with L slots.
      done: bool[B] the row has stopped (or is batch padding).
      lengths: int32[B] new tokens so far, the stop token included.
      logprobs: float32[B, N] raw-model log-probability of each new token (0 after the row stopped).
      rng: key[B] one typed PRNG key per row; new token t of row b is drawn with `fold_in(rng[b], t)`.
      limit: int32[] the number of new tokens asked for (<= N).
    """

    tokens: jax.Array
    valid: jax.Array
    cursor: jax.Array
    positions: jax.Array
    cache: KVCache
    done: jax.Array
    lengths: jax.Array
    logprobs: jax.Array
    rng: jax.Array
    limit: jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Controls:
    """The per-call settings passed to the compiled prefill/decode as data (E, S, M power-of-two buckets).

    Attributes:
      temperature: float32[] divides the penalised logits (unused when greedy).
      eos_ids: int32[E] ids that end a row; -1 pads.
      stop_ids: int32[S, M] stop sequences of token ids, each right-aligned (its last token in column M - 1);
        -1 before it.
      stop_lengths: int32[S] tokens of each stop sequence; 0 for padding rows, which never match.
    """

    temperature: jax.Array
    eos_ids: jax.Array
    stop_ids: jax.Array
    stop_lengths: jax.Array


def make_controls(config: SamplingConfig) -> Controls:
    """`config`'s temperature, EOS ids and stop sequences as host arrays in their buckets."""
    eos = np.full(next_power_of_two(len(config.eos_ids), MIN_EOS_BUCKET), -1, np.int32)
    eos[: len(config.eos_ids)] = config.eos_ids
    stops = config.stop_sequences
    width = next_power_of_two(max((len(s) for s in stops), default=1), MIN_STOP_LEN_BUCKET)
    stop_ids = np.full((next_power_of_two(len(stops), MIN_STOPS_BUCKET), width), -1, np.int32)
    stop_lengths = np.zeros(stop_ids.shape[0], np.int32)
    for i, sequence in enumerate(stops):
        stop_ids[i, width - len(sequence) :] = sequence
        stop_lengths[i] = len(sequence)
    temperature = 1.0 if config.is_greedy else config.temperature
    return Controls(np.float32(temperature), eos, stop_ids, stop_lengths)


def compiled_part(config: SamplingConfig, new_len: int) -> SamplingConfig:
    """The static part of `config` (runtime fields neutralised), the key of the compiled functions."""
    greedy = config.is_greedy
    return dataclasses.replace(
        config,
        max_new_tokens=new_len,
        greedy=greedy,
        temperature=0.0 if greedy else 1.0,
        eos_ids=(),
        stop_sequences=(),
    )


def per_row_keys(rng: jax.Array, n: int, batch: int) -> jax.Array:
    """key[batch]: the n rows' keys (`rng` key[n], or one key split by batch position), then copies of the
    first for the batch-padding rows (which start done and never sample)."""
    rng = jnp.asarray(rng) if not isinstance(rng, jax.Array) else rng
    if not jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key):
        rng = jax.random.wrap_key_data(rng)
    if rng.shape == ():
        rng = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(rng, jnp.arange(n, dtype=jnp.uint32))
    elif rng.shape != (n,):
        raise ValueError(f"generate: rng must be one key or one key per prompt ({n}), got shape {rng.shape}")
    return rng[np.minimum(np.arange(batch), n - 1)]


@dataclasses.dataclass(frozen=True)
class SampleOutput:
    """Sampled continuations (host numpy arrays).

    Attributes:
      tokens: int32[B, N] new tokens of each prompt; `pad_id` after `lengths[b]`.
      logprobs: float32[B, N] raw-model log-probability of each token; 0 after `lengths[b]`.
      lengths: int32[B] number of new tokens, a final EOS / stop-sequence token included.
      stopped: bool[B] True when the row ended on EOS or a stop sequence/string, False when cut by the limit.
    """

    tokens: np.ndarray
    logprobs: np.ndarray
    lengths: np.ndarray
    stopped: np.ndarray

    def sequences(self) -> list[list[int]]:
        """Each row's new tokens, without the padding."""
        return [row[:n].tolist() for row, n in zip(self.tokens, self.lengths, strict=True)]


def next_power_of_two(n: int, minimum: int = 1) -> int:
    return max(minimum, 1 << max(0, int(n) - 1).bit_length())


def left_padded(rows: Sequence[Sequence[int]], batch: int, length: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(tokens int32[batch, length], valid bool[batch, length]) with each row right-aligned after `pad_id`s.

    The `batch - len(rows)` batch-padding rows hold one valid token, so that no row attends nothing.
    """
    tokens = np.full((batch, length), pad_id, dtype=np.int32)
    valid = np.zeros((batch, length), dtype=bool)
    for b, row in enumerate(rows):
        tokens[b, length - len(row) :] = row
        valid[b, length - len(row) :] = True
    valid[len(rows) :, -1] = True
    return tokens, valid


def generate(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    prompts: Sequence[Sequence[int]],
    config: SamplingConfig,
    rng: jax.Array,
    *,
    prefill_chunk: int = PREFILL_CHUNK,
    prefix: PrefixCache | None = None,
) -> SampleOutput:
    """Sample continuations of `prompts` (token ids, lengths may differ) from the model `(graphdef, params)`.

    `rng` is key[len(prompts)], one typed key per prompt (e.g. `keys.row_keys`): then each row's tokens
    depend only on its prompt and its key, whatever the batch. A single key is split by batch position
    (`fold_in(rng, b)`), which reproduces a call but not the same prompt in another batch.

    Split the model once with `graphdef, params = nnx.split(model)` (after `model.materialize_head()` for a
    tied embedding: the logits then read a `[D, V]` head) and pass both on every call. `prefill_chunk` (a
    power of two) bounds the prefill's logits to [B, prefill_chunk, V].

    With a `prefix` cache, each row's longest cached prefix is taken from it and only the last Q buffer slots
    are prefilled (Q the power-of-two bucket of the longest uncached suffix); every prompt's KV is added after.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate: every prompt needs at least one token")
    batch = next_power_of_two(len(prompts))
    prompt_len = next_power_of_two(max(len(p) for p in prompts), MIN_PROMPT_BUCKET)
    new_len = next_power_of_two(config.max_new_tokens, MIN_NEW_TOKENS_BUCKET)
    tokens, valid = left_padded(prompts, batch, prompt_len, config.pad_id)
    done = np.arange(batch) >= len(prompts)  # batch-padding rows start done

    keys = per_row_keys(rng, len(prompts), batch)
    static = compiled_part(config, new_len)
    controls = make_controls(config)
    cached = prefix_slots(prefix, prompts, batch, prompt_len) if prefix is not None else None
    start = 0 if cached is None else cached.size
    chunk = min(prompt_len - start, next_power_of_two(prefill_chunk))
    limit = np.int32(config.max_new_tokens)
    state = _prefill(graphdef, params, tokens, valid, done, keys, limit, controls, cached, config=static, chunk=chunk)
    state = _decode(graphdef, params, state, controls, config=static)
    n = len(prompts)
    if prefix is not None:
        # Decode writes only slots >= P, so the prompt slots still hold every prompt's KV.
        prompt_kv = np.stack([np.stack([np.asarray(x[:n, :prompt_len]) for x in xs]) for xs in state.cache.tuples()])
        for b, prompt in enumerate(prompts):
            prefix.add(prompt, prompt_kv[:, :, b, prompt_len - len(prompt) :].copy())
    return SampleOutput(
        tokens=np.asarray(state.tokens)[:n, prompt_len : prompt_len + config.max_new_tokens],
        logprobs=np.asarray(state.logprobs)[:n, : config.max_new_tokens],
        lengths=np.asarray(state.lengths)[:n],
        stopped=np.asarray(state.done)[:n],  # a real row is only ever done by a stop, never by the limit
    )


@functools.partial(jax.jit, static_argnames=("graphdef", "config", "chunk"))
def _prefill(
    graphdef,
    params,
    tokens,
    valid,
    done,
    rng,
    limit,
    controls: Controls,
    cached: KVCache | None,
    *,
    config: SamplingConfig,
    chunk: int,
) -> SamplerState:
    """Run the prompts [B, P] through the model into a fresh cache, `chunk` tokens at a time (only the last
    position's logits are kept, so memory holds [B, chunk, V] logits, not [B, P, V]); sample the first token.
    `cached` holds the KV of the first C slots (taken from a prefix cache): only slots [C, P) are prefilled."""
    model = nnx.merge(graphdef, params)
    batch, prompt_len = tokens.shape
    size = prompt_len + config.max_new_tokens
    positions = positions_from_mask(valid)
    # New-token slots count as valid: each is written before any query at or after it attends it.
    slot_valid = jnp.pad(valid, ((0, 0), (0, config.max_new_tokens)), constant_values=True)
    slots = jnp.arange(size)

    def prefill_chunk(c, carry):
        cache, _ = carry
        start = c * chunk
        queries = start + jnp.arange(chunk)
        query_valid = jax.lax.dynamic_slice_in_dim(valid, start, chunk, axis=1)
        # As `causal_mask`, over all cache slots: valid queries attend valid slots at or before them.
        mask = (slots[None, :] <= queries[:, None])[None] & slot_valid[:, None, :] & query_valid[:, :, None]
        logits, cache = model(
            jax.lax.dynamic_slice_in_dim(tokens, start, chunk, axis=1),
            jax.lax.dynamic_slice_in_dim(positions, start, chunk, axis=1),
            mask,
            cache=cache,
            cache_index=start,
            use_lora=config.use_lora,
        )
        return cache, logits[:, -1]

    start = 0 if cached is None else cached.size
    cache = init_cache(model.config, batch, size) if cached is None else cached.grow(batch, size - start)
    empty = (cache, jnp.zeros((batch, model.config.vocab_size), jnp.float32))
    cache, last_logits = jax.lax.fori_loop(start // chunk, prompt_len // chunk, prefill_chunk, empty)
    state = SamplerState(
        tokens=jnp.pad(tokens, ((0, 0), (0, config.max_new_tokens)), constant_values=config.pad_id),
        valid=slot_valid,
        cursor=jnp.int32(prompt_len - 1),
        positions=positions[:, -1],
        cache=cache,
        done=done,
        lengths=jnp.zeros((batch,), jnp.int32),
        logprobs=jnp.zeros((batch, config.max_new_tokens), jnp.float32),
        rng=rng,
        limit=limit,
    )
    return _append_sampled(state, last_logits, controls, config)


@functools.partial(jax.jit, static_argnames=("graphdef", "config"), donate_argnames=("state",))
def _decode(graphdef, params, state: SamplerState, controls: Controls, *, config: SamplingConfig) -> SamplerState:
    """Decode one token per row per step until every row is done or `limit` tokens are out."""
    model = nnx.merge(graphdef, params)
    prompt_len = state.tokens.shape[1] - config.max_new_tokens
    slots = jnp.arange(state.tokens.shape[1])

    def running(s: SamplerState) -> jax.Array:
        return ~jnp.all(s.done) & (s.cursor - prompt_len + 1 < s.limit)

    def step(s: SamplerState) -> SamplerState:
        token = jax.lax.dynamic_slice_in_dim(s.tokens, s.cursor, 1, axis=1)
        mask = (s.valid & (slots <= s.cursor))[:, None, :]
        logits, cache = model(
            token, s.positions[:, None], mask, cache=s.cache, cache_index=s.cursor, use_lora=config.use_lora
        )
        return _append_sampled(dataclasses.replace(s, cache=cache), logits[:, 0], controls, config)

    return jax.lax.while_loop(running, step, state)


def prefix_slots(prefix: PrefixCache, prompts: Sequence[Sequence[int]], batch: int, prompt_len: int) -> KVCache | None:
    """The KV of the buffer slots [0, P - Q) from `prefix` (rows left-padded to `prompt_len`), Q the bucket of
    the longest uncached suffix; None when nothing is cached (then every slot is prefilled)."""
    found = [prefix.longest(p) for p in prompts]
    suffix = next_power_of_two(max(len(p) - n for p, (n, _) in zip(prompts, found, strict=True)), MIN_PROMPT_BUCKET)
    start = prompt_len - min(suffix, prompt_len)
    prefix.reused += sum(n for n, _ in found)
    prefix.computed += sum(len(p) for p in prompts) - sum(n for n, _ in found)
    kvs = [kv for _, kv in found if kv is not None]
    if start == 0 or not kvs:
        return None
    two, layers, _, heads, dim = kvs[0].shape
    slots = np.zeros((two, layers, batch, start, heads, dim), kvs[0].dtype)
    for b, (prompt, (_, kv)) in enumerate(zip(prompts, found, strict=True)):
        first = prompt_len - len(prompt)  # the row's first slot; its slots before `start` are all cached
        if first < start:
            slots[:, :, b, first:start] = kv[:, :, : start - first]
    return KVCache(k=tuple(slots[0]), v=tuple(slots[1]))


def _append_sampled(state: SamplerState, logits: jax.Array, controls: Controls, config: SamplingConfig) -> SamplerState:
    """Sample a token per row from `logits` float32[B, V], write it after the cursor, update the flags."""
    prompt_len = state.tokens.shape[1] - config.max_new_tokens
    slots = jnp.arange(state.tokens.shape[1])
    history = state.valid & (slots <= state.cursor)
    if not config.penalize_prompt:
        history &= slots >= prompt_len  # only this call's tokens (the current doctor turn)
    processed = logits.astype(jnp.float32)
    if config.repetition_penalty != 1.0:
        processed = repetition_penalty(processed, state.tokens, history, config.repetition_penalty)
    if config.no_repeat_ngram_size:
        processed = ban_repeated_ngrams(processed, state.tokens, history, state.cursor, config.no_repeat_ngram_size)
    index = state.cursor + 1
    if config.is_greedy:
        token = jnp.argmax(processed, axis=-1).astype(jnp.int32)
    else:
        filtered = filter_top_k_top_p(processed / controls.temperature, config.top_k, config.top_p)
        # New token t of row b is drawn with fold_in(rng[b], t): its key, not its batch place.
        step_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(state.rng, index - prompt_len)
        token = jax.vmap(jax.random.categorical)(step_keys, filtered).astype(jnp.int32)
    raw = logits.astype(jnp.float32)
    logprob = jnp.take_along_axis(raw, token[:, None], axis=-1)[:, 0] - jax.nn.logsumexp(raw, axis=-1)

    active = ~state.done
    token = jnp.where(active, token, config.pad_id)
    tokens = jax.lax.dynamic_update_slice_in_dim(state.tokens, token[:, None], index, axis=1)
    logprobs = jax.lax.dynamic_update_slice_in_dim(
        state.logprobs, jnp.where(active, logprob, 0.0)[:, None], index - prompt_len, axis=1
    )
    lengths = state.lengths + active.astype(jnp.int32)
    stop = jnp.any(token[:, None] == controls.eos_ids[None, :], axis=-1)
    # The last M tokens of each row (clipped indices only ever reach sequences longer than `lengths`).
    width = controls.stop_ids.shape[1]
    tail = jnp.take(tokens, jnp.maximum(index - (width - 1) + jnp.arange(width), 0), axis=1)  # [B, M]
    in_sequence = jnp.arange(width)[None, :] >= width - controls.stop_lengths[:, None]  # [S, M]
    equal = jnp.all((tail[:, None, :] == controls.stop_ids[None]) | ~in_sequence[None], axis=-1)  # [B, S]
    usable = (controls.stop_lengths[None, :] > 0) & (lengths[:, None] >= controls.stop_lengths[None, :])
    stop |= jnp.any(equal & usable, axis=-1)
    return dataclasses.replace(
        state,
        tokens=tokens,
        cursor=index,
        positions=state.positions + 1,
        done=state.done | (active & stop),
        lengths=lengths,
        logprobs=logprobs,
    )


def repetition_penalty(logits: jax.Array, tokens: jax.Array, history: jax.Array, penalty: float) -> jax.Array:
    """logits float32[B, V]; tokens int32[B, L]; history bool[B, L] marks the tokens seen so far.

    As transformers (CTRL): a seen token's logit is divided by `penalty` when positive, multiplied when not.
    """
    vocab = logits.shape[-1]
    seen = jnp.take_along_axis(logits, tokens, axis=-1)
    penalized = jnp.where(seen > 0, seen / penalty, seen * penalty)
    # Unseen slots scatter out of range and are dropped.
    targets = jnp.where(history, tokens, vocab)
    rows = jnp.arange(logits.shape[0])[:, None]
    return logits.at[rows, targets].set(penalized, mode="drop")


def ban_repeated_ngrams(
    logits: jax.Array, tokens: jax.Array, history: jax.Array, cursor: jax.Array, n: int
) -> jax.Array:
    """Forbid every token that would complete an n-gram already in the history (transformers' rule).

    logits float32[B, V]; tokens int32[B, L]; history bool[B, L] the tokens so far, a contiguous run per row
    ending at buffer index `cursor` (left padding is not history).
    """
    starts = jnp.arange(tokens.shape[1])
    # Start i holds an earlier n-gram when tokens[i : i + n] is all history.
    match = history & (starts + n - 1 <= cursor)
    if n > 1:
        first = cursor - (n - 2)  # where the current (n - 1)-token prefix starts
        prefix_in_history = (first >= 0) & jnp.take(history, jnp.maximum(first, 0), axis=1)
        match &= prefix_in_history[:, None]
        for j in range(n - 1):
            current = jnp.take(tokens, jnp.maximum(first + j, 0), axis=1)
            # i + j <= cursor < L for matching starts, so the roll never wraps into them.
            match &= jnp.roll(tokens, -j, axis=1) == current[:, None]
    completions = jnp.roll(tokens, -(n - 1), axis=1)
    targets = jnp.where(match, completions, logits.shape[-1])
    rows = jnp.arange(logits.shape[0])[:, None]
    banned = jnp.zeros(logits.shape, bool).at[rows, targets].set(True, mode="drop")
    return jnp.where(banned, -jnp.inf, logits)


def filter_top_k_top_p(logits: jax.Array, top_k: int, top_p: float) -> jax.Array:
    """logits float32[B, V] with every token outside the top-k, then outside the top-p nucleus, set to -inf.

    The nucleus is the smallest set of most likely tokens whose probability reaches `top_p` (at least one).
    """
    if top_k == 0 and top_p >= 1.0:
        return logits
    # Only the k best need sorting when top-k is on: top-p then works within them.
    top_k = min(top_k, logits.shape[-1])
    ranked = jax.lax.top_k(logits, top_k)[0] if top_k else -jnp.sort(-logits, axis=-1)
    threshold = ranked[:, -1]
    if top_p < 1.0:
        probs = jax.nn.softmax(ranked, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs
        keep = jnp.sum(before < top_p, axis=-1)
        threshold = jnp.take_along_axis(ranked, keep[:, None] - 1, axis=-1)[:, 0]
    return jnp.where(logits < threshold[:, None], -jnp.inf, logits)


def stop_sequences_for(tokenizer: PreTrainedTokenizerBase, stop_strings: Sequence[str]) -> tuple[tuple[int, ...], ...]:
    """Each stop string's tokenization on its own, for `SamplingConfig.stop_sequences` (an early stop; in
    context a string may tokenize otherwise, which `truncate_at_stop_strings` catches)."""
    return tuple(tuple(tokenizer(s, add_special_tokens=False)["input_ids"]) for s in stop_strings)


def truncate_at_stop_strings(
    tokenizer: PreTrainedTokenizerBase, output: SampleOutput, stop_strings: Sequence[str], *, pad_id: int = 0
) -> SampleOutput:
    """Cut each row after the first token whose decoded text completes a stop string (which stays in)."""
    tokens, logprobs = output.tokens.copy(), output.logprobs.copy()
    lengths, stopped = output.lengths.copy(), output.stopped.copy()
    for b, n in enumerate(output.lengths):
        if not stop_strings or not _has_stop(tokenizer.decode(tokens[b, :n]), stop_strings):
            continue
        # The shortest prefix whose text contains a stop string (containment only grows with the prefix).
        lo, hi = 1, int(n)
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if _has_stop(tokenizer.decode(tokens[b, :mid]), stop_strings) else (mid + 1, hi)
        tokens[b, lo:] = pad_id
        logprobs[b, lo:] = 0.0
        lengths[b], stopped[b] = lo, True
    return SampleOutput(tokens=tokens, logprobs=logprobs, lengths=lengths, stopped=stopped)


@dataclasses.dataclass(frozen=True)
class SampledTurn:
    """One sampled continuation, token in and token out.

    Attributes:
      ids: int32[n] the sampled token ids, a final EOS / stop-sequence token included.
      logprobs: float32[n] the raw model's log-probability of each (temperature 1, no penalties).
      stopped: True when the row ended on an EOS id or a stop sequence/string; False when cut at the limit.
      text: the decoded text, special tokens skipped, cut before the first stop string.
    """

    ids: np.ndarray
    logprobs: np.ndarray
    stopped: bool
    text: str


def sampled_turns(
    tokenizer: PreTrainedTokenizerBase, output: SampleOutput, stop_strings: Sequence[str] = ()
) -> list[SampledTurn]:
    """`output`'s rows as `SampledTurn`s (cut at stop strings first with `truncate_at_stop_strings`)."""
    texts = decode_texts(tokenizer, output, stop_strings)
    return [
        SampledTurn(
            ids=output.tokens[b, :n].astype(np.int32),
            logprobs=output.logprobs[b, :n].astype(np.float32),
            stopped=bool(output.stopped[b]),
            text=texts[b],
        )
        for b, n in enumerate(output.lengths)
    ]


def decode_texts(
    tokenizer: PreTrainedTokenizerBase, output: SampleOutput, stop_strings: Sequence[str] = ()
) -> list[str]:
    """Each row's text without special tokens, cut before the first stop string."""
    texts = []
    for sequence in output.sequences():
        text = tokenizer.decode(sequence, skip_special_tokens=True)
        cut = min((i for i in (text.find(s) for s in stop_strings) if i >= 0), default=len(text))
        texts.append(text[:cut])
    return texts


def _has_stop(text: str, stop_strings: Sequence[str]) -> bool:
    return any(s in text for s in stop_strings)
