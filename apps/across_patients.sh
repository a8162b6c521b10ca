#!/usr/bin/env bash
# Across patients on the look-alike data (docs/evaluation.md "Across patients, before and after
# grounding"): the realistic protocol (one support patient per fold, every slice of the query
# volumes) for both methods, before grounding (models trained on whole-slice episodes, no grounding)
# and after (zoomed episodes, grounded inference), with the 3-D drawing ablation and the registration
# baseline, all from models trained in this run. Knobs: PATIENTS (8), FOLDS (2), ITERATIONS (300),
# DPL_ITERATIONS (1500), OUT (artifacts/across_patients). Finished steps are skipped on a re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || bash apps/setup.sh
. .venv/bin/activate
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
OUT="${OUT:-artifacts/across_patients}"
PATIENTS="${PATIENTS:-8}"
FOLDS="${FOLDS:-2}"
ITERATIONS="${ITERATIONS:-300}"
DPL_ITERATIONS="${DPL_ITERATIONS:-1500}"
BACKBONE="$OUT/tiny"
declare -A SUPERVOXELS=([chaos]=2000 [synapse]=5000)
mkdir -p "$OUT/ckpt" "$OUT/results"
[ -f "$BACKBONE/sdfsmis.yaml" ] || sdfsmis make-tiny "$BACKBONE" --fit-vae 200 > "$OUT/tiny.log" 2>&1

config() {  # KIND NAME, then sed expressions applied to the backbone's config
  local kind=$1 name=$2; shift 2
  python - "$BACKBONE/sdfsmis.yaml" "${SUPERVOXELS[$kind]}" <<'PY' | sed "$@" > "$OUT/$name.yaml"
import sys, yaml
config = yaml.safe_load(open(sys.argv[1]))
config["training"]["supervoxel_min_size"] = int(sys.argv[2])
print(yaml.safe_dump(config, sort_keys=False), end="")
PY
}
train() {  # KIND VARIANT METHOD ITERATIONS FOLD
  local out="$OUT/ckpt/$1-$2-$3/fold$5"
  mkdir -p "$(dirname "$out")"
  [ -f "$out/$3.safetensors" ] || sdfsmis train --method "$3" --backbone "$BACKBONE" --config "$OUT/$1-$2.yaml" \
    --images "$OUT/data/$1" --setting 1 --folds "$FOLDS" --fold "$5" --iterations "$4" --batch-size 4 \
    --output "$out" > "$out.log" 2>&1
}
evaluate() {  # KIND NAME MODELS CONFIG METHODS TITLE
  local out="$OUT/results/$1-$2"
  [ -f "$out/results.json" ] || sdfsmis evaluate --data "$OUT/data/$1" --backbone "$BACKBONE" --config "$4" \
    --setting 1 --protocol realistic --folds "$FOLDS" --method "$5" \
    --checkpoint "$OUT/ckpt/$1-$3-sdfsmis/fold{fold}/sdfsmis.safetensors" \
    --dpl-checkpoint "$OUT/ckpt/$1-$3-dpl/fold{fold}/dpl.safetensors" --output "$out" > "$out.log" 2>&1
  echo "## $1: $6"
  sed -n '/^| Method/,/^$/p' "$out/table.md"
}

for kind in chaos synapse; do
  [ -d "$OUT/raw/$kind" ] || sdfsmis sample-raw "$kind" "$OUT/raw/$kind" --patients "$PATIENTS" > /dev/null
  [ -f "$OUT/data/$kind/dataset.json" ] ||
    sdfsmis prepare "$kind" "$OUT/raw/$kind" "$OUT/data/$kind" --supervoxel-min-size "${SUPERVOXELS[$kind]}" > /dev/null
  config "$kind" "$kind-zoomed" -e 's/^  zoom_episodes: .*/  zoom_episodes: true/'
  config "$kind" "$kind-whole" -e 's/^  zoom_episodes: .*/  zoom_episodes: false/' \
    -e 's/^  grounding: .*/  grounding: false/'
  config "$kind" "$kind-no-drawing" -e 's/^  shape_reach_mm: .*/  shape_reach_mm: 0/'
  for ((fold = 0; fold < FOLDS; fold++)); do
    for variant in zoomed whole; do
      train "$kind" "$variant" sdfsmis "$ITERATIONS" "$fold"
      train "$kind" "$variant" dpl "$DPL_ITERATIONS" "$fold"
    done
  done
  evaluate "$kind" before whole "$OUT/$kind-whole.yaml" sdfsmis,dpl "before: whole-slice episodes, ungrounded"
  evaluate "$kind" grounded zoomed "$OUT/$kind-zoomed.yaml" sdfsmis,dpl,registration "grounded (the product)"
  evaluate "$kind" no-drawing zoomed "$OUT/$kind-no-drawing.yaml" sdfsmis,dpl "grounded, without the carried drawing"
done
