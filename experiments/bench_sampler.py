"""Sampler speed: our jitted KV-cache sampler against transformers' `generate`, SmolLM2-135M-Instruct in fp32.

Both models come from the same GGUF (dequantized to fp32). Measured, medians of `--reps` runs after a warm-up:
  * decode tokens/s at batch 1 and batch 8 (greedy, same chat prompt, same number of new tokens, EOS ignored),
    computed the same way for both: B * (N - 1) / (time(generate N tokens) - time(generate 1 token)), so the
    prefill is not counted; the ratio ours / transformers;
  * prefill time (= time to generate 1 token) for both;
  * a batched forward of 32 x 256 tokens (logits included) for both, in tokens/s and as MFU against the FLOP/s
    of a large fp32 matmul measured in the same run (each framework's own matmul, and the better of the two);
  * the memory-bandwidth bound of batch-1 decode: fp32 weight bytes read per token against the bandwidth of a
    large matrix-vector product measured in the same run;
  * compile time of our prefill + decode, reported apart (it is not in any rate above).
transformers runs under `torch.inference_mode()`, `torch.set_num_threads(2)`, `use_cache=True`.
The load average is printed: on a shared machine the numbers are only comparable within one run.

Where our decode time goes (`--profile` times one decode step's parts, each jitted alone on the same shapes).
Measured while writing this, on the shared 2-core machine under load ~6 (absolute numbers meaningless, the
comparisons made at the same moment are not): a one-token forward of the whole model took 51.7 / 50.8 ms
while a 512 MB matrix-vector product, scaled to the 538 MB of weights a step reads, took 48.0 / 53.4 ms -- the
forward runs at the machine's weight-reading speed. Process CPU time, which the load disturbs less than wall
time: 42-46 ms per step inside the decode `while_loop` against 46-47 ms per standalone one-token forward, so
the loop and the sampling add nothing measurable (on 2 free cores that is ~22 ms wall, ~45 tok/s). Within it the output head ([576, 49152], 113 MB, 21% of
the bytes) is the largest single read; log-softmax + argmax over the vocabulary is ~1%. The optimized HLO
of the decode loop has every projection as a dot with the kernel's contracting dimension first (no weight
transposes) and the loop state aliased in place; the only copies are of the KV cache, which the attention
einsum transposes from [B, S, kv, hd] to [B, kv, S, hd] in every step and layer: negligible at S = 128, but
at S = 8192 that is ~2 x 30 x 6 MB per step, comparable with the weights (a cache stored [B, kv, S, hd] would
avoid it; the layout is the model's contract). Our compile time (prefill + decode) was ~18 s under that load.

    python experiments/bench_sampler.py            # the real run (several minutes; needs a quiet machine)
    python experiments/bench_sampler.py --quick    # smoke run: tiny sizes, 1 repetition (--reps 5 for medians)
    python experiments/bench_sampler.py --quick --reps 5 --json out.json   # experiments/run_benchmarks.py's run
"""

from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import sys
import time

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))  # experiments/ is not an installed package

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from experiments.bench_json import result_row, write_results
from promed_jax import assets
from promed_jax.models.checkpoints import load_gguf
from promed_jax.models.transformer import causal_mask, init_cache, positions_from_mask
from promed_jax.sampling.sampler import SamplingConfig, generate
from promed_jax.text.dialogue import render_dialogue
from promed_jax.text.tokenizer import load_tokenizer

CHAT = [
    {"role": "system", "content": "You are a careful doctor. Ask one question at a time."},
    {"role": "user", "content": "I have had a fever, a dry cough and chest pain for three days. What could it be?"},
]


def median_time(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def ours_generate(split, prompts, new_tokens):
    config = SamplingConfig(max_new_tokens=new_tokens, greedy=True)
    return lambda: generate(*split, prompts, config, jax.random.key(0))


def torch_generate(model, prompts, new_tokens):
    import torch

    ids = torch.tensor(prompts)

    def run():
        with torch.inference_mode():
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                do_sample=False,
                use_cache=True,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                pad_token_id=0,
            )
        assert out.shape[1] == ids.shape[1] + new_tokens
        return out

    return run


def decode_rate(gen, batch: int, new_tokens: int, reps: int) -> tuple[float, float]:
    """(decode tokens/s, prefill seconds) from end-to-end times of N and of 1 new token."""
    full = median_time(gen(new_tokens), reps)
    prefill = median_time(gen(1), reps)
    return batch * (new_tokens - 1) / max(full - prefill, 1e-9), prefill


