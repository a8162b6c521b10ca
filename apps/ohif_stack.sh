#!/usr/bin/env bash
# The whole OHIF stack on one machine, loopback only, offline:
#   Orthanc + DICOMweb (http://127.0.0.1:8042, storage in .stack/orthanc),
#   generated CT and MR volumes uploaded as DICOM series, with a DICOM SEG support on the first CT,
#   MONAI Label in DICOMweb mode serving OHIF at http://127.0.0.1:8000/ohif/ .
# Bring your own NIfTI: `sdfsmis upload-dicom *.nii.gz --modality MR` while the stack runs.
set -euo pipefail
cd "$(dirname "$0")/.."
bash apps/system_packages.sh
bash apps/setup.sh
. .venv/bin/activate
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
BACKBONE="${BACKBONE:-models/tiny}"
PORT="${PORT:-8000}"
ORTHANC_PORT="${ORTHANC_PORT:-8042}"
STACK="${STACK:-.stack}"
. apps/demo_model.sh
mkdir -p "$STACK"
sdfsmis orthanc "$STACK/orthanc" --http-port "$ORTHANC_PORT" --dicom-port "$((ORTHANC_PORT + 200))" >"$STACK/orthanc.log" 2>&1 &
ORTHANC_PID=$!
trap 'kill $ORTHANC_PID 2>/dev/null' EXIT
DICOMWEB="http://127.0.0.1:$ORTHANC_PORT/dicom-web"
for _ in $(seq 60); do curl -sf "$DICOMWEB/studies" >/dev/null && break; sleep 0.5; done
if [ ! -f "$STACK/uploaded" ]; then
  sdfsmis sample-data "$STACK/ct" --count 3 --with-labels --modality CT
  sdfsmis sample-data "$STACK/mr" --count 2 --seed 10 --modality MR
  sdfsmis upload-dicom "$STACK"/ct/case_00*.nii.gz --url "$DICOMWEB" --modality CT \
    --support-label "$STACK/ct/labels/final/case_000.nii.gz"
  sdfsmis upload-dicom "$STACK"/mr/case_00*.nii.gz --url "$DICOMWEB" --modality MR
  touch "$STACK/uploaded"
fi
export MONAI_LABEL_DICOMWEB_CACHE_PATH="$STACK/cache"
echo "OHIF: http://127.0.0.1:$PORT/ohif/  (MONAI Label panel -> Auto-Segmentation -> sdfsmis)"
monailabel start_server --app sdfsmis_app --studies "$DICOMWEB" --host 127.0.0.1 --port "$PORT" \
  --conf backbone "$BACKBONE" --conf model_dir models/app
