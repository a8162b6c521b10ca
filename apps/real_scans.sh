#!/usr/bin/env bash
# Same-volume propagation on a real scan (Colin27 + AAL, docs/evaluation.md "Real scans"), end to
# end on the CPU: fetch the scan, build the tiny backbone, fine-tune both methods on supervoxels of
# the unlabelled scan (a few CPU minutes each, skipped when their weights exist), then print the
# table: the floors, both methods grounded, and the ablations (no grounding, the model without the
# drawn shape, the drawn shape without the model). Everything lands in artifacts/real_scans/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash apps/fetch_real_data.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1
OUT=artifacts/real_scans
DATA=data/real/colin27
mkdir -p "$OUT"
[ -f models/tiny/sdfsmis.yaml ] || sdfsmis make-tiny models/tiny
train() {  # method iterations
  [ -f "$OUT/$1/$1.safetensors" ] || sdfsmis train --method "$1" --backbone models/tiny \
    --images "$DATA/colin27.nii.gz" --output "$OUT/$1" --iterations "$2" --batch-size 4 --validate-every 100000 \
    > "$OUT/train_$1.log" 2>&1
}
train dpl 600
train sdfsmis 300
variant() {  # name, then sed expressions applied to the tiny preset
  local name=$1; shift
  sed "$@" configs/tiny.yaml > "$OUT/$name.yaml"
}
variant ungrounded -e 's/^  grounding: true/  grounding: false/'
variant model_alone -e 's/^  shape_reach_mm: .*/  shape_reach_mm: 0/'
variant shape_alone -e 's/^  shape_reach_mm: .*/  shape_reach_mm: 0.001/'
evaluate() {  # name, methods, then extra arguments
  local name=$1 methods=$2; shift 2
  rm -rf "${OUT:?}/eval_$name"
  sdfsmis evaluate --data "$DATA" --protocol propagation --folds 1 --backbone models/tiny \
    --checkpoint "$OUT/sdfsmis" --dpl-checkpoint "$OUT/dpl" --method "$methods" --output "$OUT/eval_$name" "$@" \
    > "$OUT/eval_$name.log" 2>&1
  echo "## $name"
  sed -n '/^| Method/,/^$/p' "$OUT/eval_$name/table.md"
}
evaluate grounded nearest-slice,interpolation,sdfsmis,dpl
for name in ungrounded model_alone shape_alone; do
  evaluate "$name" sdfsmis,dpl --config "$OUT/$name.yaml"
done
