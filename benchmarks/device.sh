#!/usr/bin/env bash
# The GPU check: sampler and train steps at the paper's size (128×192×128, K = 10, S = 10, batch 2; the float32
# Re-DiffiNet step also at the paper's batch of 4), bfloat16 and float32, with only the packages the GPU
# machines already have (jax, flax, optax, orbax);
# last, if time is left, each finest-level layer alone in bfloat16 (benchmarks/layers.py). The bfloat16
# sampler and train steps are also profiled once each (benchmarks/hlo_profile.py: PREFIX.trace.json.gz and
# PREFIX.hlo.txt.gz in $OUT, the tables in device.log, the Re-DiffiNet step's by source printed).
# The whole script ends within DEADLINE_S seconds (default 470: the issue's 8 minutes): each benchmark
# gets at most 170 s of what is left, the two that carry the targets run first, and one that no longer
# fits is skipped and named. Ends with markdown tables (benchmarks/summary.py) and the targets.
# Every JSON line goes to $OUT/device.jsonl and the whole output to $OUT/device.log (OUT: /tmp if unset).
# PROFILE=0 leaves the profiles out (six files fewer in $OUT: gpu_check.sh, which brings back at most eight).
# SMOKE=1 runs the same sequence at 16³ with tiny widths, for a CPU (tests/test_benchmarks.py).
# PYTHON (default python3: the GPU machines' jax lives in their python3, and a bare python may not exist).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.92
out=${OUT:-/tmp}
log=$out/device.jsonl
full=$out/device.log
: > "$log"
: > "$full"
deadline=${DEADLINE_S:-470}
py=${PYTHON:-python3}
echo "$($py --version 2>&1) at $(command -v "$py")" | tee -a "$full"
$py -c 'import jax, flax, optax, orbax.checkpoint as o; print("jax", jax.__version__, "flax", flax.__version__, "optax", optax.__version__, "orbax", o.__version__, jax.devices())' 2>&1 | tee -a "$full"
if [[ ${SMOKE:-0} == 1 ]]; then
  sampler=(--size 16,16,16 --steps 2 --samples 2 --features 8,8,16,32,64,8)
  train=(--unet_size 16,16,16 --diff_size 16,16,16 --tiny)
  layer=(--size 16,16,16 --width 8)
  repeats=1 chunk=1
else
  sampler=() train=() layer=() repeats=5
  # float32 activations of 10 samples at full resolution are 8 GiB each and a 2d convolution makes three
  # times its output: in chunks of 5 the sampler used 86.6 GiB on an H200, more than an H100 has; in
  # chunks of 2, 48.0 GiB at the same speed (2.255 s against 2.278 s)
  chunk=2
fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>&1 | tee -a "$full" || true

run() {  # one benchmark in its own process; table lines to the terminal, JSON lines to $log
  local left=$((deadline - SECONDS))
  if ((left < 30)); then
    echo "skipped, ${left} s left of ${deadline}: $*" | tee -a "$full"
    return
  fi
  ((left > 170)) && left=170
  echo "--- $* (at most ${left} s)" | tee -a "$full"
  timeout "$left" "$py" "$@" --repeats "$repeats" > "$out/last.out" 2>&1
  local rc=$?
  cat "$out/last.out" >> "$full"
  grep -v '^{' "$out/last.out" | tail -n 12
  grep '^{' "$out/last.out" >> "$log"
  ((rc == 0)) || echo "exit status $rc: $*" | tee -a "$full"
}

sprof=() tprof=()
[[ ${PROFILE:-1} == 1 ]] && sprof=(--profile "$out/sampler") tprof=(--profile "$out/step")
run benchmarks/sampler.py "${sampler[@]}" --dtype bfloat16 "${sprof[@]}"
run benchmarks/train_step.py "${train[@]}" --dtype bfloat16 --stage diffusion "${tprof[@]}"
run benchmarks/train_step.py "${train[@]}" --dtype bfloat16 --stage unet "${tprof[@]}"
run benchmarks/sampler.py "${sampler[@]}" --dtype float32 --chunk "$chunk"
run benchmarks/train_step.py "${train[@]}" --dtype float32 --stage diffusion
run benchmarks/train_step.py "${train[@]}" --dtype float32 --stage diffusion --batch 4
run benchmarks/train_step.py "${train[@]}" --dtype bfloat16 --remat --stage diffusion
run benchmarks/layers.py "${layer[@]}" --dtype bfloat16
rm -f "$out/last.out"
echo "--- ${SECONDS} s in all" | tee -a "$full"
# where the bfloat16 runs spent their device time: the train step's summary here, all of them in the log
for prefix in "$out"/step-rediffinet-bfloat16 "$out"/step-unet-bfloat16 "$out"/sampler-bfloat16; do
  [[ -f $prefix.trace.json.gz ]] || continue
  "$py" benchmarks/hlo_profile.py "$prefix" --top 30 >> "$full" 2>&1
done
[[ -f $out/step-rediffinet-bfloat16.trace.json.gz ]] && "$py" benchmarks/hlo_profile.py "$out/step-rediffinet-bfloat16" --top 10 --by_source
"$py" benchmarks/summary.py "$log" | tee -a "$full"
