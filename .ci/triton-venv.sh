#!/usr/bin/env bash
# The reference Triton Inference Server for tests/e2e/test_triton_reference.py: nvidia-pytriton ships
# Triton's own tritonserver binary (2.51 in PyTriton 0.7.0), which runs on a CPU. PyTriton pins numpy<2,
# so it gets a venv of its own (.venv-triton), apart from the project's .venv.
set -euo pipefail
cd "$(dirname "$0")/.."
source .ci/side-venv.sh

# the binary must be there and runnable, or the venv is not what the tests need
side_venv .venv-triton "python -c 'import pathlib, pytriton
binary = pathlib.Path(pytriton.__file__).parent / \"tritonserver\" / \"bin\" / \"tritonserver\"
assert binary.is_file(), f\"tritonserver binary missing at {binary}\"'" \
  "nvidia-pytriton==0.7.0" \
  "numpy==1.26.4" \
  "tritonclient[grpc,http]==2.73.0"
