#!/usr/bin/env bash
# One lent-GPU session in one command: GPU tests, kernel checks/timings, then the bench (side by side with HF).
#   bash scripts/h100_session.sh [tests|gputests] [kernels] [linears] [attention] [hostprof] [bench ARGS... +] [bench ARGS...]
# (each bench's arguments end at a lone "+" or at the end)
# Run from the repo root on the GPU machine; logs and JSON go to $OUT (default ./gpu-out).
# Needs: the SmolLM2 tokenizer saved in .devcarry/tok (the GGUF is too large to upload there).
set -uo pipefail
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export PHOTONINFER_TEST_TOKENIZER_DIR=${PHOTONINFER_TEST_TOKENIZER_DIR:-$PWD/.devcarry/tok}
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
while [ $# -gt 0 ]; do
  case "$1" in
    tests) shift; timeout 420 python3 -m pytest -q -p no:cacheprovider tests/gpu tests/kernels 2>&1 | tee "$OUT/gpu_tests.log" | tail -25 ;;
    gputests) shift; timeout 300 python3 -m pytest -q -p no:cacheprovider tests/gpu 2>&1 | tee "$OUT/gpu_tests.log" | tail -15 ;;
    hostprof) shift; timeout 240 python3 scripts/host_profile.py --shape ${HOSTPROF_SHAPE:-llama-3.2-1b} --concurrency ${HOSTPROF_CONCURRENCY:-1,256} ${HOSTPROF_ARGS:---ttft} 2>&1 | tee "$OUT/host_profile.log" | grep -v "^Loading" | cut -c1-160 | head -150 ;;
    kernels) shift; timeout 240 python3 scripts/bench_kernels.py 2>&1 | tee "$OUT/bench_kernels.log" | tail -40 ;;
    linears) shift; for s in norm_linear decode_linear; do  # decode-sized linears' tiles against cuBLAS
               timeout 240 python3 scripts/bench_$s.py --out "$OUT/$s.json" 2>&1 | grep -v Warn | cut -c1-200; done ;;
    attention) shift; timeout 240 python3 scripts/bench_decode_attention.py --out "$OUT/decode_attention.json" 2>&1 \
                 | grep -v Warn | cut -c1-200 ;;  # decode attention's tiles and partitions at 1 and 16 sequences
    bench) shift; args=(); while [ $# -gt 0 ] && [ "$1" != "+" ]; do args+=("$1"); shift; done; [ $# -gt 0 ] && shift
           n=$((${n:-0} + 1)); timeout 540 python3 -m photoninfer bench "${args[@]}" 2>&1 | tee "$OUT/bench$n.log" \
             | grep -v "^USDT" | grep -v "INFO photoninfer.bench" | tail -25 ;;
    *) echo "unknown step $1"; exit 2 ;;
  esac
done