def forward_flops_per_token(cfg, seq: int) -> float:
    """Matmul FLOPs of one forward per token: 2 x (projection + head weights) + attention (PaLM's count)."""
    d, f, h, kv, hd = cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    per_layer = d * h * hd * 2 + d * kv * hd * 2 + 3 * d * f
    weights = cfg.num_layers * per_layer + d * cfg.vocab_size
    return 2 * weights + 4 * cfg.num_layers * seq * h * hd


def weight_bytes_per_decode_token(cfg) -> int:
    """fp32 bytes of the weights one decode step reads (the embedding contributes one row only)."""
    d, f, h, kv, hd = cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    per_layer = d * h * hd * 2 + d * kv * hd * 2 + 3 * d * f + 2 * d
    return 4 * (cfg.num_layers * per_layer + d * cfg.vocab_size + d)


def matmul_flops(size: int, reps: int) -> tuple[float, float]:
    """(JAX, torch) FLOP/s of an fp32 [size, size] @ [size, size] product."""
    import torch

    a = jax.random.normal(jax.random.key(0), (size, size), jnp.float32)
    mm = jax.jit(lambda x: x @ x)
    mm(a).block_until_ready()
    t_jax = median_time(lambda: mm(a).block_until_ready(), reps)
    b = torch.randn(size, size)
    with torch.inference_mode():
        torch.mm(b, b)
        t_torch = median_time(lambda: torch.mm(b, b), reps)
    return 2 * size**3 / t_jax, 2 * size**3 / t_torch


def matvec_bandwidth(reps: int) -> tuple[float, float]:
    """(JAX, torch) bytes/s of a vector times a 512 MB fp32 matrix stored [in, out]: decode's access pattern."""
    import torch

    w = jnp.ones((4096, 32768), jnp.float32)
    x = jnp.ones((1, 4096), jnp.float32)
    mv = jax.jit(lambda x, w: x @ w)
    mv(x, w).block_until_ready()
    t_jax = median_time(lambda: mv(x, w).block_until_ready(), reps)
    tw, tx = torch.ones(4096, 32768), torch.ones(1, 4096)
    with torch.inference_mode():
        tx @ tw
        t_torch = median_time(lambda: tx @ tw, reps)
    nbytes = 4096 * 32768 * 4
    return nbytes / t_jax, nbytes / t_torch


