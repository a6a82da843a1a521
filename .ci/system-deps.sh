#!/usr/bin/env bash
# System tools that the e2e tests (tests/e2e) drive: promtool/prometheus (rules and config checks),
# docker-compose (compose file validation; no engine needed), wrk (load tests), haproxy (the
# rolling update behind a real load balancer) and chromium (the page, in a real browser).
# Idempotent: installs only the packages whose command is missing, and exits at once when none is.
set -euo pipefail

declare -A package_for=(
  [promtool]=prometheus
  [prometheus]=prometheus
  [docker-compose]=docker-compose
  [wrk]=wrk
  [haproxy]=haproxy
  [chromium]=chromium
)

missing=()
for cmd in "${!package_for[@]}"; do
  command -v "$cmd" >/dev/null 2>&1 || missing+=("${package_for[$cmd]}")
done
[ ${#missing[@]} -eq 0 ] && exit 0

# One package may provide several commands (prometheus -> promtool too): install each once.
mapfile -t packages < <(printf '%s\n' "${missing[@]}" | sort -u)
if [ "$(id -u)" -ne 0 ]; then
  echo "system-deps: need root to install: ${packages[*]}" >&2
  exit 1
fi
echo "system-deps: installing ${packages[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null
for cmd in "${!package_for[@]}"; do
  command -v "$cmd" >/dev/null 2>&1 || { echo "system-deps: $cmd still missing" >&2; exit 1; }
done
echo "system-deps: done"
