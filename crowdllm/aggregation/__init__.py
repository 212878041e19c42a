"""Truth-inference algorithms as jitted JAX kernels, each with a crowd-kit-style class shell.

Every method is one file: a pure core (``init`` / ``step`` / ``fit`` returning a NamedTuple)
and a class (``fit``, ``fit_predict``, ``fit_predict_proba``, trailing-underscore attributes).
:data:`METHODS` maps the CLI names to the classes; :func:`get_method` builds one by name.
"""

from __future__ import annotations

from typing import Any

from ._core import shared_shapes
from .base import Aggregator, ConvergenceWarning
from .dawid_skene import DawidSkene
from .majority_vote import MajorityVote
from .one_coin import OneCoinDawidSkene
from .wawa import Wawa
from .zero_based_skill import ZeroBasedSkill
from .glad import GLAD
from .mace import MACE
from .mmsr import MMSR
from .kos import KOS
from .bwa import BWA
from .ibcc import IBCC
from .ebcc import EBCC
from .numpyro_models import BayesianDawidSkene

METHODS: dict[str, type[Aggregator]] = {
    cls.name: cls
    for cls in (MajorityVote, Wawa, ZeroBasedSkill, DawidSkene, OneCoinDawidSkene,
                GLAD, MACE, MMSR, KOS, BWA, IBCC, EBCC, BayesianDawidSkene)
}


from ..inference.judge import LLMJudge  # noqa: E402  (an LLM as aggregator, through a backend)

METHODS[LLMJudge.name] = LLMJudge


def register(cls: type[Aggregator]) -> type[Aggregator]:
    """Add an aggregator class to :data:`METHODS` under ``cls.name``."""
    METHODS[cls.name] = cls
    return cls


def _method_class(name: str) -> type[Aggregator]:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(METHODS)}") from None


def get_method(name: str, explicit: Any = None, **params: Any) -> Aggregator:
    """Build the aggregator called ``name``, passing only the parameters it accepts.

    ``seed``, ``max_iter`` and ``tol`` are common CLI options; a method that has no such
    parameter ignores them (``None`` values are ignored too). ``explicit`` (a mapping) holds
    parameters the user named: each must exist (:func:`check_params`), ``None`` included, and
    they win over ``params``.
    """
    cls = _method_class(name)
    accepted = cls.parameters()
    kwargs = {k: v for k, v in params.items() if v is not None and k in accepted}
    if explicit:
        check_params(name, explicit)
        kwargs.update(explicit)
    return cls(**kwargs)


def check_params(name: str, params: Any) -> None:
    """Raise ``ValueError`` naming every key of ``params`` that method ``name`` does not take
    (``get_method`` ignores those silently, which suits the CLI's common options but would hide
    a typo in a parameter the user named)."""
    cls = _method_class(name)
    unknown = sorted(set(params) - set(cls.parameters()))
    if unknown:
        raise ValueError(f"method {name!r} has no parameter {', '.join(map(repr, unknown))}; "
                         f"its parameters: {', '.join(cls.parameters())}")


__all__ = ["Aggregator", "ConvergenceWarning", "shared_shapes", "METHODS", "get_method", "check_params", "register",
           "MajorityVote", "Wawa", "ZeroBasedSkill", "DawidSkene", "OneCoinDawidSkene",
           "GLAD", "MACE", "MMSR", "KOS"]
