#!/usr/bin/env bash
# The GPU check: sampler and train steps at the paper's size (128×192×128, K = 10, S = 10, batch 2),
# float32 and bfloat16, with only the packages the GPU machines already have (jax, flax, optax, orbax).
# Budget: under 8 minutes on an H100. Writes every JSON line to $OUT/device.jsonl when OUT is set.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.92
log=${OUT:-/tmp}/device.jsonl
: > "$log"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
run() {  # one benchmark, at most 170 s; table lines to the terminal, JSON lines to $log
  timeout 170 python "$@" > /tmp/device.out 2>&1
  grep -v '^{' /tmp/device.out | tail -n 20
  grep '^{' /tmp/device.out >> "$log"
}
run benchmarks/sampler.py --dtype bfloat16 --repeats 3
# float32 activations of 10 samples at full resolution are 8 GiB each: two chunks of 5 keep it on an H100
run benchmarks/sampler.py --dtype float32 --chunk 5 --repeats 3
run benchmarks/train_step.py --dtype bfloat16 --repeats 3
run benchmarks/train_step.py --dtype bfloat16 --remat --stage diffusion --repeats 3
run benchmarks/train_step.py --dtype float32 --stage diffusion --repeats 3
echo "--- JSON lines in $log"
cat "$log"
