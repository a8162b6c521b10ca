#!/usr/bin/env bash
# Set up the project's virtual environment in .venv on a fresh machine (idempotent).
# monailabel 0.8.5 goes in with --no-deps: its declared dependencies pull sam2 and torchvision,
# which break a CPU install and transformers' DINOv2 import (see requirements.txt).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  "${PYTHON:-python3}" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --disable-pip-version-check --upgrade pip
python -m pip install -q --disable-pip-version-check -r requirements.txt
python -m pip install -q --disable-pip-version-check --no-deps monailabel==0.8.5
# tests only (an RTSTRUCT written by another tool); its declared opencv-python needs libGL and its
# 'dataclasses' backport is for Python 3.6: requirements.txt brings opencv-python-headless instead
python -m pip install -q --disable-pip-version-check --no-deps rt-utils==1.2.7
python -m pip install -q --disable-pip-version-check --no-deps -e lib
python -c "import torch, monai, diffusers, transformers, monailabel, sdfsmis; print('environment ready: torch', torch.__version__, '| monailabel', monailabel.__version__)"
