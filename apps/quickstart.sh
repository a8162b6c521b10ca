#!/usr/bin/env bash
# Main job on a fresh machine, offline: set up, build and fine-tune the tiny demo model on
# generated sample volumes (apps/demo_model.sh), and start the MONAI Label server on loopback for
# 3D Slicer (http://127.0.0.1:8000). For OHIF use apps/ohif_stack.sh.
# With real weights: `sdfsmis download models/sd15` and BACKBONE=models/sd15 (GPU advised).
set -euo pipefail
cd "$(dirname "$0")/.."
bash apps/setup.sh
. .venv/bin/activate
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
BACKBONE="${BACKBONE:-models/tiny}"
PORT="${PORT:-8000}"
. apps/demo_model.sh
exec monailabel start_server --app sdfsmis_app --studies studies --host 127.0.0.1 --port "$PORT" \
  --conf backbone "$BACKBONE" --conf model_dir models/app
