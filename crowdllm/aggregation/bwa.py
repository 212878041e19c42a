r"""BWA: Bayesian weighted average, for highly redundant crowd annotations.

Each class :math:`k` is its own binary problem ("is the answer :math:`k`?"). The truth
:math:`z_{tk} \in [0, 1]` of task :math:`t` is a real number; annotator :math:`w`'s indicators
:math:`y_{twk} = [l_{tw} = k]` are the truth plus Gaussian noise of precision :math:`v_{wk}`,
with a Gamma prior on the precision and a Gaussian prior on the truth around the class mean:

.. math::
    y_{twk} \sim \mathcal{N}(z_{tk}, v_{wk}^{-1}), \qquad
    v_{wk} \sim \mathrm{Gamma}(a_v, b_{v,k}), \qquad
    z_{tk} \sim \mathcal{N}(\mu_k, (\lambda v_{wk})^{-1}).

The updates have closed forms (coordinate ascent on the log joint density
:math:`J = \sum_{w,k} [(a_v + N_w)\log v_{wk} - v_{wk}(b_{v,k} + S_{wk})]
- \lambda \sum_{t,k} (z_{tk} - \mu_k)^2` with :math:`S_{wk} = \sum_{(t,w)} (z_{tk} - y_{twk})^2`,
:math:`N_w` the number of answers of :math:`w`):

* :math:`\mu_k = \frac1T \sum_t z_{tk}`;
* :math:`v_{wk} = (a_v + N_w) / (b_{v,k} + S_{wk})`;
* :math:`z_{tk} = (\lambda \mu_k + \sum_{(t,w)} v_{wk} y_{twk}) / (\lambda + \sum_{(t,w)} v_{wk})`:
  a weighted average of the answers, shrunk to the class mean.

Each update maximises :math:`J` in its block, so :math:`J` never decreases (tested). The
truth starts at the majority-vote fractions, and the prior rate is set from them as in the
reference code: :math:`b_{v,k} = a_v \cdot c \cdot \sum_t n_t z_{tk}(1 - z_{tk}) / N` with
:math:`n_t` the answers of task :math:`t`, :math:`N` all answers, and the prior correction
:math:`c = 4(1 - 1/K)`. Gold tasks are clamped (:math:`z_{tk} = [k = \text{gold}]`). The class
posteriors reported are the rows of :math:`z` normalised to sum to one.

References:
    Y. Li, B. Rubinstein, T. Cohn. Truth inference at scale: a Bayesian model for adjudicating
    highly redundant crowd annotations. The Web Conference (WWW) 2019. Reference code:
    ``yuan-li/truth-inference-at-scale`` (``code/bwa.py``).

Example:
    >>> from crowdllm.aggregation import BWA
    >>> labels = BWA().fit_predict("answers.csv")  # doctest: +SKIP
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pyarrow as pa

from ..labels import LabelTensor
from . import _native
from ._core import Coo, CrowdData, iterate, normalize, prepare, task_class_sum, task_count, worker_confusion, worker_count
from .base import Aggregator
from .ibcc import n_answers

__all__ = ["BWA", "BWAState", "BWAResult", "init", "step", "fit"]


class BWAState(NamedTuple):
    truth: jax.Array  # [tasks, K] z
    precision: jax.Array  # [workers, K] v
    mean: jax.Array  # [K] mu


class BWAResult(NamedTuple):
    posteriors: jax.Array  # [tasks, K]: z normalised per row
    truth: jax.Array  # [tasks, K] z
    precision: jax.Array  # [workers, K]
    objective: jax.Array
    history: jax.Array
    n_iter: jax.Array
    converged: jax.Array


def _clamp(data: CrowdData, z: jax.Array) -> jax.Array:
    onehot = jax.nn.one_hot(jnp.maximum(data.gold, 0), z.shape[1], dtype=z.dtype)
    return jnp.where((data.gold >= 0)[:, None], onehot, z)


def _sq_error(data: CrowdData, z: jax.Array, n_wk: jax.Array) -> jax.Array:
    r""":math:`S_{wk} = \sum_{(t,w,l)} (z_{tk} - [l = k])^2 = \sum z^2 - 2 \sum z [l=k] + n_{wk}`."""
    K = z.shape[1]
    z = z * data.task_mask[:, None]
    both = worker_confusion(data, jnp.concatenate([z, z * z], axis=1))  # [W, 2K, L]
    hit = jnp.diagonal(both[:, :K, :K], axis1=1, axis2=2)  # sum of z_tk over answers l = k
    sq = both[:, K:, :].sum(axis=2)
    return sq_error(hit, sq, n_wk)


def sq_error(hit: jax.Array, sq: jax.Array, n_wk: jax.Array) -> jax.Array:
    """``S_wk`` from the sums over w's answers of ``z_tk [l = k]`` (hit) and ``z_tk^2`` (sq)."""
    return jnp.maximum(sq - 2 * hit + n_wk, 0.0)


