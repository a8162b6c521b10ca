#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite: `bash apps/test.sh [pytest args]`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash apps/system_packages.sh  # Orthanc + Chromium for the OHIF test (skips with the reason if impossible)
bash apps/setup.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
ruff check lib tests sdfsmis_app apps
python -m pytest -q "$@" tests
