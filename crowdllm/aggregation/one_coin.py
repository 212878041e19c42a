r"""One-coin Dawid-Skene: one accuracy per annotator, errors spread evenly.

Each annotator answers correctly with probability :math:`s_w` and otherwise picks one of the
other :math:`K-1` classes uniformly:

.. math::
    \pi^{(w)}_{kl} = s_w [k = l] + \frac{1 - s_w}{K - 1} [k \neq l].

EM: the E-step is Dawid-Skene's with these confusion matrices; the M-step sets
:math:`s_w = (\alpha + \sum_{(t,w,l)} q_t(l)) / (2\alpha + n_w)` (a Beta(:math:`\alpha+1,
\alpha+1`) MAP estimate; :math:`\alpha = 0` is crowd-kit's ``OneCoinDawidSkene``), clipped to
:math:`[10^{-10}, 1 - 10^{-10}]`.

References:
    A. P. Dawid and A. M. Skene, 1979 (the one-coin special case); crowd-kit's
    ``OneCoinDawidSkene``.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pyarrow as pa

from ..labels import LabelTensor
from ._core import (TINY, CrowdData, iterate, normalize, prepare, vote_posteriors,
                    worker_agreement, worker_count)
from . import _native
from .base import Aggregator
from .dawid_skene import _n_answers, e_step

__all__ = ["OneCoinDawidSkene", "OneCoinState", "OneCoinResult", "init", "step", "fit"]


class OneCoinState(NamedTuple):
    log_prior: jax.Array  # [K]
    skills: jax.Array  # [workers]
    posteriors: jax.Array  # [tasks, K]


class OneCoinResult(NamedTuple):
    posteriors: jax.Array
    priors: jax.Array
    skills: jax.Array
    objective: jax.Array
    history: jax.Array
    n_iter: jax.Array
    converged: jax.Array


def log_confusion(skills: jax.Array, n_classes: int) -> jax.Array:
    """``[workers, K, K]`` log confusion matrices of the one-coin model."""
    s = jnp.clip(skills, TINY, 1 - TINY)
    off = jnp.log((1 - s) / max(n_classes - 1, 1))
    eye = jnp.eye(n_classes, dtype=bool)
    return jnp.where(eye[None], jnp.log(s)[:, None, None], off[:, None, None])


def m_step(data: CrowdData, post: jax.Array, smoothing: float) -> tuple[jax.Array, jax.Array]:
    post = post * data.task_mask[:, None]
    hits = worker_agreement(data, post)
    n = worker_count(data, post.dtype)
    skills = jnp.where(n + 2 * smoothing > 0, (hits + smoothing) / jnp.maximum(n + 2 * smoothing, TINY), 0.5)
    skills = jnp.clip(skills, TINY, 1 - TINY)
    prior = jnp.maximum(normalize(post.sum(axis=0) + smoothing), TINY)
    return jnp.log(prior), skills


def init(data: CrowdData, *, smoothing: float) -> OneCoinState:
    dtype = data.task_mask.dtype
    post = vote_posteriors(data, dtype)
    log_prior, skills = m_step(data, post, smoothing)
    return OneCoinState(log_prior=log_prior, skills=skills, posteriors=post)


def step(data: CrowdData, state: OneCoinState, *, smoothing: float) -> tuple[OneCoinState, jax.Array]:
    log_conf = log_confusion(state.skills, data.n_classes)
    post, ll = e_step(data, state.log_prior, log_conf)
    s = state.skills
    prior_term = smoothing * ((jnp.log(s) + jnp.log1p(-s)) * data.worker_mask).sum() + smoothing * state.log_prior.sum()
    objective = (ll + prior_term) / _n_answers(data)
    log_prior, skills = m_step(data, post, smoothing)
    return OneCoinState(log_prior=log_prior, skills=skills, posteriors=post), objective


@functools.partial(jax.jit, static_argnames=("max_iter",))
def fit(data: CrowdData, *, max_iter: int = 100, tol: float = 1e-5,
        smoothing: float = 0.01) -> OneCoinResult:
    state = init(data, smoothing=smoothing)
    state, loop = iterate(functools.partial(step, data, smoothing=smoothing), state,
                          max_iter=max_iter, tol=tol)
    return OneCoinResult(posteriors=state.posteriors, priors=jnp.exp(state.log_prior),
                         skills=state.skills, objective=loop.objective, history=loop.history,
                         n_iter=loop.n_iter, converged=loop.converged)


class OneCoinDawidSkene(Aggregator):
    """One-coin Dawid-Skene: a single accuracy per annotator, fitted by EM.

    Args:
        max_iter, tol, smoothing, layout, dtype, native: as for
            :class:`~crowdllm.aggregation.DawidSkene` (the native kernel runs the same E-step;
            the M-step's agreements are the diagonal of its summed counts).

    Attributes (after fit):
        skills_: ``[workers]`` probability that each annotator answers correctly.
        priors_: ``[K]`` class prior.
    """

    name = "onecoin-ds"
    description = "One-coin Dawid-Skene EM: a single accuracy per annotator"
    supports_gold = True
    iterative = True

    def __init__(self, max_iter: int = 100, tol: float = 1e-5, smoothing: float = 0.01,
                 layout: str = "auto", dtype: str = "float32", native: str = "auto") -> None:
        if smoothing < 0:
            raise ValueError(f"smoothing must be >= 0, got {smoothing}")
        self.max_iter, self.tol, self.smoothing, self.layout, self.dtype = max_iter, tol, smoothing, layout, dtype
        self.native = _native.check_option(native)

    def _fit(self, tensor: LabelTensor, gold: np.ndarray | None) -> dict[str, Any]:
        with jax.enable_x64(self.dtype == "float64"):
            data = prepare(tensor, layout=self.layout, gold=gold,
                           dtype=jnp.float64 if self.dtype == "float64" else jnp.float32)
            self.native_used_, width = _native.coo_use(self.native, data, tensor)
            run = fit
            if self.native_used_:  # a sparse crowd: width and rank (the rows' order)
                run = functools.partial(_native.onecoin_fit,
                                        **_native.coo_fit_args(data, tensor, width))
            res = jax.tree_util.tree_map(np.asarray, run(
                data, max_iter=self.max_iter, tol=self.tol, smoothing=self.smoothing))
        return {"probas": res.posteriors[: tensor.n_tasks], "priors": res.priors,
                "skills": res.skills[: tensor.n_workers], "n_iter": int(res.n_iter),
                "converged": bool(res.converged), "history": res.history}

    def skills_table(self) -> pa.Table:
        return pa.table({"worker": pa.array(self.workers_.tolist()),
                         "skill": pa.array(self.skills_, type=pa.float64())})
