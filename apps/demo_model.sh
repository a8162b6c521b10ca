#!/usr/bin/env bash
# The demo model, offline (sourced by quickstart.sh and ohif_stack.sh): a tiny backbone (its VAE
# fitted so that masks decode) fine-tuned for a minute on generated volumes, supervoxels only.
# Skipped for a real backbone (BACKBONE=models/sd15) or when models/app already holds weights.
BACKBONE="${BACKBONE:-models/tiny}"
if [ "$BACKBONE" = models/tiny ] && [ ! -f models/tiny/sdfsmis.yaml ]; then
  sdfsmis make-tiny models/tiny --fit-vae 200
fi
[ -f studies/case_000.nii.gz ] || sdfsmis sample-data studies --count 4
if [ ! -f models/app/sdfsmis.safetensors ]; then
  sdfsmis train --backbone "$BACKBONE" --images studies --output models/app/train --iterations "${ITERATIONS:-300}" --batch-size 4
  cp models/app/train/sdfsmis.safetensors models/app/sdfsmis.safetensors
fi
