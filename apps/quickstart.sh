#!/usr/bin/env bash
# Main job on a fresh machine, offline: set up, build a tiny backbone (its VAE fitted so that
# masks decode), generate sample volumes, fine-tune on them for a minute (supervoxels only),
# and start the MONAI Label server on loopback for 3D Slicer (http://127.0.0.1:8000).
# With real weights: `sdfsmis download models/sd15` and BACKBONE=models/sd15 (GPU advised).
set -euo pipefail
cd "$(dirname "$0")/.."
bash apps/setup.sh
. .venv/bin/activate
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
BACKBONE="${BACKBONE:-models/tiny}"
PORT="${PORT:-8000}"
if [ "$BACKBONE" = models/tiny ] && [ ! -f models/tiny/sdfsmis.yaml ]; then
  sdfsmis make-tiny models/tiny --fit-vae 200
fi
[ -f studies/case_000.nii.gz ] || sdfsmis sample-data studies --count 4
if [ ! -f models/app/sdfsmis.safetensors ]; then
  sdfsmis train --backbone "$BACKBONE" --images studies --output models/app/train --iterations "${ITERATIONS:-300}" --batch-size 4
  cp models/app/train/sdfsmis.safetensors models/app/sdfsmis.safetensors
fi
exec monailabel start_server --app sdfsmis_app --studies studies --host 127.0.0.1 --port "$PORT" \
  --conf backbone "$BACKBONE" --conf model_dir models/app