def precisions_from(S: jax.Array, a_v, b_v, n_w) -> jax.Array:
    """The v update: ``v_wk = (a_v + N_w) / (b_vk + S_wk)``."""
    return (a_v + n_w)[:, None] / (b_v[None] + S)


def log_joint(worker_mask: jax.Array, v: jax.Array, S: jax.Array, dev: jax.Array, a_v, b_v,
              lam, n_w) -> jax.Array:
    """``J`` from the precisions, the squared errors and ``dev = sum_t |z_t - mu|^2``."""
    per_worker = ((a_v + n_w)[:, None] * jnp.log(v) - v * (b_v[None] + S)).sum(axis=1)
    return jnp.where(worker_mask > 0, per_worker, 0.0).sum() - lam * dev


def _objective(data, state: BWAState, S: jax.Array, a_v, b_v, lam, n_w) -> jax.Array:
    dev = ((state.truth - state.mean[None]) ** 2).sum(axis=1)
    return log_joint(data.worker_mask, state.precision, S, (dev * data.task_mask).sum(), a_v,
                     b_v, lam, n_w)


def init(data: CrowdData, *, a_v: float, prior_correction: bool) -> tuple[BWAState, jax.Array, jax.Array, jax.Array]:
    """Majority-vote truth; the prior rate ``b_v`` it implies; answer counts per worker and label."""
    dtype = data.task_mask.dtype
    K = data.n_classes
    votes = task_count(data, dtype)
    z = _clamp(data, normalize(votes))
    n_t = votes.sum(axis=1) * data.task_mask
    adj = 4.0 * (1.0 - 1.0 / K) if prior_correction else 1.0
    b_v = a_v * adj * (n_t[:, None] * z * (1 - z)).sum(axis=0) / n_answers(data)
    b_v = jnp.maximum(b_v, 1e-6)  # a class every annotator agrees on everywhere: keep the rate > 0
    ones = jnp.ones((data.n_tasks, 1), dtype) * data.task_mask[:, None]
    n_wk = worker_confusion(data, ones)[:, 0, :]  # [W, L] answers of w with label k
    n_w = worker_count(data, dtype)
    state = BWAState(truth=z, precision=jnp.ones((data.n_workers, K), dtype),
                     mean=(z * data.task_mask[:, None]).sum(0) / jnp.maximum(data.task_mask.sum(), 1))
    return state, b_v, n_wk, n_w


def step(data: CrowdData, state: BWAState, *, a_v, b_v, lam, n_wk, n_w) -> tuple[BWAState, jax.Array]:
    """mu and v from z, then z from (mu, v); returns the log joint J per answer at the new point."""
    K = data.n_classes
    z = state.truth
    mean = (z * data.task_mask[:, None]).sum(0) / jnp.maximum(data.task_mask.sum(), 1)
    v = precisions_from(_sq_error(data, z, n_wk), a_v, b_v, n_w)
    # [W, 2K, L] table: rows k give v_wk where l = k (weighted votes), rows K + k give v_wk always
    eye = jnp.eye(K, dtype=v.dtype)
    table = jnp.concatenate([v[:, :, None] * eye[None], jnp.broadcast_to(v[:, :, None], v.shape + (K,))],
                            axis=1)
    sums = task_class_sum(data, table)
    z_new = _clamp(data, (lam * mean[None] + sums[:, :K]) / (lam + sums[:, K:]))
    new = BWAState(truth=z_new, precision=v, mean=mean)
    obj = _objective(data, new, _sq_error(data, z_new, n_wk), a_v, b_v, lam, n_w)
    return new, obj / n_answers(data)


