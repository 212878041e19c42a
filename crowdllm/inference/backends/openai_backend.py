"""The ``openai`` backend: the ``openai`` async client against any OpenAI-compatible base URL.

A vLLM server, a llama.cpp server, or a commercial API. For each base URL the backend keeps one
client and a semaphore (``concurrency`` requests in flight per URL); several URLs for one model
spread the load (each request goes to the URL with the fewest requests in flight), which gives
data parallelism across as many servers as one lists.

Failures that may pass (HTTP 429, 5xx, timeouts, dropped connections, a body that is not the
expected JSON) are retried with exponential backoff and jitter, honouring ``Retry-After``; the
client's own retries are off so that every attempt is seen (and counted) here. Other failures
(400, 401, 404) stop the run with the server's message, with the API key scrubbed out.

When the server is vLLM (its ``/version`` answers), the answer is constrained to the choices
with ``extra_body={"structured_outputs": {"choice": [...]}}`` and the labels' first tokens are
checked with its ``/tokenize`` endpoint; elsewhere the strict parser and re-asking do the work.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
import urllib.error
import urllib.request
from typing import Any, Mapping, Sequence

from .base import BackendError, Completion, Request, TransientError, as_int

__all__ = ["OpenAIBackend", "redact"]


def redact(text: str, secrets: Sequence[str | None]) -> str:
    """``text`` with every secret (API key) replaced by ``***``."""
    for s in secrets:
        if s:
            text = text.replace(s, "***")
    return text


class _Endpoint:
    def __init__(self, base_url: str, api_key: str, timeout_s: float, concurrency: int):
        from openai import AsyncOpenAI

        self.base_url = base_url.rstrip("/")
        self.client = AsyncOpenAI(base_url=self.base_url, api_key=api_key, timeout=timeout_s,
                                  max_retries=0)
        self.sem = asyncio.Semaphore(concurrency)
        self.in_flight = 0

    @property
    def root(self) -> str:
        return self.base_url[:-3] if self.base_url.endswith("/v1") else self.base_url


def _http_json(url: str, payload: dict[str, Any] | None, api_key: str, timeout: float) -> Any:
    """A small GET/POST helper for the vLLM extras (/version, /tokenize); None on any failure."""
    data = None if payload is None else json.dumps(payload).encode()
    req = urllib.request.Request(url, data=data, method="GET" if payload is None else "POST",
                                 headers={"Content-Type": "application/json",
                                          "Authorization": f"Bearer {api_key}"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 (user's URL)
            return json.loads(resp.read().decode("utf-8"))
    except (OSError, ValueError, urllib.error.URLError):
        return None


class OpenAIBackend:
    """Chat completions through the ``openai`` client, on one or several base URLs.

    Args:
        model: the served model name sent in each request.
        base_urls: one or several OpenAI-compatible base URLs (``http://host:port/v1``).
        api_key: the key (from the environment or a key file; never from the panel file).
        concurrency: requests in flight per base URL.
        timeout_s: per-request timeout.
        max_transport_retries: resends of one request after transient failures.
        backoff_s: first backoff delay (doubled each time, with jitter, capped at 30 s).
        constrain: ``"auto"`` (constrain when the server is vLLM), ``True`` or ``False``.
        top_logprobs: candidates asked for the first token (0 = no log-probs).
    """

    name = "openai"

    def __init__(self, model: str, base_urls: Sequence[str], api_key: str | None = None, *,
                 concurrency: int = 8, timeout_s: float = 60.0, max_transport_retries: int = 6,
                 backoff_s: float = 0.5, constrain: bool | str = "auto", top_logprobs: int = 20):
        if not base_urls:
            raise BackendError(f"model {model!r}: no base_url")
        self.model = model
        self.api_key = api_key or "EMPTY"
        self._secret = api_key
        self.base_urls = [u.rstrip("/") for u in base_urls]
        self.concurrency = concurrency
        self.timeout_s = timeout_s
        self.max_transport_retries = max_transport_retries
        self.backoff_s = backoff_s
        self.constrain_opt = constrain
        self.constrains = False
        self.top_logprobs = top_logprobs
        self.is_vllm = False
        self._endpoints: list[_Endpoint] = []

    @property
    def max_in_flight(self) -> int:
        return self.concurrency * len(self.base_urls)

    def _scrub(self, text: str) -> str:
        return redact(text, [self._secret])

    async def start(self, choices_by_format: Mapping[bool, Sequence[str]]) -> bool:
        self._endpoints = [_Endpoint(u, self.api_key, self.timeout_s, self.concurrency)
                           for u in self.base_urls]
        ep = self._endpoints[0]
        version = await asyncio.to_thread(_http_json, ep.root + "/version", None, self.api_key, 10.0)
        self.is_vllm = isinstance(version, dict) and "version" in version
        if self.constrain_opt == "auto":
            self.constrains = self.is_vllm
        else:
            self.constrains = bool(self.constrain_opt)
        if not self.is_vllm:
            return False
        firsts = []
        for choice in choices_by_format[False]:
            out = await asyncio.to_thread(_http_json, ep.root + "/tokenize",
                                          {"model": self.model, "prompt": choice,
                                           "add_special_tokens": False}, self.api_key, 10.0)
            toks = out.get("tokens") if isinstance(out, dict) else None
            if not toks:
                return False  # cannot tell: keep the label names
            firsts.append(toks[0])
        return len(set(firsts)) != len(firsts)

    def _pick(self) -> _Endpoint:
        return min(self._endpoints, key=lambda e: e.in_flight)

    async def complete(self, request: Request) -> Completion:
        from openai import (APIConnectionError, APIResponseValidationError, APIStatusError,
                            APITimeoutError)

        kwargs: dict[str, Any] = {
            "model": self.model, "messages": request.messages,
            "max_tokens": request.max_tokens, "temperature": request.temperature,
        }
        if request.seed is not None:
            kwargs["seed"] = request.seed
        if request.logprobs and self.top_logprobs > 0:
            kwargs["logprobs"] = True
            kwargs["top_logprobs"] = self.top_logprobs
        if self.constrains and request.choices:
            kwargs["extra_body"] = {"structured_outputs": {"choice": list(request.choices)}}
        t0 = time.perf_counter()
        retries = 0
        while True:
            ep = self._pick()
            ep.in_flight += 1
            try:
                async with ep.sem:
                    resp = await ep.client.chat.completions.create(**kwargs)
                return self._completion(resp, time.perf_counter() - t0, retries)
            except APIStatusError as exc:
                status = exc.status_code
                if status == 429 or status >= 500 or status == 408:
                    err: Exception = TransientError(f"HTTP {status}")
                    delay = _retry_after(exc)
                else:
                    raise BackendError(self._scrub(
                        f"{ep.base_url}: model {self.model!r}: HTTP {status}: {exc.message}")) from None
            except (APITimeoutError, APIConnectionError) as exc:
                err, delay = TransientError(type(exc).__name__), None
            except (APIResponseValidationError, ValueError, TransientError) as exc:
                err, delay = TransientError(f"bad response: {type(exc).__name__}"), None
            finally:
                ep.in_flight -= 1
            retries += 1
            if retries > self.max_transport_retries:
                raise TransientError(self._scrub(
                    f"{ep.base_url}: model {self.model!r}: gave up after {retries} tries: {err}"))
            if delay is None:
                delay = min(30.0, self.backoff_s * 2 ** (retries - 1))
            await asyncio.sleep(delay * (0.5 + random.random()))

    def _completion(self, resp: Any, latency: float, retries: int) -> Completion:
        choices = getattr(resp, "choices", None)
        if not choices:
            raise TransientError("response without choices")
        ch = choices[0]
        text = (ch.message.content if ch.message is not None else None) or ""
        usage = getattr(resp, "usage", None)
        first = None
        lp = getattr(ch, "logprobs", None)
        content = getattr(lp, "content", None) if lp is not None else None
        if content:
            tok0 = content[0]
            first = {t.token: float(t.logprob) for t in (tok0.top_logprobs or [])}
            first.setdefault(tok0.token, float(tok0.logprob))
        return Completion(
            text=text, finish_reason=ch.finish_reason,
            prompt_tokens=as_int(getattr(usage, "prompt_tokens", 0)),
            completion_tokens=as_int(getattr(usage, "completion_tokens", 0)),
            first_logprobs=first, endpoint_model=getattr(resp, "model", None) or self.model,
            latency_s=latency, transport_retries=retries)

    async def close(self) -> None:
        for ep in self._endpoints:
            await ep.client.close()
        self._endpoints = []


def _retry_after(exc: Any) -> float | None:
    try:
        value = exc.response.headers.get("retry-after")
        return min(30.0, float(value)) if value is not None else None
    except (AttributeError, TypeError, ValueError):
        return None
