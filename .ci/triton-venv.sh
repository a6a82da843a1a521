#!/usr/bin/env bash
# The reference Triton Inference Server for tests/e2e/test_triton_reference.py: nvidia-pytriton ships
# Triton's own tritonserver binary (2.51 in PyTriton 0.7.0), which runs on a CPU. PyTriton pins numpy<2,
# so it gets a venv of its own (.venv-triton at the repo root), apart from the project's .venv.
# Idempotent: exits at once when .venv-triton already holds exactly these pins (its stamp matches).
# Everything comes from PyPI.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3.11}
VENV=.venv-triton
PINS=(
  "nvidia-pytriton==0.7.0"
  "numpy==1.26.4"
  "tritonclient[grpc,http]==2.73.0"
)
STAMP="$VENV/.installed"
WANT="${PINS[*]}"

if [ -x "$VENV/bin/python" ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ]; then
  exit 0
fi

echo "triton-venv: installing ${WANT} into $VENV"
test -x "$VENV/bin/python" || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/python" -m pip install --quiet "${PINS[@]}"
# The binary must be there and runnable, or the venv is not what the tests need.
"$VENV/bin/python" - <<'PY'
import pathlib, pytriton
binary = pathlib.Path(pytriton.__file__).parent / "tritonserver" / "bin" / "tritonserver"
assert binary.is_file(), f"tritonserver binary missing at {binary}"
PY
echo "$WANT" > "$STAMP"
echo "triton-venv: done"
