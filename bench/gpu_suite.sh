#!/usr/bin/env bash
# The GPU half of the benchmark suite (the CPU half is `make bench-cpu`): decode speed, memory and
# the largest batch that fits, and bf16 uptraining throughput with MFU, for every layout against
# the source. Models are built from SmolLM2-135M's shape with random weights, so nothing large has
# to reach the GPU machine. Usage: bash bench/gpu_suite.sh [results folder]. About 15-19 minutes on one GPU:
# for the 10-minute calls of the GPU machine this project is lent, bench/device_check.sh is the one-call check.
set -euo pipefail
cd "$(dirname "$0")/.."
RESULTS=${1:-bench/results}
PY=${PY:-python3}
# a checkout that make venv did not install (pip install -e .), as on a GPU machine: its packages import from here
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
mkdir -p "$RESULTS"
$PY bench/decode.py --model random --device cuda --dtype bfloat16 --contexts 1024,4096,16384 \
    --layouts source,sharing_off,fusedkv,fusedkv_fuse_first,fusedkv_compiled_fuse_first,fusedkv_lite,skipv1 \
    --new-tokens 64 --fit-context 4096 --fit-memory-gib 8 --out "$RESULTS/decode_cuda.json"
$PY bench/uptrain_throughput.py --device cuda --layouts source,fusedkv,fusedkv_compiled,fusedkv_lite,skipv1 --micro-batch 16 --seq-len 2048 --steps 10 \
    --out "$RESULTS/uptrain_cuda.json"
$PY bench/e2e_uptrain.py --shape smollm2-1.7b --out "$RESULTS"
