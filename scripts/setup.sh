#!/usr/bin/env bash
# Sets up nanollama-jax on a fresh Debian machine in .venv (pip).
#   bash scripts/setup.sh        the package: enough to prepare data, train, sample and export
#   bash scripts/setup.sh test   plus the test extra (torch CPU, transformers, llama-cpp-python, which
#                                compiles llama.cpp), the Go toolchain (apt) for the Go engine, and
#                                Chromium + chromedriver (apt) for the chat page's browser test
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
  "") extra="" ;;
  test) extra="[test]" ;;
  *) echo "usage: bash scripts/setup.sh [test]" >&2; exit 2 ;;
esac
if [ -n "$extra" ] && ! { command -v go && command -v chromium && command -v chromedriver; } >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -q >/dev/null && apt-get install -y -q golang-go chromium chromium-driver >/dev/null
  else
    echo "setup: Go or Chromium is missing; run 'sudo apt-get install -y golang-go chromium chromium-driver' first" >&2
    exit 1
  fi
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q -e ".${extra}"
