#!/usr/bin/env bash
# Downloads, on a machine with a package index, the CPython 3.12 manylinux wheels of what the pipeline
# needs and the GPU image lacks (grain, nibabel, ml-collections, surface-distance and their own needs that
# the image lacks: array-record, portpicker, importlib-resources), one version each, into an ignored .whl/. The
# folder travels with the working tree to the GPU machine (64 MiB at most), where gpu_pipeline.sh installs it.
#
#     bash benchmarks/gpu_wheels.sh            # then: see benchmarks/gpu_pipeline.sh
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .gitignore || echo '/.whl/' >> .gitignore
mkdir -p .whl
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
WHEELS=(grain==0.2.18 array-record portpicker importlib-resources nibabel ml-collections surface-distance==0.1)
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${PLATFORMS[@]}" -d .whl "${WHEELS[@]}"
ls -1 .whl
du -sh .whl | awk '{print "size of .whl: " $1 " (the working tree that travels holds at most 64 MiB)"}'
