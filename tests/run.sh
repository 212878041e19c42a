#!/usr/bin/env bash
# The whole test suite, from a clean checkout: installs what the tests need, then runs pytest.
# README's second set-up command and .ci/run both call exactly this script.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q -e '.[dev]'
# --- test-only services and tools (each block installs what one group of tests needs) ---
python -m pytest -q "$@"
