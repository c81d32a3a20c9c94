#!/usr/bin/env bash
# Set up everything the tests need, then run the whole suite (CPU only; GPU tests skip without CUDA).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
. .venv/bin/activate
python -m pytest -q "$@"
