#!/usr/bin/env bash
# System tools that the e2e tests (tests/e2e) drive: promtool/prometheus (rules and config checks),
# docker-compose (compose file validation; no engine needed), wrk (load tests), haproxy (the
# rolling update behind a real load balancer) and chromium (the page, in a real browser).
# Also the fonts `make train` renders printed digits and letters from (service/model/printed.py; never
# GNU FreeFont or URW base35, which held-out checks use).
# Idempotent: installs only the packages whose command (or, for fonts, package) is missing.
set -euo pipefail

fonts=(fonts-liberation fonts-liberation2 fonts-noto-core fonts-noto-mono fonts-dejavu-extra fonts-roboto
  fonts-open-sans fonts-lato fonts-cantarell fonts-crosextra-carlito fonts-crosextra-caladea fonts-inconsolata
  fonts-firacode fonts-hack fonts-comic-neue fonts-linuxlibertine fonts-ebgaramond fonts-jetbrains-mono fonts-go
  fonts-sil-gentiumplus fonts-sil-charis fonts-sil-andika fonts-quicksand fonts-oxygen fonts-junicode
  fonts-adf-gillius fonts-adf-accanthis fonts-adf-berenis fonts-adf-baskervald fonts-adf-universalis fonts-cabin
  fonts-league-spartan fonts-comfortaa fonts-dosis fonts-inter fonts-mononoki fonts-anonymous-pro
  fonts-courier-prime fonts-croscore fonts-paratype fonts-stix fonts-yanone-kaffeesatz fonts-humor-sans
  fonts-averia-gwf fonts-averia-sans-gwf fonts-averia-serif-gwf fonts-cmu fonts-ecolier-court fonts-breip
  fonts-isabella fonts-dancingscript fonts-lobster fonts-femkeklaver fonts-kristi fonts-gfs-didot)

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
for font in "${fonts[@]}"; do
  dpkg-query -W -f='${Status}' "$font" 2>/dev/null | grep -q "ok installed" || missing+=("$font")
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
