"""Subprocess side of the ``vllm`` backend: one ``vllm.LLM`` engine, JSON lines on stdin/stdout.

Run as a script (``python _vllm_worker.py``) by the interpreter that has vLLM installed; it
imports nothing from crowdllm, so vLLM may live in another virtual environment. vLLM's own
logs go to stderr; the protocol uses the original stdout. The worker exits when its stdin
closes (the parent finished, or died), which frees the model's memory.

Protocol (one JSON object per line):
    -> {"cmd": "init", "model": PATH, "seed": INT, "engine_args": {...}, "chat_template": PATH|null,
        "choices": [LABEL, ...]}
    <- {"ok": true, "served_model": NAME, "first_tokens": [ID, ...], "codes": BOOL}
    -> {"cmd": "generate", "requests": [{"messages", "choices", "max_tokens", "temperature",
        "seed", "logprobs"}, ...]}
    <- {"ok": true, "results": [{"text", "finish_reason", "prompt_tokens", "completion_tokens",
        "first_logprobs", "num_cached_tokens"}, ...]}
    -> {"cmd": "stats"}
    <- {"ok": true, "metrics": {NAME: VALUE, ...}}
    Errors: {"ok": false, "error": MESSAGE}
"""

from __future__ import annotations

import json
import os
import sys
import traceback


def main() -> int:
    proto = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8")
    os.dup2(2, 1)  # anything printed (vLLM's logs) goes to stderr
    llm = None
    template = None

    def reply(obj: dict) -> None:
        proto.write(json.dumps(obj) + "\n")
        proto.flush()

    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            msg = json.loads(line)
            cmd = msg.get("cmd")
            if cmd == "init":
                from vllm import LLM

                args = dict(enable_prefix_caching=True, enforce_eager=True, seed=msg.get("seed", 0),
                            disable_log_stats=False)
                args.update(msg.get("engine_args") or {})
                llm = LLM(model=msg["model"], **args)
                if msg.get("chat_template"):
                    with open(msg["chat_template"], encoding="utf-8") as fh:
                        template = fh.read()
                tok = llm.get_tokenizer()
                firsts = [tok.encode(c, add_special_tokens=False)[0] for c in msg["choices"]]
                reply({"ok": True, "served_model": str(msg.get("served_name") or msg["model"]),
                       "first_tokens": firsts, "codes": len(set(firsts)) != len(firsts)})
            elif cmd == "generate":
                reply({"ok": True, "results": _generate(llm, template, msg["requests"])})
            elif cmd == "stats":
                reply({"ok": True, "metrics": _metrics(llm)})
            else:
                reply({"ok": False, "error": f"unknown command {cmd!r}"})
        except Exception as exc:  # report, keep serving
            traceback.print_exc()
            reply({"ok": False, "error": f"{type(exc).__name__}: {exc}"})
    return 0


def _generate(llm, template, requests: list[dict]) -> list[dict]:
    from vllm import SamplingParams

    try:
        from vllm.sampling_params import StructuredOutputsParams
    except ImportError:  # pragma: no cover - older vLLM
        StructuredOutputsParams = None

    params = []
    for r in requests:
        kw = dict(max_tokens=r["max_tokens"], temperature=r["temperature"], seed=r.get("seed"))
        if r.get("logprobs"):
            kw["logprobs"] = 20
        if r.get("choices") and StructuredOutputsParams is not None:
            kw["structured_outputs"] = StructuredOutputsParams(choice=list(r["choices"]))
        params.append(SamplingParams(**kw))
    outs = llm.chat([r["messages"] for r in requests], params, use_tqdm=False,
                    chat_template=template)
    results = []
    for out in outs:
        o = out.outputs[0]
        first = None
        if o.logprobs:
            first = {}
            for lp in o.logprobs[0].values():
                if lp.decoded_token is not None:
                    first[lp.decoded_token] = max(first.get(lp.decoded_token, -1e30), float(lp.logprob))
        results.append({
            "text": o.text, "finish_reason": o.finish_reason,
            "prompt_tokens": len(out.prompt_token_ids or []),
            "completion_tokens": len(o.token_ids or []),
            "first_logprobs": first,
            "num_cached_tokens": getattr(out, "num_cached_tokens", None),
        })
    return results


def _metrics(llm) -> dict:
    out = {}
    try:
        for m in llm.get_metrics():
            value = getattr(m, "value", None)
            if isinstance(value, (int, float)):
                out[m.name] = value
    except Exception:  # metrics are a nicety
        pass
    return out


if __name__ == "__main__":
    sys.exit(main())
