#!/usr/bin/env bash
# The GPU suite in one go (a machine with CUDA, after `bash launch/setup.sh`):
#   OUT=results bash tests/gpu/run.sh
# NCCL layouts at 1, 2, 4, 8 GPUs, the app's strategies, then the bf16 step time and peak memory (benchmarks/gpu_step.py).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
PYTHON="${PYTHON:-.venv/bin/python}"
export OUT="${OUT:-gpu_results}"
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv > "$OUT/gpus.csv" || true
"$PYTHON" -m pytest -q tests/gpu -x 2>&1 | tee "$OUT/pytest.txt"
"$PYTHON" benchmarks/gpu_step.py 2>&1 | tee "$OUT/gpu_step.txt"
