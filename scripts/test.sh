#!/usr/bin/env bash
# Sets up what the tests need, then runs the whole suite (slow end-to-end runs included).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
export TRANSFORMERS_VERBOSITY=error HF_HUB_OFFLINE=1
python -m pytest -q -p no:cacheprovider tests "$@"
