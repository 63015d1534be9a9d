#!/usr/bin/env bash
# Sets up everything nanollama-jax needs on a fresh Debian machine: the Go toolchain (apt)
# and a virtual environment in .venv with the package and its test extra (pip).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v go >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -q >/dev/null && apt-get install -y -q golang-go >/dev/null
  else
    echo "setup: the Go toolchain is missing; run 'sudo apt-get install -y golang-go' first" >&2
    exit 1
  fi
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q -e ".[${1:-test}]"
