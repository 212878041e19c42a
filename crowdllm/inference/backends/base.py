"""The backend protocol: one chat request in, one completion (text, tokens, log-probs) out.

A backend is anything with ``async complete(request) -> Completion``, ``async start()`` and
``async close()``. The runner keeps many requests in flight; a backend that batches (the
offline vLLM engine) gathers the concurrent requests into batches itself.

Per-class probabilities come from the log-probs of the answer's first token: every candidate
token that is a prefix of a choice adds its probability to that choice,

.. math::

    p(c) \\propto \\sum_{t\\,:\\,\\mathrm{choice}_c \\text{ starts with } t} \\exp \\ell_t ,

renormalised over the choices (with a choice constraint the allowed first tokens are exactly
the label prefixes; without one, the mass on other tokens is dropped). A token that is a prefix
of several choices splits its mass evenly among them.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Protocol, Sequence

__all__ = ["Request", "Completion", "Backend", "BackendError", "TransientError", "label_probs"]


class BackendError(RuntimeError):
    """A request failed for good (bad request, authentication, a model that is not served)."""


class TransientError(RuntimeError):
    """A request failed in a way that may pass (429, 5xx, timeout, cut connection, bad JSON)."""


@dataclasses.dataclass
class Request:
    """One chat request.

    Attributes:
        messages: chat messages (``role``, ``content``).
        choices: the allowed answers, or None for free text.
        max_tokens: completion budget.
        temperature: sampling temperature (0 = greedy).
        seed: sampling seed.
        logprobs: ask for the first token's log-probs (for per-class probabilities).
    """

    messages: list[dict[str, str]]
    choices: list[str] | None
    max_tokens: int = 16
    temperature: float = 0.0
    seed: int | None = None
    logprobs: bool = True


@dataclasses.dataclass
class Completion:
    """One answer as the backend returned it.

    Attributes:
        text: the generated text.
        finish_reason: ``stop``, ``length``, ... as reported.
        prompt_tokens, completion_tokens: the usage the server reported for this call.
        first_logprobs: candidate first tokens -> log-prob, or None.
        endpoint_model: the model name the server says it served.
        latency_s: wall time of the call, retries of transport errors included.
        transport_retries: how many times the call was resent after a transient error.
    """

    text: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    first_logprobs: dict[str, float] | None = None
    endpoint_model: str | None = None
    latency_s: float = 0.0
    transport_retries: int = 0


class Backend(Protocol):
    """What the runner needs from a backend."""

    name: str
    #: True when ``Request.choices`` is enforced by constrained decoding
    constrains: bool

    async def start(self, choices_by_format: Mapping[bool, Sequence[str]]) -> bool:
        """Get ready; return True when the answers must use short codes (labels whose first
        tokens collide for this tokenizer), False to answer with the label names."""

    async def complete(self, request: Request) -> Completion: ...

    async def close(self) -> None: ...


def label_probs(first_logprobs: Mapping[str, float] | None,
                choices: Sequence[str]) -> list[float] | None:
    """Per-choice probabilities from first-token log-probs (see the module docstring).

    Returns None when no candidate token is a prefix of any choice (nothing to go on).
    """
    if not first_logprobs:
        return None
    mass = [0.0] * len(choices)
    for token, lp in first_logprobs.items():
        if token is None or lp is None or not math.isfinite(lp):
            continue
        tok = token.lstrip() if token.strip() else token
        if not tok:
            continue
        hits = [i for i, c in enumerate(choices) if c.startswith(tok)]
        if not hits:
            continue
        share = math.exp(lp) / len(hits)
        for i in hits:
            mass[i] += share
    total = sum(mass)
    if not total > 0 or not math.isfinite(total):
        return None
    return [m / total for m in mass]


def as_int(value: Any) -> int:
    """A usage count from a response field (None -> 0)."""
    try:
        return int(value or 0)
    except (TypeError, ValueError):
        return 0
