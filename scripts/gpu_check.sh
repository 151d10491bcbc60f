#!/usr/bin/env bash
# One script for a lent GPU (H100): the kernel tests compiled for the card, then the
# measurements of scripts/gpu_check.py (quantized matmul and its launch-setting sweep, decode
# and prefill attention, end-to-end decode of a Llama-3-8B-shaped model against transformers).
# Budget: GPU_CHECK_SECONDS (530 s by default); parts: GPU_CHECK_PARTS.
#
#   bash scripts/gpu_check.sh            # results in $OUT (device tool) or gpu_results/
#
# Copy gpu_check.jsonl and kernel_tests.txt into docs/gpu/ and commit them.
set -uo pipefail
cd "$(dirname "$0")/.."
OUTDIR="${OUT:-gpu_results}"
mkdir -p "$OUTDIR"
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python3}"
start=$(date +%s)
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv 2>&1 | tee "$OUTDIR/nvidia_smi.txt"

BUDGET="${GPU_CHECK_SECONDS:-530}"
PARTS="${GPU_CHECK_PARTS:-quant_matmul,quant_sweep,decode_attention,prefill_attention,e2e_decode}"
"$PY" -c "import jax, jaxlib; print('jax', jax.__version__, jax.devices())" 2>&1 | tee "$OUTDIR/versions.txt"

# 1. Kernel tests compiled for the card (tests marked `gpu`), at most 90 s.
if "$PY" -c "import pytest, chex" 2>/dev/null; then
  timeout 90 "$PY" -m pytest -q -m gpu -p no:cacheprovider tests/kernels 2>&1 \
    | tail -30 | tee "$OUTDIR/kernel_tests.txt"
else
  echo "pytest or chex missing on this machine: kernel tests skipped" | tee "$OUTDIR/kernel_tests.txt"
fi

# 2. Measurements, with what is left of the budget (each result is written as it comes).
left=$(( BUDGET - ($(date +%s) - start) ))
PYTHONUNBUFFERED=1 timeout "$left" "$PY" scripts/gpu_check.py --parts "$PARTS" \
  --out "$OUTDIR/gpu_check.jsonl" "$@"
echo "gpu_check finished in $(( $(date +%s) - start )) s (exit $?)"
