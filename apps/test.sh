#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite: `bash apps/test.sh [pytest args]`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash apps/system_packages.sh  # Orthanc + Chromium for the OHIF test (skips with the reason if impossible)
bash apps/setup.sh
. .venv/bin/activate
# test modules run in parallel worker processes (pytest-xdist, one module per worker at a time),
# at most 2 and never more than the cores; each worker's torch gets its share of the cores
CORES=$(python -c "import os; print(len(os.sched_getaffinity(0)))")
WORKERS="${SDFSMIS_TEST_WORKERS:-$(( CORES < 2 ? 1 : 2 ))}"
SHARE=$(( CORES / WORKERS ))
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(( SHARE < 1 ? 1 : (SHARE > 2 ? 2 : SHARE) ))}"
ruff check lib tests sdfsmis_app apps
python -m pytest -q -n "$WORKERS" --dist loadfile "$@" tests
