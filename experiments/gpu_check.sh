#!/usr/bin/env bash
# The device check, one call (about 6 min on an H100; the device tool's 15-minute budget leaves room to rerun).
#   1. The test suite under that machine's JAX (0.11.2) and Python 3.12, on the CPU with 8 fake devices as
#      in CI (the slow end-to-end runs and the tests needing ../shared/data or the SmolLM2 package skip there).
#   2. experiments/bench_shapley.py on the GPU: SmolLM2-135M-shaped random weights (the GGUF is too large to
#      carry), three 7-fact MedQA cases, ours (JAX on the GPU) against the paper's way (torch on the GPU).
#   3. experiments/train_step_device.py: the SFT step on the GPU, SmolLM2-shaped random weights in bf16 (LoRA
#      with remat at 8 x 1,024; full fine-tuning without remat at 8 x 512): tokens/s, MFU, memory estimate.
# Carried (ignored here): .whl = mctx, ml_collections and gguf wheels (missing there); .gpu = SmolLM2's
# config.json and tokenizer and the first 400 MedQA lines. Run from the repo root:
#   device run: bash experiments/gpu_check.sh   (carry .whl .gpu)
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD || exit 1
export TRANSFORMERS_VERBOSITY=error HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
python3 -c "import sys, jax, flax, optax, orbax.checkpoint as o, chex, transformers, torch; \
print('python', sys.version.split()[0], 'jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, \
'orbax', o.__version__, 'chex', chex.__version__, 'transformers', transformers.__version__, 'torch', torch.__version__)" \
  | tee -a "$OUT/device.txt"

if [ "${GPU_CHECK_TESTS:-1}" = 1 ]; then
  echo "== 1. test suite (CPU, not slow)"
  timeout 230 python3 -m pytest -q -p no:cacheprovider -m "not slow" tests > "$OUT/pytest.log" 2>&1
  echo "pytest exit $?"
  grep -E "passed|failed|error" "$OUT/pytest.log" | tail -3
  grep -E "^(FAILED|ERROR)" "$OUT/pytest.log" | head -20
fi

echo "== 2. Shapley bench on the GPU (random SmolLM2-shaped weights)"
# Every chunk padded to 64 rows (padding rows costs little on a GPU and keeps the compiled shapes few);
# no autotuning (XLA's GEMM autotuning made each of the many shapes compile for tens of seconds).
XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_autotune_level=0" timeout 300 python3 experiments/bench_shapley.py \
  --random-weights .gpu/smollm2 --data .gpu/medqa_dev_convo.jsonl --cases 3 --min-facts 7 --max-facts 7 \
  --batch-size 64 --min-batch 64 --methods exact,exact_flat,tmc,ks2,ks4,ks8 > "$OUT/bench_gpu.log" 2>&1
echo "bench exit $?"
grep -v -E "Warning|warn|it/s]" "$OUT/bench_gpu.log" | tail -30

echo "== 3. SFT step on the GPU (random SmolLM2-shaped weights, bf16)"
for args in "--lora-rank 8 --length 1024" "--lora-rank 0 --no-remat --length 512"; do
  timeout 150 python3 experiments/train_step_device.py --config-json .gpu/smollm2/config.json --dtype bfloat16 \
    --rows 8 $args > "$OUT/train_step.log" 2>&1
  echo "train step ($args) exit $?"
  grep -v -E "Warning|warn" "$OUT/train_step.log" | tail -3
done
