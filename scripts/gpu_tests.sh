#!/usr/bin/env bash
# The GPU checks: tests marked `gpu` (skipped on CPU) and the log-prob benchmark in bf16.
# Usage: bash scripts/gpu_tests.sh [RESULTS_DIR]    (PYTHON=... to choose the interpreter)
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-gpu_results}
py=${PYTHON:-.venv/bin/python}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
"$py" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$out/gpu.txt"
# Only the files with GPU tests: the others import CPU-side extras (math-verify, nemo-run).
PYTHONUNBUFFERED=1 "$py" -m pytest -m gpu -q -p no:cacheprovider \
    tests/test_ops_triton.py tests/test_megatron_model.py tests/test_megatron_actor.py tests/test_e2e_megatron_sync.py tests/test_rollout_colocated.py 2>&1 | tee "$out/gpu_tests.txt"
tests_rc=${PIPESTATUS[0]}
PYTHONUNBUFFERED=1 timeout 240 "$py" benchmarks/logprob.py 2>&1 | tee "$out/logprob_gpu.txt"
bench_rc=${PIPESTATUS[0]}
echo "gpu tests rc=$tests_rc, benchmark rc=$bench_rc"
[ "$tests_rc" = 0 ] && [ "$bench_rc" = 0 ]
