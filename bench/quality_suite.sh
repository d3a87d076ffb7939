#!/usr/bin/env bash
# Quality per compute on SmolLM2-135M: step-0 perplexity of every layout x init, then the same
# uptraining recipe from each init next to the control arm (10/20/40-step evaluations).
# Runs where it is started: hours on 2 CPU cores, a few minutes on one GPU (the fits
# of calibrated/reconstruct and the uptraining use it). Usage: bash bench/quality_suite.sh [suffix]
# writes bench/results/init_quality<suffix>.json and quality_per_compute<suffix>.json/.png.
set -euo pipefail
cd "$(dirname "$0")/.."
SUFFIX=${1:-}
RESULTS=${RESULTS:-bench/results}
WORK=${WORK:-runs/bench$SUFFIX}
PY=${PY:-python3}
ARMS=${ARMS:-control,fusedkv-copy,fusedkv-calibrated,fusedkv-reconstruct,fusedkv_lite-copy,fusedkv_lite-reconstruct,skipv1-copy,skipv1-calibrated,skipv1-reconstruct,fusedkv-copy-kd,fusedkv-reconstruct-kd}
mkdir -p "$RESULTS"
$PY bench/init_quality.py --workdir "$WORK" --out "$RESULTS/init_quality$SUFFIX.json"
$PY bench/quality_per_compute.py --steps 40 --eval-every 10 --workdir "$WORK" --arms "$ARMS" \
    --out "$RESULTS/quality_per_compute$SUFFIX.json"
