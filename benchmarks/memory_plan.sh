#!/usr/bin/env bash
# XLA's memory plan (compiled, never run) of every program in the README's GPU table, on this machine's
# backend with the GPUs' convolutions: the sampler window and the train steps at the paper's size
# (128×192×128, K = 10, S = 10, batch 2), and the float32 Re-DiffiNet step at the paper's batch of 4. A CPU's
# plan is not a GPU's (other fusions, no convolution workspaces; in bfloat16 the CPU's compiler adds float32
# copies of what it convolves) but it needs no GPU and moves with the same changes: about 40 s a program on
# two cores. One JSON line per program to $OUT/memory_plan.jsonl (OUT: /tmp if unset), then the table
# (benchmarks/summary.py --memory). SMOKE=1 runs the same programs at 16³ with tiny widths (the tests).
set -euo pipefail
cd "$(dirname "$0")/.."
# the convolutions as GPUs trace them (rediffinet_jax/models/layers.py, conv_impl), unless set
export REDIFFINET_CONV=${REDIFFINET_CONV:-2d_sum}
out=${OUT:-/tmp}
log=$out/memory_plan.jsonl
: > "$log"
py=${PYTHON:-python3}
if [[ ${SMOKE:-0} == 1 ]]; then
  sampler=(--size 16,16,16 --steps 2 --samples 2 --features 8,8,16,32,64,8)
  train=(--unet_size 16,16,16 --diff_size 16,16,16 --tiny)
else
  sampler=() train=()
fi
plan() { "$py" "$@" --compile_only | tee /dev/stderr | grep '^{' >> "$log"; }
plan benchmarks/sampler.py "${sampler[@]}" --dtype bfloat16
plan benchmarks/sampler.py "${sampler[@]}" --dtype bfloat16 --chunk 2
plan benchmarks/sampler.py "${sampler[@]}" --dtype float32
plan benchmarks/sampler.py "${sampler[@]}" --dtype float32 --chunk 5
plan benchmarks/sampler.py "${sampler[@]}" --dtype float32 --chunk 2
plan benchmarks/train_step.py "${train[@]}" --dtype bfloat16 --stage diffusion
plan benchmarks/train_step.py "${train[@]}" --dtype bfloat16 --stage unet
plan benchmarks/train_step.py "${train[@]}" --dtype float32 --stage diffusion
plan benchmarks/train_step.py "${train[@]}" --dtype float32 --stage diffusion --batch 4
plan benchmarks/train_step.py "${train[@]}" --dtype bfloat16 --remat --stage diffusion
"$py" benchmarks/summary.py --memory "$log"
