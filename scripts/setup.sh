#!/usr/bin/env bash
# Sets up nanollama-jax on a fresh Debian machine in .venv (pip).
#   bash scripts/setup.sh        the package: enough to prepare data, train, sample and export
#   bash scripts/setup.sh test   plus the test extra (torch CPU, transformers, llama-cpp-python, which
#                                compiles llama.cpp, without its AMX kernels), the Go toolchain (apt) for
#                                the Go engine, and Chromium + chromedriver (apt) for the chat page's test
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
if [ -n "$extra" ] && [ "$(uname -m)" = x86_64 ]; then
  # llama-cpp-python compiles llama.cpp with -march=native. On Intel CPUs with AMX (Sapphire Rapids and
  # later) that compiles in llama.cpp's AMX matmul kernels, which repack Q8_0/Q4_0 weights into an extra
  # buffer type and segfault in ggml_backend_amx_mul_mat on some of these machines (machine-dependent,
  # upstream). The GGML_AMX_* CMake options only apply to non-native builds, so the AMX ISA is switched off
  # at the compiler: __AMX_INT8__ stays undefined and the AMX kernels are not built; every other native
  # instruction (AVX-512, VNNI) is kept. Without AMX these flags change nothing.
  export CFLAGS="${CFLAGS:-} -mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
  export CXXFLAGS="${CXXFLAGS:-} -mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
fi
.venv/bin/pip install -q -e ".${extra}"
if [ -n "$extra" ] && .venv/bin/python -c "import llama_cpp, sys; sys.exit(b'AMX_INT8 = 1' not in llama_cpp.llama_print_system_info())"; then
  # an earlier install (or pip's wheel cache) holds a llama.cpp built with the AMX kernels: rebuild it
  echo "setup: rebuilding llama-cpp-python without llama.cpp's AMX kernels (a few minutes)" >&2
  .venv/bin/pip install -q --force-reinstall --no-deps --no-cache-dir "$(grep -o 'llama-cpp-python==[0-9.]*' pyproject.toml)"
fi
