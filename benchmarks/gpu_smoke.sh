#!/usr/bin/env bash
# The GPU smoke check (README, "GPU smoke"): the paper profile's heavy steps on synthetic
# CIFAR-size data, one JSON out. Arguments go to benchmarks/gpu_smoke.py (--help lists them).
#
#   bash benchmarks/gpu_smoke.sh                        # here: the venv's python (make venv)
#   PYTHON=python3 WHEELS=.gpu-wheels bash benchmarks/gpu_smoke.sh --out "$OUT"
#                                                       # a GPU machine with its own torch and no network:
#                                                       # first install what it lacks from wheels made by
#                                                       # `make gpu-wheels` and carried there
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || command -v "$PY" >/dev/null || { echo "no python at $PY: run make venv, or set PYTHON" >&2; exit 2; }
if [ -n "${WHEELS:-}" ]; then
  "$PY" -m pip install --quiet --disable-pip-version-check --no-index --find-links "$WHEELS" "$WHEELS"/*.whl
fi
"$PY" -c "import torch; print(f'torch {torch.__version__}, CUDA device: {torch.cuda.get_device_name() if torch.cuda.is_available() else None}')"
PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 exec "$PY" benchmarks/gpu_smoke.py "$@"
