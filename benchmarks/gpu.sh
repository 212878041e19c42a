#!/usr/bin/env bash
# The speed table on a GPU machine, in under 8 minutes. Run from the repository root:
#   bash benchmarks/gpu.sh [OUT_DIR]
# Needs jax with a CUDA plugin, numpy, pyarrow, click and pandas in PYTHON's environment (crowdllm
# is used from this checkout through PYTHONPATH; nothing is installed). Steps: the DS check at
# N1 and N2 items (50 iterations), every EM / VB kernel's iteration at N1, then every method on
# dense panels of N2 and N1 items (N1 = 1,000,000 and N2 = 10,000,000 unless set; e.g.
# `N1=10000 N2=100000 bash benchmarks/gpu.sh` is a dry run on CPU). Each step has its own time
# limit, and each method in the tables its own, so a slow one cannot eat the whole budget; the
# panels are drawn once per size and shared by the table's subprocesses. Results land in OUT_DIR
# (default ./speed-gpu) as JSON + text + the step's log; the tables are printed as they come.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-${OUT:-speed-gpu}}"
N1="${N1:-1000000}"
N2="${N2:-10000000}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ! "$PY" -c 'import jax, sys; sys.exit(0 if jax.default_backend() == "gpu" else 1)'; then
    echo "gpu.sh: jax sees no GPU in $PY; the figures below are for $("$PY" -c 'import jax; print(jax.default_backend())')" >&2
fi
"$PY" -c 'import jax; print("devices:", jax.devices())' | tee "$OUT/devices.txt"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv 2>/dev/null \
    | tee -a "$OUT/devices.txt"
export XLA_PYTHON_CLIENT_PREALLOCATE=false
start=$SECONDS
run() {  # run LIMIT NAME ARGS...
    local limit=$1 name=$2 t0=$SECONDS; shift 2
    echo "== $name (limit ${limit}s)"
    timeout "$limit" "$PY" benchmarks/speed.py "$@" --out "$OUT/$name.json" 2>"$OUT/$name.log" \
        | tee "$OUT/$name.txt" || echo "== $name: exit $? (see $OUT/$name.log)"
    echo "== $name: $((SECONDS - t0)) s"
}
run 50  ds-1m     ds --n "$N1" --crowdkit-n 0 --repeats 5 --reference
run 70  ds-10m    ds --n "$N2" --crowdkit-n 0 --repeats 3
run 190 table-10m table --sizes "$N2" --kind dense --table-repeats 0 --crowdkit-max 0 --timeout 45
run 60  iters-1m  iters --n "$N1" --repeats 3
run 100 table-1m  table --sizes "$N1" --kind dense --table-repeats 1 --crowdkit-max 0 --timeout 25
echo "gpu.sh: $((SECONDS - start)) s in all; results in $OUT/"
