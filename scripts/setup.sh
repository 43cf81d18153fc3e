#!/usr/bin/env bash
# Create .venv with everything granite-onnx needs on a CPU machine (exporting, validating, testing).
# torch is pinned to the CPU wheel (torch==2.13.0); other versions pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q torch==2.13.0
python -m pip install -q -e '.[cpu,export,genai,test]'
