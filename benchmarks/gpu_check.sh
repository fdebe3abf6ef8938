#!/usr/bin/env bash
# One-command device check (see benchmarks/gpu_check.py): benchmarks on CUDA, a short experiment=full
# two-stage pipeline through accelerate launch, one table at the end.
#   bash benchmarks/gpu_check.sh                     # on a machine with one GPU (<= 8 min on an H100)
#   bash benchmarks/gpu_check.sh --device cpu --quick  # the dry path, on any machine
# Uses the project's .venv when there is one (make install), else the python on PATH.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
exec "$PY" benchmarks/gpu_check.py "$@"
