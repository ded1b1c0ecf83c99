#!/usr/bin/env bash
# The GPU check, at most 8 minutes on one H100: CUDA tests, then bench/gpu_check.py (our Trainer vs a plain
# PyTorch loop in the same run, MFU of DiT-B/2 at batch 256, sampling throughput).
#
#   scripts/gpu_check.sh [OUT_DIR]      (default OUT_DIR: gpu_check_out; $OUT when set, as on the lent machine)
#
# Writes OUT_DIR/gpu_check.md (paste it into docs/BENCHMARKS.md), gpu_check.json, pytest_cuda.log and
# summary.txt. Works without hivemind, pyyaml, cryptography, safetensors or pytest: what is missing is
# reported and the parts that need it are skipped.
set -u
cd "$(dirname "$0")/.."
OUT_DIR="${1:-${OUT:-gpu_check_out}}"
mkdir -p "$OUT_DIR"
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && PY=.venv/bin/python
START=$(date +%s)
summary() { echo "$*" | tee -a "$OUT_DIR/summary.txt"; }
: > "$OUT_DIR/summary.txt"

summary "gpu_check: $($PY -c 'import sys, torch; print(sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, "gpus", torch.cuda.device_count())' 2>&1)"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | sed 's/^/gpu: /' | tee -a "$OUT_DIR/summary.txt"

# 1. CUDA tests (<= 150 s). conftest.py needs psutil, so it is skipped; files that cannot be imported here
#    (missing packages) are reported as collection errors and the rest still runs.
if $PY -c "import pytest" 2>/dev/null; then
  timeout 150 $PY -m pytest -m cuda -q -p no:cacheprovider --noconftest --continue-on-collection-errors \
      -o addopts="" tests/test_gpu.py tests/test_trainer.py > "$OUT_DIR/pytest_cuda.log" 2>&1
  summary "pytest -m cuda: exit $? ($(tail -n 1 "$OUT_DIR/pytest_cuda.log"))"
else
  summary "pytest is not installed: running the DDP self-test (NCCL under torchrun) instead of the CUDA tests"
  NPROC=$($PY -c "import torch; print(max(1, min(2, torch.cuda.device_count())))")
  timeout 150 $PY -m torch.distributed.run --standalone --nproc-per-node "$NPROC" -m ddm_node.train.selftest \
      > "$OUT_DIR/pytest_cuda.log" 2>&1
  summary "DDP self-test on $NPROC GPU(s): exit $? ($(grep '^{' "$OUT_DIR/pytest_cuda.log" | tail -n 1 | cut -c1-200))"
fi

# 2. The benchmark, inside what is left of the 8 minutes (minus a margin for writing files).
LEFT=$(( 470 - ($(date +%s) - START) ))
[ "$LEFT" -lt 120 ] && LEFT=120
timeout "$LEFT" $PY bench/gpu_check.py --out "$OUT_DIR" --budget-s $(( LEFT - 100 )) > "$OUT_DIR/bench.log" 2>&1
summary "bench/gpu_check.py: exit $? (log: bench.log)"
[ -f "$OUT_DIR/gpu_check.md" ] && grep -E "^- B/2|^\| (B/2|XL/2) " "$OUT_DIR/gpu_check.md" | tee -a "$OUT_DIR/summary.txt"
summary "total $(( $(date +%s) - START ))s"
