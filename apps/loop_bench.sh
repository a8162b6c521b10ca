#!/usr/bin/env bash
# The correction loop's server time (docs/performance.md "The correction loop"): on a real scan at
# the size of a chest CT (Colin27 T1 resampled to 512 x 512 x 180, stored as int16), one structure
# drawn on every 8th slice, the first run, the re-run after the worst slice is corrected, and a full
# recompute that the re-run must equal (`sdfsmis bench --loop`), for each method at the tiny and the
# real shapes (random weights in the real layout: `sdfsmis make-tiny --shape sd15`). Two structures:
# the left caudate (AAL 71, 38 of 180 slices) and the head (the scan's head mask, opened so that
# the scalp lets go, filled: 158 slices, a structure across most of the volume as a lung is). Prints a table per run; JSON in OUT.
# Knobs: OUT (artifacts/loop), METHODS ("dpl sdfsmis"), SHAPES ("tiny sd15"), STRUCTURES ("caudate head").
# The real-shape SD-FSMIS runs take about 10 s per query slice on 2 cores (half an hour each).
set -euo pipefail
cd "$(dirname "$0")/.."
bash apps/fetch_real_data.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1
OUT="${OUT:-artifacts/loop}"
METHODS="${METHODS:-dpl sdfsmis}"
SHAPES="${SHAPES:-tiny sd15}"
STRUCTURES="${STRUCTURES:-caudate head}"
mkdir -p "$OUT"
[ -f "$OUT/colin27_512.nii.gz" ] || python - data/real/colin27 "$OUT" <<'PY'
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

source, out = Path(sys.argv[1]), Path(sys.argv[2])
image, atlas = nib.load(source / "colin27.nii.gz"), nib.load(source / "labels/final/colin27.nii.gz")
zoom = [t / s for t, s in zip((512, 512, 180), image.shape)]
affine = image.affine @ np.diag([1 / z for z in zoom] + [1])
data = ndimage.zoom(np.asarray(image.dataobj, dtype=np.float32), zoom, order=1)
nib.save(nib.Nifti1Image(np.round(data).astype(np.int16), affine), out / "colin27_512.nii.gz")
caudate = ndimage.zoom(np.asarray(atlas.dataobj) == 71, zoom, order=0)
nib.save(nib.Nifti1Image(caudate.astype(np.uint8), affine), out / "caudate.nii.gz")
# the head: above background, opened so that the scalp lets go, its largest part, filled slice by slice
head = ndimage.binary_opening(data > 0.25 * data.max(), iterations=6)
parts, _ = ndimage.label(head)
head = parts == np.argmax(np.bincount(parts.ravel())[1:]) + 1
head = np.stack([ndimage.binary_fill_holes(head[..., z]) for z in range(head.shape[2])], axis=-1)
nib.save(nib.Nifti1Image(head.astype(np.uint8), affine), out / "head.nii.gz")
PY
[ -f models/tiny/sdfsmis.yaml ] || sdfsmis make-tiny models/tiny
for shape in $SHAPES; do
  backbone=models/tiny
  if [ "$shape" = sd15 ]; then
    backbone="$OUT/sd15"
    [ -f "$backbone/manifest.json" ] || sdfsmis make-tiny --shape sd15 "$backbone"
  fi
  for structure in $STRUCTURES; do
    for method in $METHODS; do
      sdfsmis bench --loop --method "$method" --backbone "$backbone" --volume "$OUT/colin27_512.nii.gz" \
        --truth "$OUT/$structure.nii.gz" --label-id 1 --every 8 --threads 2 \
        --json "$OUT/$method-$shape-$structure.json" 2> "$OUT/$method-$shape-$structure.log"
    done
  done
done
