#!/usr/bin/env bash
# Main job on a fresh machine: set up, build a tiny backbone, generate two volumes, and segment
# the second with the first one's liver annotation as the support.
set -euo pipefail
cd "$(dirname "$0")/.."
bash apps/setup.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1
[ -f models/tiny/sdfsmis.yaml ] || sdfsmis make-tiny models/tiny
python - <<'PY'
from pathlib import Path
from sdfsmis.synthetic import make_studies
make_studies(Path("studies"), 2, with_labels=True)
PY
sdfsmis infer --backbone models/tiny --support-image studies/case_000.nii.gz \
  --support-label studies/labels/final/case_000.nii.gz --image studies/case_001.nii.gz \
  --output studies/case_001_sdfsmis.nii.gz --labels 1
