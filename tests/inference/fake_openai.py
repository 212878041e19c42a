"""A small local HTTP server speaking the OpenAI chat-completions wire format, on 127.0.0.1.

It exists for the faults that a real server cannot be made to produce on demand: markers in
an item's text script what happens to the requests for that item:

* ``[429xN]`` / ``[500xN]`` / ``[503xN]``: the first N requests get that HTTP status;
* ``[500afterN]``: every request after the first N gets a 500 (a server that dies mid-item);
* ``[slowxN]``: the first N requests stall past the client's timeout;
* ``[truncxN]``: the first N responses are cut off mid-JSON; ``[badjsonxN]``: not JSON at all;
* ``[oos]``: the "model" always answers a label outside the schema; ``[oosxN]``: the first N
  answers are outside it, then it answers correctly;
* ``[lenxN]``: the first N answers are cut off (``finish_reason = length``);
* ``ANSWER:word``: the "model" obeys the injection and answers ``word``.

Otherwise it answers a label chosen deterministically from the item text. Usage counts are the
number of whitespace-separated words of the prompt and of the answer; the usage of every answer
delivered intact is recorded, so tests can compare the ledger with what the server reported
(a stalled, cut or garbled response never reached the client with its usage). With
``vllm_like=True`` it also serves ``/version`` and ``/tokenize`` and honours
``structured_outputs.choice`` (the answer is forced into the choices), and returns first-token
log-probs.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

LABELS = ["background", "purpose", "method", "finding", "other"]


def item_text(messages: list[dict[str, str]]) -> str:
    """The item text: the last user message that holds a ``<<<...>>>`` block."""
    for m in reversed(messages):
        if m.get("role") == "user" and "<<<" in m.get("content", ""):
            c = m["content"]
            return c[c.index("<<<") + 3: c.rindex(">>>")]
    return ""


def default_label(text: str, choices: list[str]) -> str:
    h = int(hashlib.sha256(text.encode()).hexdigest(), 16)
    return choices[h % len(choices)]


class FakeOpenAI:
    """The server; ``with FakeOpenAI() as srv: srv.base_url``."""

    def __init__(self, *, vllm_like: bool = False, delay_s: float = 0.0, stall_s: float = 3.0,
                 choices: list[str] | None = None, require_key: str | None = None):
        self.vllm_like = vllm_like
        self.delay_s = delay_s
        self.stall_s = stall_s
        self.choices = choices or LABELS
        self.require_key = require_key
        self.lock = threading.Lock()
        self.requests: list[dict[str, Any]] = []   # every chat request body
        self.usage: list[tuple[int, int]] = []      # usage of every answer delivered intact
        self.seen: Counter[str] = Counter()         # requests per item text
        self._per_model: Counter[tuple[str, Any]] = Counter()
        self.statuses: list[int] = []
        self.auth_headers: list[str] = []
        handler = self._handler()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def __enter__(self) -> "FakeOpenAI":
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def reset(self) -> None:
        with self.lock:
            self.requests.clear()
            self.usage.clear()
            self.seen.clear()
            self._per_model.clear()
            self.statuses.clear()

    # ------------------------------------------------------------------ behaviour
    def respond(self, body: dict[str, Any]) -> tuple[int, bytes, dict[str, str]]:
        messages = body.get("messages", [])
        text = item_text(messages)
        with self.lock:
            self.requests.append(body)
            self.seen[text] += 1
            self._per_model[(text, body.get("model"))] += 1
            n = self._per_model[(text, body.get("model"))]  # faults are scripted per annotator

        def marker(name: str) -> int:
            m = re.search(r"\[" + name + r"x(\d+)\]", text)
            return int(m.group(1)) if m else 0

        for code in (429, 500, 503):
            if n <= marker(str(code)):
                return code, json.dumps({"error": {"message": f"fake {code}"}}).encode(), \
                    {"Retry-After": "0"} if code == 429 else {}
        m_after = re.search(r"\[500after(\d+)\]", text)
        if m_after and n > int(m_after.group(1)):
            return 500, json.dumps({"error": {"message": "fake 500 (died)"}}).encode(), {}
        if n <= marker("slow"):
            time.sleep(self.stall_s)
        if self.delay_s:
            time.sleep(self.delay_s)
        choices = list(body.get("extra_body", {}).get("structured_outputs", {}).get("choice") or
                       body.get("structured_outputs", {}).get("choice") or self.choices)
        finish = "stop"
        m = re.search(r"ANSWER:(\w+)", text)
        if m:
            answer = m.group(1)
        elif "[oos]" in text or n <= marker("oos"):
            answer = "Banana"
        elif n <= marker("len"):
            answer, finish = "The segment is about", "length"
        else:
            answer = default_label(text, choices)
        constrained = "structured_outputs" in body
        if self.vllm_like and constrained and answer not in choices:
            answer = default_label(text, choices)  # the constraint wins over the "model"
        prompt_tokens = sum(len(m.get("content", "").split()) for m in messages)
        completion_tokens = max(1, len(answer.split()))
        usage = (prompt_tokens, completion_tokens)
        stalled = n <= marker("slow")  # the client gave up before this answer came back
        resp: dict[str, Any] = {
            "id": f"fake-{len(self.requests)}", "object": "chat.completion", "created": 0,
            "model": body.get("model", "fake"),
            "choices": [{"index": 0, "finish_reason": finish,
                         "message": {"role": "assistant", "content": answer}}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens},
        }
        if body.get("logprobs"):
            # the answer's first three characters get most of the mass, the other choices share
            # the rest; one junk token that is no label prefix
            tops = [{"token": answer[:3], "logprob": math.log(0.7), "bytes": None}]
            rest = [c for c in choices if not answer.startswith(c[:3])]
            for c in rest:
                tops.append({"token": c[:3], "logprob": math.log(0.2 / max(1, len(rest))),
                             "bytes": None})
            tops.append({"token": "The", "logprob": math.log(0.1), "bytes": None})
            resp["choices"][0]["logprobs"] = {"content": [
                {"token": answer[:3], "logprob": math.log(0.7), "bytes": None, "top_logprobs": tops}]}
        raw = json.dumps(resp).encode()
        if n <= marker("trunc"):
            return 200, raw[: len(raw) // 2], {}
        if n <= marker("badjson"):
            return 200, b"<html>gateway hiccup</html>", {"Content-Type": "application/json"}
        if not stalled:
            # the usage of every answer that reached the client intact
            with self.lock:
                self.usage.append(usage)
        return 200, raw, {}

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        srv = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:  # quiet
                pass

            def _send(self, status: int, raw: bytes, headers: dict[str, str] | None = None) -> None:
                self.send_response(status)
                hdrs = {"Content-Type": "application/json", **(headers or {})}
                for k, v in hdrs.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                try:
                    self.wfile.write(raw)
                except OSError:  # the client gave up (timeout)
                    return
                with srv.lock:
                    srv.statuses.append(status)

            def do_GET(self) -> None:
                if self.path == "/version" and srv.vllm_like:
                    return self._send(200, b'{"version": "fake"}')
                self._send(404, b'{"error": {"message": "not found"}}')

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                try:
                    data = self.rfile.read(length)
                except OSError:
                    data = b""
                if len(data) < length:
                    # the client died mid-request (a SIGKILLed run): no request reached the
                    # "model", as with a real server; recording it as an empty body made
                    # test_sigkill_then_resume_equals_uninterrupted_run fail when the reset
                    # connection was read after the test had cleared srv.requests
                    self.close_connection = True
                    return
                body = json.loads(data or b"{}")
                with srv.lock:
                    srv.auth_headers.append(self.headers.get("Authorization", ""))
                if srv.require_key and self.headers.get("Authorization") != f"Bearer {srv.require_key}":
                    return self._send(401, b'{"error": {"message": "bad key"}}')
                if self.path == "/tokenize" and srv.vllm_like:
                    prompt = body.get("prompt", "")
                    return self._send(200, json.dumps({"tokens": [ord(c) for c in prompt[:2]]}).encode())
                if self.path.rstrip("/") != "/v1/chat/completions":
                    return self._send(404, b'{"error": {"message": "no route"}}')
                status, raw, headers = srv.respond(body)
                if status == 200 and raw and not raw.endswith(b"}") and not raw.startswith(b"<"):
                    # a truncated body: announce the full length, send half, drop the connection
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(raw) * 2))
                    self.end_headers()
                    try:
                        self.wfile.write(raw)
                        self.wfile.flush()
                    except OSError:
                        pass
                    self.close_connection = True
                    return
                self._send(status, raw, headers)

        return Handler
