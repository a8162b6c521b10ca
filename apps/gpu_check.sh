#!/usr/bin/env bash
# The GPU figures in one run (docs/performance.md "GPU check"), for a CUDA machine, about 8 minutes:
#   1. the full-size path (apps/full_size.sh on the GPU): random weights at the real shapes in the
#      real layout, a few training iterations of each method, `sdfsmis infer` with each;
#   2. the bench of both methods on those weights: ms per query slice in fp32 and bf16, SD-FSMIS
#      also with torch.compile (DPL has no UNet to compile);
#   3. training it/s and peak GPU memory of both methods at batch 1 (the paper's) and 4 (the released
#      code's effective batch, there by gradient accumulation).
# Writes docs/bench/DATE-DEVICE-check.json and .md (a table). Every step has its own time limit;
# a step that fails or runs out of time is recorded as such and the rest still runs.
# Knobs: DEVICE (cuda; cpu checks the script itself), SHAPE (sd15; tiny for a quick dry run),
# OUT (artifacts/gpu_check), STEP_LIMIT (seconds per bench, 150), TRAIN_BATCHES ("1 4").
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || bash apps/setup.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1
DEVICE="${DEVICE:-cuda}"
SHAPE="${SHAPE:-sd15}"
OUT="${OUT:-artifacts/gpu_check}"
STEP_LIMIT="${STEP_LIMIT:-150}"
TRAIN_BATCHES="${TRAIN_BATCHES:-1 4}"  # the paper's batch 1; 4, the released code's effective batch (accumulated)
python -c "import sys, torch; sys.exit(0 if '$DEVICE' != 'cuda' or torch.cuda.is_available() else
  'no CUDA device visible to torch ' + torch.__version__ + ': run this on a GPU machine, or DEVICE=cpu SHAPE=tiny to check the script')"
rm -rf "$OUT" && mkdir -p "$OUT"

DEVICE="$DEVICE" SHAPE="$SHAPE" OUT="$OUT/full_size" bash apps/full_size.sh | tee "$OUT/full_size.log" ||
  echo "the full-size path failed, see $OUT/full_size/"
BACKBONE="$OUT/full_size/$SHAPE"
[ -f "$BACKBONE/manifest.json" ] || sdfsmis make-tiny --shape "$SHAPE" "$BACKBONE"

BENCHES=()
bench() {  # NAME ARGS...: one `sdfsmis bench` on the full-size backbone, its JSON kept as OUT/NAME.json
  local name=$1; shift
  timeout "$STEP_LIMIT" sdfsmis bench --device "$DEVICE" --backbone "$BACKBONE" --supports 3 --warmup 1 \
    --repeats 3 --json "$OUT/$name.json" "$@" > "$OUT/$name.log" 2>&1 ||
    echo "{\"failed\": \"exit $? (124: over ${STEP_LIMIT} s), see $name.log\"}" > "$OUT/$name.json"
  BENCHES+=("$name")
}
for precision in fp32 bf16; do
  bench "sdfsmis_$precision" --precision "$precision" --slices 16 --reference-slices 2
  bench "sdfsmis_${precision}_compile" --precision "$precision" --compile --slices 16 --reference-slices 2
  bench "dpl_$precision" --method dpl --precision "$precision" --slices 16
done
for batch in $TRAIN_BATCHES; do
  bench "sdfsmis_train_b$batch" --train --train-batch-size "$batch" --train-steps 5 --slices 2 --reference-slices 1
  bench "dpl_train_b$batch" --method dpl --train --train-batch-size "$batch" --train-steps 5 --slices 2
done

python - "$OUT" "$DEVICE" "${BENCHES[@]}" <<'PY'
import datetime, json, sys
from pathlib import Path
out, device, names = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
benches = {name: json.loads((out / f"{name}.json").read_text()) for name in names}
full_size = out / "full_size" / "full_size.json"
first = next((b for b in benches.values() if "device" in b), {})
result = {
    "date": datetime.date.today().isoformat(),
    "device": first.get("device", device),
    "full_size": json.loads(full_size.read_text()) if full_size.is_file() else {"failed": "see full_size.log"},
    "benches": benches,
}
stem = f"{result['date']}-{device}-check"
Path("docs/bench", f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")


def ms(seconds):
    return "-" if seconds is None else f"{1000 * seconds:.1f}"


lines = [f"# GPU check, {result['date']}, {result['device']}", "", "| bench | ms per query slice | note |",
         "| --- | ---: | --- |"]
for name, b in benches.items():
    if "failed" in b:
        lines.append(f"| {name} | - | failed: {b['failed']} |")
    elif "train" not in name:
        per_slice = b.get("dpl_s_per_slice", b.get("ours_s_per_slice"))
        note = f"SD-FSMIS on the same inputs {ms(b['sdfsmis_s_per_slice'])} ms" if "dpl_s_per_slice" in b else (
            f"released pipeline {ms(b['reference_s_per_slice'])} ms")
        lines.append(f"| {name} | {ms(per_slice)} | {note} |")
lines += ["", "| training | batch | it/s | peak memory (GB) |", "| --- | ---: | ---: | ---: |"]
for name, b in benches.items():
    if "train" in name and "failed" not in b:
        rate = b.get("dpl_it_per_s", b.get("ours_it_per_s"))
        peak = b.get("dpl_train_peak_memory_gb", b.get("peak_memory_gb"))
        lines.append(f"| {name} | {b['train_batch_size']} | {rate:.3f} | {peak:.2f} ({b['peak_memory_kind']}) |")
lines += ["", "| full-size step | seconds | peak host memory (GB) |", "| --- | ---: | ---: |"]
lines += [f"| {s['step']} | {s['seconds']:.1f} | {s['peak_memory_gb']:.2f} |" for s in result["full_size"].get("steps", [])]
Path("docs/bench", f"{stem}.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
print(f"\nwritten: docs/bench/{stem}.json, docs/bench/{stem}.md")
PY
