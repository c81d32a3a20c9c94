#!/usr/bin/env bash
# Set up PhotonInfer, then serve the default model (or --model PATH) on http://127.0.0.1:5728
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/photoninfer serve "$@"
