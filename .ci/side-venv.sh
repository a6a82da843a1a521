# Sourced by .ci/tools-venv.sh and .ci/triton-venv.sh: a venv of its own at the repo root for tools
# whose pins clash with the project's .venv. Everything comes from PyPI.
#
# side_venv VENV CHECK PIN...: install exactly PIN... into VENV, then run CHECK (a command line, run
# with VENV's bin/ first on PATH) to prove it is what the tests need. Idempotent: returns at once when
# VENV's stamp names exactly these pins.

side_venv() {
  local venv=$1 check=$2
  shift 2
  local stamp="$venv/.installed" want="$*"
  if [ -x "$venv/bin/python" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    return 0
  fi
  echo "$venv: installing $want"
  test -x "$venv/bin/python" || "${PYTHON:-python3.11}" -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --upgrade pip
  "$venv/bin/python" -m pip install --quiet "$@"
  PATH="$PWD/$venv/bin:$PATH" bash -c "$check"
  echo "$want" > "$stamp"
  echo "$venv: done"
}
