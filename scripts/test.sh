#!/usr/bin/env bash
# Install the package with its test extras, then run the whole suite (README: "Run the tests").
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q -e ".[test]"
blas=/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0
if [ "$(uname -s)" = Linux ] && [ -e "$blas" ]; then export LD_PRELOAD="$blas${LD_PRELOAD:+:$LD_PRELOAD}"; fi
# Two test processes (pytest-xdist): much of the suite waits on subprocesses (CLI, server, mlx.launch
# ranks) and single-threaded Python, so a 2-core machine runs it in ~2/3 of the time.
# MLX_DSV4_TEST_WORKERS=0 runs it in this one process.
python3 -m pytest -q -n "${MLX_DSV4_TEST_WORKERS:-2}" --durations=15 "$@"
