"""Backends behind one small protocol (:class:`~.base.Backend`): ``openai`` and ``vllm``."""

from .base import Backend, BackendError, Completion, Request, TransientError, label_probs

__all__ = ["Backend", "BackendError", "Completion", "Request", "TransientError", "label_probs"]
