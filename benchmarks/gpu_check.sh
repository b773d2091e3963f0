#!/usr/bin/env bash
# The GPU check of refflow, in one command, for a machine with an NVIDIA GPU,
# CuPy (pip install -e ".[gpu]") and PyTorch with CUDA:
#
#     bash benchmarks/gpu_check.sh
#
# 1. the backend tests with the cupy backend required (a missing CuPy or
#    device is then a failure, not a skip): every GPU result held to the CPU's;
# 2. the benchmark: closed-form field and CFM training, CuPy vs NumPy vs PyTorch.
set -euo pipefail
cd "$(dirname "$0")/.."

python - <<'PY'
import refflow.backend as B
print("backends:", B.available_backends())
B.get_namespace("cupy")  # raises, naming what is missing, when the GPU stack is incomplete
PY

echo "== tests/test_backend.py (numpy and cupy) =="
REFFLOW_REQUIRE_CUPY=1 python -m pytest -q -rs tests/test_backend.py

echo "== benchmarks/bench_gpu.py =="
python benchmarks/bench_gpu.py "$@"
