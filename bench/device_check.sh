#!/usr/bin/env bash
# One GPU check, one call of the GPU machine (issue 31; docs/gpu.md, "Checking on a GPU", has the exact call).
# From the project root, with the wheels the machine lacks carried in .whl/ (make device-wheels):
#
#     bash bench/device_check.sh            # on the GPU machine: ends by itself within DEADLINE (530) s
#     DRY=1 bash bench/device_check.sh      # the same logic on a CPU at tiny shapes (tests/e2e/test_device_check.py)
#     STEPS=model,convert,zero3,reload DEADLINE=200 bash bench/device_check.sh   # a rerun of what broke
#
# Installs only the carried wheels (pip --no-index: never the network), then runs bench/device_check.py,
# whose steps each have their own time limit. Everything it writes goes to $OUT (default runs/device-check):
# device_check_<cuda|cpu>.json (every step's status, even when one fails), device_check.log, and
# bench/uptrain_throughput.py's JSONs. Scratch (models, checkpoints) goes to $WORK, deleted at the end.
set -uo pipefail
cd "$(dirname "$0")/.."
START=$(date +%s)
DEADLINE=${DEADLINE:-530}
OUT=${OUT:-runs/device-check}
WORK=${WORK:-/tmp/device-check${DRY:+-dry}}
WHEELS=${WHEELS:-.whl}
PY=${PY:-$([ -x .venv/bin/python ] && [ -n "${DRY:-}" ] && echo .venv/bin/python || echo python3)}
DEVICE=$([ -n "${DRY:-}" ] && echo cpu || echo cuda)
mkdir -p "$OUT"
# no process of the check reaches for the network (the GPU machine has none: each try would wait for its timeout)
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PIP_NO_INDEX=1
# the copy on the GPU machine has no .git: make device-wheels records the commit beside the wheels
if [ -z "${DRY:-}" ] && [ -z "${BENCH_GIT_COMMIT:-}" ] && [ -s "$WHEELS/git-commit" ]; then export BENCH_GIT_COMMIT=$(cat "$WHEELS/git-commit"); fi

install=skipped
if [ -z "${DRY:-}" ]; then
    echo "===== install (limit 90 s) =====" >>"$OUT/device_check.log"
    if timeout -k 5 90 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/site "$WHEELS"/*.whl >>"$OUT/device_check.log" 2>&1; then
        install=ok
    else
        install="failed (exit $?; see device_check.log)"
    fi
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
# the copy on the GPU machine is not installed (make venv's pip install -e .): its packages import from here
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
installed=$(( $(date +%s) - START ))

END=$(( START + DEADLINE ))
left=$(( END - 3 - $(date +%s) ))
[ "$left" -ge 10 ] || left=10  # timeout 0 would mean no limit at all
timeout -k 5 "$left" "$PY" bench/device_check.py --out "$OUT" --work "$WORK" \
    --deadline $(( END - 10 )) --install "$install" --install-seconds "$installed" ${DRY:+--dry} ${STEPS:+--steps "$STEPS"}
rc=$?
log="$OUT/device_check.log"  # the device tool brings back files of up to 16 MiB: keep the log's end
if [ -f "$log" ] && [ "$(stat -c %s "$log")" -gt 15000000 ]; then
    tail -c 15000000 "$log" >"$log.tail" && mv "$log.tail" "$log"
fi
if [ ! -s "$OUT/device_check_$DEVICE.json" ]; then  # the driver never got to write: say so in the same place
    printf '{"check": "bench/device_check.sh", "install": "%s", "driver_exit": %d, "steps": {}}\n' \
        "$install" "$rc" >"$OUT/device_check_$DEVICE.json"
fi
exit $rc
