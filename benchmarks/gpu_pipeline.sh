#!/usr/bin/env bash
# The product's own command lines on a GPU machine, within DEADLINE_S seconds (default 470: 8 minutes less
# the start): the smoke config end to end (train.py, evaluate.py, predict.py on two of its cases without
# labels, and a check of the label maps predict.py wrote: one per case, the case's shape and affine, labels
# 0-3), then as much of the phantom benchmark (configs/rediffinet.py:bench, one seed) as the time left
# allows: train.py is stopped like a Ctrl-C when time is up and its last checkpoints stay (a rerun with the
# same WORK resumes it). Each stage runs through benchmarks/stage_run.py: exit status, seconds, peak GPU
# memory (JAX's allocator) and host memory, one JSON line each in $OUT/gpu_pipeline.jsonl; the whole output
# in $OUT/gpu_pipeline.log; the table (benchmarks/summary.py --pipeline) at the end and in
# $OUT/gpu_pipeline.md.
#
#     bash benchmarks/gpu_wheels.sh                          # here, once: the wheels the GPU image lacks
#     OUT=$OUT bash benchmarks/gpu_pipeline.sh               # there, with .whl carried
#
# The GPU machines have jax, flax, optax and orbax but not grain, nibabel, ml-collections or
# surface-distance: with a .whl folder (gpu_wheels.sh) they are installed into /tmp/site first, without an
# index. SMOKE=1 runs the same sequence on a CPU (tests/test_scoring_e2e.py), with the installed packages
# and the smoke config in place of the benchmark, stopped after 2 steps. WORK (default /tmp/gpu_pipeline)
# holds the work directories; PYTHON (default python3) the interpreter.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
out=${OUT:-/tmp}
work=${WORK:-/tmp/gpu_pipeline}
log=$out/gpu_pipeline.jsonl
full=$out/gpu_pipeline.log
deadline=${DEADLINE_S:-470}
py=${PYTHON:-python3}
mkdir -p "$out" "$work"
: > "$log"
: > "$full"
say() { echo "$*" | tee -a "$full"; }

if [[ ${SMOKE:-0} != 1 && -d .whl ]]; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    2>&1 | tee -a "$full" || { say "could not install .whl"; exit 1; }
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
say "$($py --version 2>&1); $($py -c 'import jax, flax; print("jax", jax.__version__, "flax", flax.__version__, jax.devices())' 2>&1)"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee -a "$full" || true

stage() {  # NAME SCRIPT ARGS...: one stage through stage_run.py, stopped when the deadline comes
  local name=$1 left=$((deadline - SECONDS))
  shift
  if ((left < 20)); then
    say "skipped, ${left} s left of ${deadline}: $name"
    echo "{\"bench\": \"pipeline_stage\", \"stage\": \"$name\", \"skipped\": true}" >> "$log"
    return 1
  fi
  say "--- $name: $* (at most ${left} s)"
  timeout -k 30 "$left" "$py" benchmarks/stage_run.py "$name" "$log" -- "$@" 2>&1 | tr '\r' '\n' \
    | { grep -v '%|' || true; } | tee -a "$full" | tail -n 8
}

smoke=$work/smoke
stage train_smoke train.py --config=configs/rediffinet.py:smoke --workdir="$smoke" \
  && stage evaluate_smoke evaluate.py --workdir="$smoke" || say "smoke training or evaluation failed"
rm -rf "$work/cases" "$work/predicted"
mkdir -p "$work/cases"
for c in $(ls "$smoke/data" 2>/dev/null | head -n 2); do  # two of its cases, without their labels
  cp -r "$smoke/data/$c" "$work/cases/" && rm -f "$work/cases/$c/$c-seg.nii.gz"
done
stage predict_smoke predict.py -i "$work/cases" -o "$work/predicted" --workdir="$smoke" \
  && "$py" benchmarks/check_label_maps.py "$work/cases" "$work/predicted" "$log" | tee -a "$full"

if [[ ${SMOKE:-0} == 1 ]]; then
  stage train_bench train.py --config=configs/rediffinet.py:smoke --workdir="$work/bench" --stop_after=2
else
  stage train_bench train.py --config=configs/rediffinet.py:bench --workdir="$work/bench"
fi
say "--- ${SECONDS} s in all"
"$py" benchmarks/summary.py --pipeline "$log" | tee "$out/gpu_pipeline.md" | tee -a "$full"
