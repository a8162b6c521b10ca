#!/usr/bin/env bash
# Mutation testing of the core modules with mutmut 3: each module is mutated in a scratch copy
# under $OUT and every mutant is run against a small, fast subset of the tests that exercise it
# (only the tests that reach the mutated function run, in a process forked after the imports).
#
#   bash apps/mutation.sh                      # every module below
#   bash apps/mutation.sh volume placement     # some of them
#
# Modules: volume placement inference metrics support. Prints killed/total per module as a table
# and as JSON ($OUT/scores.json); the surviving mutants of a module are listed in
# $OUT/<module>/survivors.txt, one shown with `cd $OUT/<module> && mutmut show NAME`.
# The working tree is only read: mutmut runs in $OUT, on copies of lib/sdfsmis and the app's lib,
# and the tests import those copies, never the editable install (each run prints which sdfsmis).
# Slow on a few cores (minutes to an hour per module), so not part of CI; docs/testing.md has the
# scores and why the remaining survivors do not matter. Knobs: OUT (artifacts/mutation),
# MUTATION_CHILDREN (1: mutants run one at a time), OMP_NUM_THREADS (1), SDFSMIS_PROPERTY_EXAMPLES (6).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
[ -x .venv/bin/python ] || bash apps/setup.sh
. .venv/bin/activate
# SDFSMIS_PROPERTY_EXAMPLES: hypothesis examples per property test (30 in the suite); a surviving
# mutant reruns every test that reaches it, and a broken geometry shows in the first few examples
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" SDFSMIS_PROPERTY_EXAMPLES="${SDFSMIS_PROPERTY_EXAMPLES:-6}"
python -c "import mutmut" 2>/dev/null || python -m pip install -q "mutmut==3.8.1"
OUT="$(realpath -m "${OUT:-artifacts/mutation}")"
CHILDREN="${MUTATION_CHILDREN:-1}"

# module -> the file mutated (in the scratch copy's src/) and the tests run against it
declare -A SOURCE=(
    [volume]=src/sdfsmis/io/volume.py
    [placement]=src/sdfsmis/pipeline/placement.py
    [inference]=src/sdfsmis/pipeline/segmenter.py
    [metrics]=src/sdfsmis/evaluation/metrics.py
    [support]=src/lib/infers/support.py
)
declare -A TESTS=(
    [volume]="tests/test_volume_io.py tests/test_properties.py tests/test_mutants.py"
    [placement]="tests/test_placement.py tests/test_mutants.py"
    [inference]="tests/test_annotation_loop.py tests/test_mutants.py"
    [metrics]="tests/test_evaluation.py::test_class_dice_is_the_mean_of_per_volume_dice_not_pooled
tests/test_evaluation.py::test_surface_distances_are_in_millimetres
tests/test_evaluation.py::test_slice_dice_and_spearman_leave_out_slices_where_both_are_empty
tests/test_mutants.py"
    [support]="tests/test_app_inprocess.py tests/test_mutants.py"
)
MODULES=("$@")
[ ${#MODULES[@]} -gt 0 ] || MODULES=(volume placement inference metrics support)

stage() {
    # $OUT/<module>: src/sdfsmis and src/lib (the app's), tests/, configs/ and a mutmut config.
    # The app folder mutmut works in (mutants/sdfsmis_app) reaches its lib through a link to the
    # mutated copy, so that the in-process app imports the mutant as the tests do.
    local module=$1 dir="$OUT/$1"
    rm -rf "$dir"
    mkdir -p "$dir/src" "$dir/mutants/sdfsmis_app"
    cp -r "$ROOT/lib/sdfsmis" "$dir/src/sdfsmis"
    cp -r "$ROOT/sdfsmis_app/lib" "$dir/src/lib"
    cp -rL "$ROOT/tests" "$ROOT/configs" "$dir/"  # -L: the presets themselves, not the links to them
    cp "$ROOT/sdfsmis_app/main.py" "$dir/mutants/sdfsmis_app/"
    ln -s ../src/lib "$dir/mutants/sdfsmis_app/lib"
    find "$dir" -name __pycache__ -prune -exec rm -rf {} +
    local tests=""
    for t in ${TESTS[$module]}; do
        [ -e "$dir/${t%%::*}" ] && tests+=$'\n    '"$t"  # the subset as this checkout has it
    done
    cat >"$dir/setup.cfg" <<EOF
[mutmut]
source_paths = src
only_mutate = ${SOURCE[$module]}
also_copy = configs
pytest_add_cli_args_test_selection =$tests
pytest_add_cli_args =
    -p
    no:cacheprovider
    -q
timeout_multiplier = 4.0
timeout_constant = 10.0
EOF
}

score() {
    # one JSON line: {"module", "file", "killed", "timeout", "survived", "no_tests", "total", "score"}
    local module=$1
    (cd "$OUT/$module" && mutmut export-cicd-stats >/dev/null && mutmut results >survivors.txt)
    python - "$module" "${SOURCE[$module]}" "$OUT/$module/mutants/mutmut-cicd-stats.json" <<'EOF'
import json
import sys

module, source, path = sys.argv[1:]
s = json.load(open(path))
tested = s["total"] - s["skipped"]
caught = s["killed"] + s["timeout"]
row = {"module": module, "file": source.removeprefix("src/"), **s, "score": round(caught / max(tested, 1), 3)}
print(json.dumps(row))
EOF
}

mkdir -p "$OUT"
: >"$OUT/scores.jsonl"
for module in "${MODULES[@]}"; do
    [ -n "${SOURCE[$module]:-}" ] || { echo "unknown module '$module' (one of: ${!SOURCE[*]})" >&2; exit 2; }
    stage "$module"
    echo "== $module: ${SOURCE[$module]} against:" ${TESTS[$module]}
    (
        cd "$OUT/$module"
        mutmut run --max-children "$CHILDREN" >mutmut.log 2>&1 || { tail -c 3000 mutmut.log; exit 1; }
        # mutmut's own forced-fail run has shown that the tests import the mutated copy; this shows where it is
        PYTHONPATH=mutants/src python -c "import sdfsmis; print('sdfsmis from', sdfsmis.__file__)"
    )
    score "$module" | tee -a "$OUT/scores.jsonl"
done

python - "$OUT" <<'EOF'
import datetime
import json
import sys
from pathlib import Path

out = Path(sys.argv[1])
rows = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
report = {"date": datetime.date.today().isoformat(), "tool": "mutmut 3.8.1", "modules": rows}
(out / "scores.json").write_text(json.dumps(report, indent=2))
print(f"\nmutation scores ({report['date']}; killed includes timeouts; survivors in {out}/<module>/survivors.txt)")
print(f"{'module':<11} {'file':<28} {'killed':>7} {'survived':>8} {'no tests':>8} {'total':>6} {'score':>6}")
for r in rows:
    print(
        f"{r['module']:<11} {r['file']:<28} {r['killed'] + r['timeout']:>7} {r['survived']:>8} "
        f"{r['no_tests']:>8} {r['total']:>6} {r['score']:>6.1%}"
    )
EOF
