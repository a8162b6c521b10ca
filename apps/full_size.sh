#!/usr/bin/env bash
# Every full-size code path once, on this CPU (docs/performance.md "The full-size path"): random
# weights at the real shapes in the real layout (SD v1.5 UNet + VAE, DINOv2-small:
# `sdfsmis make-tiny --shape sd15`), a few training iterations of each method from supervoxels,
# then `sdfsmis infer` with each on a small generated volume. Prints the wall time and peak memory
# of every step (a table, and OUT/full_size.json). Not part of the test suite: about 10 minutes on
# 2 cores, ~17 GB of disk and ~16 GB of memory. Knobs: OUT (artifacts/full_size), ITERATIONS (2),
# DEVICE (cpu; apps/gpu_check.sh runs it with cuda), SHAPE (sd15; tiny checks the script in a minute).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || bash apps/setup.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1
OUT="${OUT:-artifacts/full_size}"
ITERATIONS="${ITERATIONS:-2}"
DEVICE="${DEVICE:-cpu}"
SHAPE="${SHAPE:-sd15}"
rm -rf "$OUT" && mkdir -p "$OUT"
STEPS=()
step() {  # NAME COMMAND...: run it, keep its log, record wall seconds and peak resident memory
  local name=$1; shift
  /usr/bin/time -f "%e %M" -o "$OUT/$name.time" "$@" > "$OUT/$name.log" 2>&1 ||
    { echo "step $name failed, see $OUT/$name.log"; tail -5 "$OUT/$name.log"; exit 1; }
  STEPS+=("$name")
}
step make_backbone sdfsmis make-tiny --shape "$SHAPE" "$OUT/$SHAPE"
step sample_data sdfsmis sample-data "$OUT/studies" --count 2 --with-labels
# The preset with one validation episode: the end-of-training validation runs once per
# episode sampler (at ~13 s per full-size forward on 2 cores, the preset's 16 would take 7 minutes).
python -c 'import sys, yaml; from sdfsmis.settings import PRESET_DIR
preset = yaml.safe_load((PRESET_DIR / f"{sys.argv[2]}.yaml").read_text()); preset["training"]["validation_episodes"] = 1
yaml.safe_dump(preset, open(sys.argv[1], "w"))' "$OUT/validate_once.yaml" "$SHAPE"
for method in dpl sdfsmis; do
  step "train_$method" sdfsmis train --method "$method" --backbone "$OUT/$SHAPE" --images "$OUT/studies" \
    --config "$OUT/validate_once.yaml" --device "$DEVICE" \
    --output "$OUT/train_$method" --iterations "$ITERATIONS" --batch-size 1 --validate-every 100000
  step "infer_$method" sdfsmis infer --method "$method" --backbone "$OUT/$SHAPE" --device "$DEVICE" \
    --checkpoint "$OUT/train_$method" --support-image "$OUT/studies/case_000.nii.gz" \
    --support-label "$OUT/studies/labels/final/case_000.nii.gz" --image "$OUT/studies/case_001.nii.gz" \
    --labels 1 --output "$OUT/infer_$method.nii.gz"
done
python - "$OUT" "$DEVICE" "${STEPS[@]}" <<'PY'
import datetime, json, platform, sys
from pathlib import Path
out, steps = Path(sys.argv[1]), sys.argv[3:]
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.processor())
rows = []
for name in steps:
    seconds, kilobytes = (out / f"{name}.time").read_text().split()[-2:]
    rows.append({"step": name, "seconds": float(seconds), "peak_memory_gb": round(int(kilobytes) / 2**20, 2)})
result = {"date": datetime.date.today().isoformat(), "cpu": cpu, "device": sys.argv[2], "steps": rows}
(out / "full_size.json").write_text(json.dumps(result, indent=2) + "\n")
print(f"full-size path ({sys.argv[2]}), {result['date']}, {cpu}")
print("| step | seconds | peak memory (GB) |\n| --- | ---: | ---: |")
for r in rows:
    print(f"| {r['step']} | {r['seconds']:.1f} | {r['peak_memory_gb']:.2f} |")
PY
