"""Where a batch-1 decode step's time goes: per-layer cost against the bytes each layer reads.

SmolLM2-135M-shaped random weights (fp32, tied head materialized [D, V]), one-token forward over a 128-slot
KV cache, for 1, 10 and 30 layers. The difference between 30 and 10 layers gives the cost of one layer; the
1-layer step is dominated by the [576, 49152] output head. Each is compared with a large matrix-vector
product measured in the same run (the machine's weight-reading speed for decode).

    python experiments/profile_decode.py

Measured here (2 cores, load ~1): one layer 0.91 ms for its 14.2 MB (15.6 GB/s) while the 1-layer step,
whose bytes are mostly the 113 MB head, ran at 39 GB/s: the seven small products of a layer (1.3-3.5 MB
each) and its ~10 elementwise fusions run at well under the bandwidth of one large product, because each
XLA:CPU kernel launch costs some microseconds of dispatch; the head and the loop itself cost little.
"""

from __future__ import annotations

import os
import statistics
import time

import jax
import jax.numpy as jnp
from flax import nnx

from promed_jax.models.config import ModelConfig
from promed_jax.models.transformer import Transformer, init_cache

SMOLLM2 = {
    "vocab_size": 49152,
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_heads": 9,
    "num_kv_heads": 3,
    "head_dim": 64,
    "tie_word_embeddings": True,
    "max_position_embeddings": 8192,
}


def median_seconds(fn, reps: int = 30) -> float:
    jax.block_until_ready(fn())
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def step_seconds(num_layers: int) -> tuple[float, int]:
    cfg = ModelConfig.tiny(num_layers=num_layers, **SMOLLM2)
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    model.materialize_head()
    graphdef, params = nnx.split(model)
    cache = init_cache(cfg, 1, 128)
    tokens = jnp.zeros((1, 1), jnp.int32)
    positions = jnp.full((1, 1), 64, jnp.int32)
    mask = jnp.ones((1, 1, 128), bool)
    step = jax.jit(lambda p, c: nnx.merge(graphdef, p)(tokens, positions, mask, cache=c, cache_index=jnp.int32(64)))
    # The embedding is gathered (one row), not read whole: leave it out of the bytes.
    read = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params)) - cfg.vocab_size * cfg.hidden_size * 4
    return median_seconds(lambda: step(params, cache)), read


def main() -> None:
    print(f"load average: {os.getloadavg()}; jax {jax.__version__}")
    w = jnp.ones((4096, 32768), jnp.float32)
    x = jnp.ones((1, 4096), jnp.float32)
    matvec = jax.jit(lambda x, w: x @ w)
    bandwidth = w.size * 4 / median_seconds(lambda: matvec(x, w), reps=10)
    print(f"large matrix-vector product (512 MB, [in, out]): {bandwidth / 1e9:.1f} GB/s")
    steps = {n: step_seconds(n) for n in (1, 10, 30)}
    for n, (seconds, read) in steps.items():
        print(
            f"{n:2d} layers: {seconds * 1e3:6.2f} ms per token, {read / 1e6:4.0f} MB read, {read / seconds / 1e9:5.1f} GB/s"
        )
    layer_s = (steps[30][0] - steps[10][0]) / 20
    layer_bytes = (steps[30][1] - steps[10][1]) / 20
    print(
        f"one layer: {layer_s * 1e3:.3f} ms for {layer_bytes / 1e6:.1f} MB = {layer_bytes / layer_s / 1e9:.1f} GB/s "
        f"({layer_bytes / layer_s / bandwidth:.0%} of the large product's bandwidth); "
        f"30 layers at full bandwidth would take {30 * layer_bytes / bandwidth * 1e3:.1f} ms, measured "
        f"{30 * layer_s * 1e3:.1f} ms"
    )


if __name__ == "__main__":
    main()
