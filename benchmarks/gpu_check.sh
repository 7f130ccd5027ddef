#!/usr/bin/env bash
# Everything a lent GPU machine is for, in one call of at most 10 minutes (the device time of a task is
# 15 minutes, the machine's start included): the product's pipeline (gpu_pipeline.sh, 250 s: the smoke
# config end to end, then the phantom benchmark as far as it gets) and the speed and memory benchmarks
# (device.sh, 300 s, without profiles: at most eight files come back). Results in $OUT: gpu_pipeline.{jsonl,
# log,md} and device.{jsonl,log}.
#
#     bash benchmarks/gpu_wheels.sh                                     # here, once
#     device run, carry [".whl"], timeout_s 600: OUT=$OUT bash benchmarks/gpu_check.sh
#
# SMOKE=1 runs both in their CPU forms (the tests run each on its own).
set -uo pipefail
cd "$(dirname "$0")/.."
DEADLINE_S=${PIPELINE_S:-250} bash benchmarks/gpu_pipeline.sh
DEADLINE_S=${DEVICE_S:-300} PROFILE=0 bash benchmarks/device.sh
