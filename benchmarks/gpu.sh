#!/usr/bin/env bash
# The speed table on a GPU machine, in under 8 minutes. Run from the repository root:
#   bash benchmarks/gpu.sh [OUT_DIR]
# Needs jax with a CUDA plugin, numpy, pyarrow, click and pandas in PYTHON's environment (crowdllm
# is used from this checkout through PYTHONPATH; nothing is installed). Runs the DS check (1M and
# 10M items, 50 iterations), then every method on dense panels of 1M and 10M items. Each step has
# its own time limit, so a slow one cannot eat the whole budget; results land in OUT_DIR
# (default ./speed-gpu) as JSON + text.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-${OUT:-speed-gpu}}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ! "$PY" -c 'import jax, sys; sys.exit(0 if jax.default_backend() == "gpu" else 1)'; then
    echo "gpu.sh: jax sees no GPU in $PY; the figures below are for $("$PY" -c 'import jax; print(jax.default_backend())')" >&2
fi
"$PY" -c 'import jax; print("devices:", jax.devices())' | tee "$OUT/devices.txt"
nvidia-smi --query-gpu=name,memory.total --format=csv 2>/dev/null | tee -a "$OUT/devices.txt"
export XLA_PYTHON_CLIENT_PREALLOCATE=false
run() {  # run LIMIT NAME ARGS...
    local limit=$1 name=$2; shift 2
    echo "== $name (limit ${limit}s)"
    timeout "$limit" "$PY" benchmarks/speed.py "$@" --out "$OUT/$name.json" 2>"$OUT/$name.log" \
        | tee "$OUT/$name.txt" || echo "== $name: exit $? (see $OUT/$name.log)"
}
run 75  ds-1m     ds --n 1000000  --crowdkit-n 0 --repeats 5 --reference
run 75  ds-10m    ds --n 10000000 --crowdkit-n 0 --repeats 3
run 120 table-1m  table --sizes 1000000 --kind dense
run 200 table-10m table --sizes 10000000 --kind dense
echo "results in $OUT/"
