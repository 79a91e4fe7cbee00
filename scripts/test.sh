#!/usr/bin/env bash
# Install the package with its test extras, then run the whole suite (README: "Run the tests").
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q -e ".[test]"
blas=/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0
if [ "$(uname -s)" = Linux ] && [ -e "$blas" ]; then export LD_PRELOAD="$blas${LD_PRELOAD:+:$LD_PRELOAD}"; fi
python3 -m pytest -q --durations=15 "$@"
