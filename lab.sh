#!/usr/bin/env bash
# Finetune Lab set-up and launch. Usage:
#   ./lab.sh          install everything, then start the app for you alone (local mode:
#                     http://localhost:8501, you are its admin, nobody signs in)
#   ./lab.sh serve    start it for a class: open to the network, everyone signs in (class
#                     accounts, the teacher token printed here, or a school sign-in provider)
#   ./lab.sh test     install everything (plus test tools), then lint and run the whole test suite
#                     (./lab.sh test -m "not slow": the quick subset; any pytest arguments work)
# Re-running is cheap: each step is skipped when already done.
set -euo pipefail
cd "$(dirname "$0")"
MODE="${1:-start}"
PY="${PYTHON:-python3}"
VENV=.venv

apt_install() {   # only what is missing; needs root or sudo
  local missing=()
  for pkg in "$@"; do dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  command -v apt-get >/dev/null || { echo "Please install: ${missing[*]}"; return 0; }
  local sudo=""; [ "$(id -u)" -ne 0 ] && sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}"
}

if ! "$PY" -c 'import venv, ensurepip' 2>/dev/null; then apt_install python3-venv; fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
# shellcheck disable=SC1091
. "$VENV/bin/activate"
stamp="$VENV/.installed-$(cat requirements.txt requirements-offline.txt tests/requirements.txt requirements-cluster.txt | cksum | cut -d' ' -f1)-$MODE"
if [ ! -f "$stamp" ]; then
  python -m pip install -q --upgrade pip
  python -m pip install -q -r requirements.txt
  python -m pip install -q --no-deps -r requirements-offline.txt
  if [ "$MODE" = test ]; then
    python -m pip install -q -r tests/requirements.txt
    python -m pip install -q -r requirements-cluster.txt    # so the Ray integration test runs
    apt_install chromium
  fi
  touch "$stamp"
fi

case "$MODE" in
  start) FINETUNE_LAB_LOCAL=1 exec streamlit run streamlit_app.py --browser.gatherUsageStats false "${@:2}" ;;
  serve) unset FINETUNE_LAB_LOCAL
         python -m core token
         exec streamlit run streamlit_app.py --browser.gatherUsageStats false --server.address 0.0.0.0 "${@:2}" ;;
  test)  python -m ruff check .
         # One process by default: on 2 cores, 2 pytest-xdist workers saved only ~13% and the
         # browser walks' timing checks failed when two ran at once (docs/TESTING.md).
         # FINETUNE_LAB_TEST_WORKERS=N runs N workers, one test file each at a time.
         workers="${FINETUNE_LAB_TEST_WORKERS:-0}"
         xdist=(); [ "$workers" != 0 ] && xdist=(-n "$workers" --dist loadfile)
         exec python -m pytest -q ${xdist[@]+"${xdist[@]}"} "${@:2}" ;;
  *) echo "usage: ./lab.sh [start|serve|test]"; exit 2 ;;
esac