@functools.partial(jax.jit, static_argnames=("max_iter", "prior_correction"))
def fit(data: CrowdData, *, max_iter: int = 500, tol: float = 1e-7, a_v: float = 15.0,
        lam: float = 1.0, prior_correction: bool = True) -> BWAResult:
    """Fit BWA by its closed-form updates; see the module docstring."""
    state, b_v, n_wk, n_w = init(data, a_v=a_v, prior_correction=prior_correction)
    state, loop = iterate(functools.partial(step, data, a_v=a_v, b_v=b_v, lam=lam, n_wk=n_wk, n_w=n_w),
                          state, max_iter=max_iter, tol=tol)
    post = normalize(jnp.maximum(state.truth, 0.0))
    return BWAResult(posteriors=post, truth=state.truth, precision=state.precision,
                     objective=loop.objective, history=loop.history, n_iter=loop.n_iter,
                     converged=loop.converged)


class BWA(Aggregator):
    """Bayesian weighted average (Li, Rubinstein & Cohn, WWW 2019).

    Args:
        a_v: shape of the Gamma prior on annotator precision (reference: 15).
        lam: strength of the pull of each truth towards its class mean (reference: 1).
        prior_correction: scale the prior rate by ``4 (1 - 1/K)`` (reference: on).
        max_iter: the most sweeps.
        tol: stop when the log joint (per answer) gains less than this.
        layout: ``auto``, ``coo`` or ``dense``.
        dtype: ``float32`` or ``float64``.
        native: ``auto`` (default), ``on`` or ``off``, as for
            :class:`~crowdllm.aggregation.DawidSkene`: a task's truth is, per class, a ratio of
            two sums of table entries (precision-weighted answers plus ``lam`` times the class
            mean, over summed precisions plus ``lam``), so on dense float32 panels on AVX2 CPUs
            each sweep is one ratio pass of the native kernel over the distinct answer rows
            (the ratios' sums and their squares' sums per combination); on a sparse crowd (the
            COO layout), one ratio pass over its tasks as rows of answer codes (``native/
            ebcc.cc``), while annotators x labels fit 16-bit codes.

    Attributes (after fit):
        truth_: ``[tasks, K]`` the real-valued truth estimates ``z``.
        precision_: ``[workers, K]`` each annotator's precision per class.
        skills_: ``[workers]`` mean precision over the classes.
        native_used_: whether the native kernel ran the fit.
    """

    name = "bwa"
    description = "BWA: Bayesian weighted average (closed-form updates, redundant crowds)"
    supports_gold = True
    iterative = True

    def __init__(self, a_v: float = 15.0, lam: float = 1.0, prior_correction: bool = True,
                 max_iter: int = 500, tol: float = 1e-7, layout: str = "auto",
                 dtype: str = "float32", native: str = "auto") -> None:
        self.native = _native.check_option(native)
        if a_v <= 0 or lam <= 0:
            raise ValueError("a_v and lam must be > 0")
        self.a_v, self.lam, self.prior_correction = a_v, lam, prior_correction
        self.max_iter, self.tol, self.layout, self.dtype = max_iter, tol, layout, dtype

    def _fit(self, tensor: LabelTensor, gold: np.ndarray | None) -> dict[str, Any]:
        with jax.enable_x64(self.dtype == "float64"):
            data = prepare(tensor, layout=self.layout, gold=gold,
                           dtype=jnp.float64 if self.dtype == "float64" else jnp.float32)
            # a sparse crowd runs on the kernel as rows of answer codes (width), a table row
            # holding the numerators and denominators of K classes (each padded to 8)
            columns = 2 * (-(-data.n_classes // 8) * 8) - 1 if isinstance(data, Coo) else None
            self.native_used_, width = _native.coo_use(self.native, data, tensor, columns)
            run = fit
            if self.native_used_:  # a sparse crowd: width and rank (the rows' order)
                run = functools.partial(_native.bwa_fit,
                                        **_native.coo_fit_args(data, tensor, width))
            res = run(data, max_iter=self.max_iter, tol=self.tol, a_v=self.a_v, lam=self.lam,
                      prior_correction=self.prior_correction)
            res = jax.tree_util.tree_map(np.asarray, res)
        n, W = tensor.n_tasks, tensor.n_workers
        precision = res.precision[:W]
        return {"probas": res.posteriors[:n], "truth": res.truth[:n], "precision": precision,
                "skills": precision.mean(axis=1), "n_iter": int(res.n_iter),
                "converged": bool(res.converged), "history": res.history}

    def skills_table(self) -> pa.Table:
        cols: dict[str, Any] = {"worker": pa.array(self.workers_.tolist()),
                                "skill": pa.array(self.skills_, type=pa.float64())}
        for k, ck in enumerate(self.classes_.tolist()):
            cols[f"precision_{ck}"] = pa.array(self.precision_[:, k], type=pa.float64())
        return pa.table(cols)
