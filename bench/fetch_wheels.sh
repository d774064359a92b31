#!/usr/bin/env bash
# Fetch, on a machine that reaches PyPI, the baselines the GPU benchmarks compare against and the
# GPU machine lacks (it has no package registry): pure-Python wheels, saved to .whl/ (git-ignored).
#
#   bash bench/fetch_wheels.sh          # here, before the device calls
#   then name ".whl" in the device call's carry list; bench/gpu_check.sh installs what it finds there.
#
# flash-attn is not fetched: PyPI has only its source, which needs nvcc and an hour to build.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
# Pinned: the versions whose functional APIs fastppo/bench/baselines.py calls (and the `bench` extra pins).
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform any \
    -d .whl liger-kernel==0.8.5 cut-cross-entropy==25.1.1
ls -l .whl
