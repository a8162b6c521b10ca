#!/usr/bin/env bash
# The demo models, offline (sourced by quickstart.sh and ohif_stack.sh): a tiny backbone (its VAE
# fitted so that masks decode), and both methods fine-tuned on generated volumes from supervoxels
# only, SD-FSMIS for ITERATIONS (300, about a minute on 2 cores) and DPL for DPL_ITERATIONS (600,
# under a minute), published where the app serves them (models/app/sdfsmis.safetensors,
# models/app/dpl.safetensors). The tiny backbone is skipped for a real one (BACKBONE=models/sd15);
# a method whose weights are already in models/app is not trained again.
BACKBONE="${BACKBONE:-models/tiny}"
if [ "$BACKBONE" = models/tiny ] && [ ! -f models/tiny/sdfsmis.yaml ]; then
  sdfsmis make-tiny models/tiny --fit-vae 200
fi
[ -f studies/case_000.nii.gz ] || sdfsmis sample-data studies --count 4
demo_train() {  # METHOD ITERATIONS: train into models/app/train_METHOD, publish METHOD.safetensors
  if [ ! -f "models/app/$1.safetensors" ]; then
    sdfsmis train --method "$1" --backbone "$BACKBONE" --images studies --output "models/app/train_$1" \
      --iterations "$2" --batch-size 4
    cp "models/app/train_$1/$1.safetensors" "models/app/$1.safetensors"
  fi
}
demo_train sdfsmis "${ITERATIONS:-300}"
demo_train dpl "${DPL_ITERATIONS:-600}"