def profile_decode_step(model, split, batch: int, cache_size: int, reps: int) -> dict[str, float]:
    """Seconds per call of a one-token forward, of the head product alone and of the sampling arithmetic."""
    cfg = model.config
    tokens = jnp.zeros((batch, 1), jnp.int32)
    positions = jnp.full((batch, 1), cache_size // 2, jnp.int32)
    mask = jnp.ones((batch, 1, cache_size), bool)
    cache = init_cache(cfg, batch, cache_size)

    @jax.jit
    def step(params, cache):
        logits, cache = nnx.merge(split[0], params)(tokens, positions, mask, cache=cache, cache_index=jnp.int32(1))
        return logits, cache

    head = model.head_kernel()
    hidden = jnp.ones((batch, cfg.hidden_size), jnp.float32)
    head_only = jax.jit(lambda h, w: h @ w)
    logits = jnp.ones((batch, cfg.vocab_size), jnp.float32)
    sample = jax.jit(lambda x: (jnp.argmax(x, -1), jax.nn.log_softmax(x)[:, 0]))

    def timed(fn, *args):
        jax.block_until_ready(fn(*args))
        return median_time(lambda: jax.block_until_ready(fn(*args)), reps)

    return {
        "one-token forward (whole model)": timed(step, split[1], cache),
        "output head [D, V] product": timed(head_only, hidden, head),
        "log-softmax + argmax over V": timed(sample, logits),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: small sizes, one repetition by default")
    parser.add_argument("--reps", type=int, default=None, help="repetitions per median (default 5, --quick 1)")
    parser.add_argument("--json", type=pathlib.Path, help="also write the results here (experiments/bench_json.py)")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--profile", action="store_true", help="also time the parts of one decode step")
    args = parser.parse_args()
    reps = args.reps or (1 if args.quick else 5)
    new_tokens = 8 if args.quick else args.new_tokens
    fwd_batch, fwd_len = (2, 32) if args.quick else (32, 256)

    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(2)
    print(
        f"load average (1, 5, 15 min): {os.getloadavg()}; cpus: {os.cpu_count()}; jax {jax.__version__}, "
        f"torch {torch.__version__}"
    )
    path = assets.smollm2_gguf_path()
    tokenizer = load_tokenizer(path)
    model = load_gguf(path)
    model.materialize_head()
    split = nnx.split(model)
    cfg = model.config
    theirs = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    prompt = render_dialogue(tokenizer, CHAT, add_generation_prompt=True).ids.tolist()
    print(f"SmolLM2-135M fp32, prompt {len(prompt)} tokens, {new_tokens} new tokens, medians of {reps}")

    start = time.perf_counter()
    ours_generate(split, [prompt], new_tokens)()
    ours_generate(split, [prompt], 1)()
    first = time.perf_counter() - start
    steady = median_time(ours_generate(split, [prompt], new_tokens), 1) + median_time(
        ours_generate(split, [prompt], 1), 1
    )
    compile_s = first - steady
    print(f"our compile time (prefill + decode, batch 1): {compile_s:.1f} s")

    rows = []
    for batch in (1, 8):
        prompts = [prompt] * batch
        ours_generate(split, prompts, new_tokens)()  # compile this batch size
        ours_generate(split, prompts, 1)()
        torch_generate(theirs, prompts, 2)()
        our_rate, our_prefill = decode_rate(lambda n, p=prompts: ours_generate(split, p, n), batch, new_tokens, reps)
        hf_rate, hf_prefill = decode_rate(lambda n, p=prompts: torch_generate(theirs, p, n), batch, new_tokens, reps)
        rows.append((batch, our_rate, hf_rate, our_prefill, hf_prefill))
    print("batch | ours tok/s | transformers tok/s | ratio | ours prefill s | transformers prefill s")
    for batch, our_rate, hf_rate, our_prefill, hf_prefill in rows:
        print(
            f"{batch:5d} | {our_rate:10.1f} | {hf_rate:18.1f} | {our_rate / hf_rate:5.2f} | {our_prefill:14.3f} | "
            f"{hf_prefill:22.3f}"
        )

    bw_jax, bw_torch = matvec_bandwidth(reps)
    bandwidth = max(bw_jax, bw_torch)
    weight_bytes = weight_bytes_per_decode_token(cfg)
    bound = bandwidth / weight_bytes
    print(
        f"matrix-vector read bandwidth: jax {bw_jax / 1e9:.1f} GB/s, torch {bw_torch / 1e9:.1f} GB/s; "
        f"{weight_bytes / 1e6:.0f} MB of weights per decode token -> batch-1 bound {bound:.1f} tok/s; "
        f"ours reaches {rows[0][1] / bound:.0%} of it, transformers {rows[0][2] / bound:.0%}"
    )

    tokens = np.asarray(jax.random.randint(jax.random.key(1), (fwd_batch, fwd_len), 0, cfg.vocab_size), np.int32)
    valid = jnp.ones(tokens.shape, bool)

    @jax.jit
    def forward(params, tokens):
        return nnx.merge(split[0], params)(tokens, positions_from_mask(valid), causal_mask(valid))[0]

    forward(split[1], tokens).block_until_ready()
    t_ours = median_time(lambda: forward(split[1], tokens).block_until_ready(), reps)
    torch_tokens = torch.from_numpy(tokens.astype(np.int64))
    with torch.inference_mode():
        theirs(input_ids=torch_tokens)
        t_hf = median_time(lambda: theirs(input_ids=torch_tokens).logits, reps)
    flops = forward_flops_per_token(cfg, fwd_len) * tokens.size
    peak_jax, peak_torch = matmul_flops(1024 if args.quick else 4096, reps)
    peak = max(peak_jax, peak_torch)
    print(f"large fp32 matmul: jax {peak_jax / 1e9:.1f} GFLOP/s, torch {peak_torch / 1e9:.1f} GFLOP/s")
    print(f"forward {fwd_batch} x {fwd_len} | tokens/s | GFLOP/s | MFU (own matmul) | MFU (best matmul)")
    for name, seconds, own in (("ours", t_ours, peak_jax), ("transformers", t_hf, peak_torch)):
        rate = flops / seconds
        print(
            f"{name:>12} | {tokens.size / seconds:8.0f} | {rate / 1e9:7.1f} | {rate / own:16.0%} | {rate / peak:17.0%}"
        )
    results = [
        result_row(f"decode, batch {batch}", "tok/s", ours_rate, hf_rate, compile_s=compile_s if batch == 1 else None)
        for batch, ours_rate, hf_rate, _, _ in rows
    ]
    results.append(result_row("prefill, batch 1", "s", rows[0][3], rows[0][4], better="lower"))
    results.append(result_row(f"forward {fwd_batch} x {fwd_len}", "tok/s", tokens.size / t_ours, tokens.size / t_hf))
    write_results(args.json, "bench_sampler", results, reps=reps)

    if args.profile:
        cache_size = 64 + new_tokens
        parts = profile_decode_step(model, split, 1, cache_size, reps)
        print("one decode step at batch 1, parts timed alone:")
        for name, seconds in parts.items():
            print(f"  {name:34s} {seconds * 1e3:7.2f} ms")


if __name__ == "__main__":
    main()
