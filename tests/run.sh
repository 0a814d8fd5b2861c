#!/usr/bin/env bash
# The test command: makes .venv, installs mlx_tq with its test extras, runs ruff and pytest.
# On Linux it installs Debian's OpenBLAS (MLX's bundled CPU BLAS is ~40x slower) and clang
# (the Metal syntax check) when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(uname -s)" = Linux ]; then
  blas=/usr/lib/$(uname -m)-linux-gnu/openblas-pthread/libopenblas.so.0
  need=()
  [ -e "$blas" ] || need+=(libopenblas0-pthread)
  command -v clang++ >/dev/null || need+=(clang)
  if [ ${#need[@]} -gt 0 ]; then
    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need[@]}"
  fi
  export LD_PRELOAD=$blas
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[test,cpu,demo]"
.venv/bin/ruff check .
.venv/bin/ruff format --check .
status=0
.venv/bin/python -m pytest -q -ra "$@" || status=$?
if [ "$status" -eq 5 ]; then
  echo "pytest collected no tests: the suite is missing" >&2
fi
exit "$status"
