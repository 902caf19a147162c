#!/usr/bin/env bash
# Create bench/.venv with the anchor runtimes (onnxruntime, OpenVINO, llama-cpp-python).
# llama-cpp-python compiles llama.cpp (~5 min on 2 cores): do not run it beside a benchmark.
set -euo pipefail
cd "$(dirname "$0")"
python3 -m venv .venv
.venv/bin/pip install --quiet --upgrade pip
.venv/bin/pip install --quiet -r requirements.txt
.venv/bin/python -c "import onnxruntime, openvino; print('anchors:', onnxruntime.__version__, openvino.__version__)"
