r"""IBCC: independent Bayesian classifier combination, by mean-field variational Bayes.

The generative story is Dawid-Skene's with Dirichlet priors on every probability vector:

.. math::
    \rho \sim \mathrm{Dir}(\alpha), \qquad
    \pi^{(w)}_{k\cdot} \sim \mathrm{Dir}(\beta_{k\cdot}), \qquad
    z_t \sim \mathrm{Cat}(\rho), \qquad
    y_{tw} \mid z_t = k \sim \mathrm{Cat}(\pi^{(w)}_{k\cdot}),

with :math:`\beta_{kl} = b` off the diagonal and :math:`a` on it (the reference code's
:math:`a_v = 4, b_v = 1`: a prior belief that annotators are better than chance).

Mean-field VB keeps :math:`q(\rho)\,\prod_{w,k} q(\pi^{(w)}_k)\,\prod_t q(z_t)` and alternates

* :math:`q(\rho) = \mathrm{Dir}(\nu)`, :math:`\nu_k = \alpha_k + \sum_t q_t(k)`;
  :math:`q(\pi^{(w)}_k) = \mathrm{Dir}(\mu_{wk\cdot})`,
  :math:`\mu_{wkl} = \beta_{kl} + \sum_{(t,w,l)} q_t(k)`;
* :math:`\log q_t(k) = \mathbb{E}\log\rho_k + \sum_{(t,w,l)} \mathbb{E}\log\pi^{(w)}_{kl} - \log Z_t`
  with :math:`\mathbb{E}\log x_k = \psi(a_k) - \psi(\sum_j a_j)` under :math:`\mathrm{Dir}(a)`.

The evidence lower bound after each sweep is

.. math::
    \mathcal{L} = \sum_t \log Z_t + \sum_{\text{Dirichlets}} \Big[\log B(a) - \log B(a_0)
        + \sum_j (a_{0j} - a_j)\,\mathbb{E}\log x_j\Big]

(:math:`a_0` the prior, :math:`a` the posterior; :math:`\sum_t \log Z_t` is the expected log
joint of answers and labels plus the entropy of :math:`q(z)`, the bracket is
:math:`-\mathrm{KL}(q \| p)` of each Dirichlet). Coordinate ascent never decreases it (tested). Gold tasks are clamped to their
label (their :math:`\log Z_t` is the score of the gold class). Start: majority-vote fractions.

References:
    H.-C. Kim and Z. Ghahramani. Bayesian classifier combination. AISTATS 2012.
    E. Simpson, S. Roberts, I. Psorakis, A. Smith. Dynamic Bayesian combination of multiple
    imperfect classifiers. 2013 (the VB updates).
    Y. Li, B. Rubinstein, T. Cohn. Exploiting worker correlation for label aggregation in
    crowdsourcing. ICML 2019 (the reference code's priors, ``yuan-li/truth-inference-at-scale``).

Example:
    >>> from crowdllm.aggregation import IBCC
    >>> model = IBCC()
    >>> labels = model.fit_predict("answers.csv")  # doctest: +SKIP
    >>> model.errors_.shape  # expected confusion matrices [workers, K, L]  # doctest: +SKIP
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pyarrow as pa
from jax.scipy.special import digamma, gammaln

from ..labels import LabelTensor
from ._core import (CrowdData, Loop, clamp_gold, prepare, task_class_sum, vote_posteriors,
                    worker_confusion)
from . import _native
from .base import Aggregator

__all__ = ["IBCC", "IBCCState", "IBCCResult", "init", "step", "fit", "elbo", "elbo_params",
           "confusion_prior",
           "dirichlet_stats", "digamma_gammaln", "log_beta", "n_answers"]


# ------------------------------------------------------------------ Dirichlet helpers (shared)


def log_beta(a: jax.Array) -> jax.Array:
    """Log of the multivariate Beta function over the last axis."""
    return gammaln(a).sum(axis=-1) - gammaln(a.sum(axis=-1))


def n_answers(data: CrowdData) -> jax.Array:
    """The number of real answers (at least 1), to report objectives per answer."""
    if hasattr(data, "weight"):
        return jnp.maximum(data.weight.sum(), 1.0)
    return jnp.maximum((data.labels >= 0).sum().astype(data.task_mask.dtype), 1.0)


#: :func:`digamma_gammaln` shifts arguments below this up by this much
SHIFT = 6


def digamma_gammaln(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(digamma(x), gammaln(x))`` for positive ``x`` (Dirichlet parameters), in one pass.

    In float32, both from the asymptotic (Stirling) series at ``y = x + SHIFT`` where ``x <
    SHIFT`` (else ``y = x``; the terms used leave an error below 1e-9 from 6 up), shifted back
    with the recurrences ``digamma(x) = digamma(y) - sum_k 1 / (x + k)`` and ``gammaln(x) =
    gammaln(y) - log prod_k (x + k)`` (k < SHIFT): two logs and four divisions per number.
    XLA's CPU ``digamma`` and ``gammaln`` took 24 and 43 ns a number on the 2-core AMD VM (60 and
    109 ms for the 2.56M confusion parameters of EBCC on 10,000 annotators, each sweep). On CPU
    with the native kernels this runs as one opaque call (``native/special.cc``, the same
    formulas: :func:`._native.digamma_gammaln`), since XLA splits the same formulas, fused with
    the slices and sums that consume them, into a dozen passes. As close to float64 SciPy over
    [1e-3, 1e8] as XLA's float32 functions are (relative error, or absolute where the value is
    below 1; ``tests/test_ibcc.py``): digamma within 4.7e-7 native, 5.6e-7 in XLA (XLA's own
    1.2e-6), gammaln within 3.2e-6 either way (XLA's own 2.6e-6). Other dtypes:
    ``jax.scipy.special``'s. Not the native call while a fit with ``native="off"`` is traced
    (:func:`._native.special_calls`).
    """
    if x.dtype != jnp.float32:
        return digamma(x), gammaln(x)
    if jax.default_backend() == "cpu" and _native.special_allowed() and _native.available():
        return _native.digamma_gammaln(x)
    return _digamma_gammaln_xla(x)


def _digamma_gammaln_xla(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """:func:`digamma_gammaln`'s float32 formulas in XLA."""
    small = x < SHIFT
    y = jnp.where(small, x + SHIFT, x)
    inv = 1.0 / y
    inv2 = inv * inv
    log_y = jnp.log(y)
    dg = log_y - 0.5 * inv - inv2 * (1 / 12 - inv2 * (1 / 120 - inv2 * (1 / 252 - inv2 / 240)))
    gl = ((y - 0.5) * log_y - y + 0.5 * np.log(2 * np.pi)
          + inv * (1 / 12 - inv2 * (1 / 360 - inv2 * (1 / 1260 - inv2 / 1680))))
    shift_dg, prod = 0.0, 1.0
    for k in range(0, SHIFT, 2):  # 1/a + 1/b = (a + b) / (a b)
        a = x + k
        ab = a * (a + 1)
        shift_dg = shift_dg + (2 * a + 1) / ab
        prod = prod * ab
    return (dg - jnp.where(small, shift_dg, 0.0),
            gl - jnp.where(small, jnp.log(jnp.where(small, prod, 1.0)), 0.0))


def dirichlet_stats(*params: jax.Array) -> list[tuple[jax.Array, jax.Array]]:
    """``(E log x, log B(a))`` for each Dirichlet parameter array (Dirichlets over the last axis).

    One ``digamma`` and one ``gammaln`` over all the numbers at once (:func:`digamma_gammaln`):
    special functions expand to long polynomials, and calling each once keeps the compiled kernel
    small (compile time).
    """
    parts = [p.reshape(-1) for p in params] + [p.sum(axis=-1).reshape(-1) for p in params]
    flat = jnp.concatenate(parts)
    dg, gl = digamma_gammaln(flat)
    out, i = [], 0
    sizes = [p.size for p in params]
    j = sum(sizes)
    for p, n in zip(params, sizes):
        m = n // p.shape[-1]
        dg_a, gl_a = dg[i:i + n].reshape(p.shape), gl[i:i + n].reshape(p.shape)
        dg_s, gl_s = dg[j:j + m].reshape(p.shape[:-1]), gl[j:j + m].reshape(p.shape[:-1])
        out.append((dg_a - dg_s[..., None], gl_a.sum(axis=-1) - gl_s))
        i, j = i + n, j + m
    return out


def confusion_prior(n_classes: int, diag: float, off: float, dtype: Any = jnp.float32) -> jax.Array:
    """``[K, K]`` Dirichlet parameters of the confusion rows: ``diag`` on the diagonal, ``off`` elsewhere."""
    return jnp.eye(n_classes, dtype=dtype) * (diag - off) + off


# ------------------------------------------------------------------------------- the kernel


class IBCCState(NamedTuple):
    posteriors: jax.Array  # [tasks, K] q(z)
    nu: jax.Array  # [K] Dirichlet parameters of q(rho)
    mu: jax.Array  # [workers, K, L] Dirichlet parameters of q(pi)


class IBCCResult(NamedTuple):
    posteriors: jax.Array  # [tasks, K]
    nu: jax.Array  # [K]
    mu: jax.Array  # [workers, K, L]
    priors: jax.Array  # [K] E[rho]
    confusion: jax.Array  # [workers, K, L] E[pi]
    objective: jax.Array  # the last ELBO, per answer
    history: jax.Array  # [max_iter] ELBO per answer after each sweep
    n_iter: jax.Array
    converged: jax.Array


def _params(data: CrowdData, post: jax.Array, alpha: jax.Array, beta: jax.Array):
    """Optimal q(rho), q(pi) given q(z): Dirichlet parameters plus the expected counts."""
    post = post * data.task_mask[:, None]
    counts_k = post.sum(axis=0)
    counts_wkl = worker_confusion(data, post)
    return alpha + counts_k, beta[None] + counts_wkl, counts_k, counts_wkl


def _q_z(data: CrowdData, scores: jax.Array) -> tuple[jax.Array, jax.Array]:
    """q(z) from scores (gold clamped) and each task's log normaliser (gold: the gold score)."""
    log_z = jax.nn.logsumexp(scores, axis=1)
    post = clamp_gold(jnp.exp(scores - log_z[:, None]), data.gold)
    gold_score = jnp.take_along_axis(scores, jnp.maximum(data.gold, 0)[:, None], axis=1)[:, 0]
    return post, jnp.where(data.gold >= 0, gold_score, log_z)


def elbo(data: CrowdData, state: IBCCState, log_z: jax.Array, alpha: jax.Array, beta: jax.Array,
         stats: list | None = None) -> jax.Array:
    """The evidence lower bound of ``state`` (whose ``posteriors`` gave ``log_z``)."""
    return (log_z * data.task_mask).sum() + elbo_params(data, state.nu, state.mu, alpha, beta,
                                                         stats)


def elbo_params(data: CrowdData, nu: jax.Array, mu: jax.Array, alpha: jax.Array, beta: jax.Array,
                stats: list | None = None) -> jax.Array:
    """The ELBO's terms of q(rho), q(pi) (all but the tasks' log normalisers)."""
    (e_rho, lb_rho), (e_pi, lb_pi) = stats or dirichlet_stats(nu, mu)
    out = lb_rho - log_beta(alpha) + ((alpha - nu) * e_rho).sum()
    per_worker = (lb_pi - log_beta(beta)[None] + ((beta[None] - mu) * e_pi).sum(-1)).sum(1)
    return out + (per_worker * data.worker_mask).sum()


def init(data: CrowdData, alpha: jax.Array, beta: jax.Array) -> IBCCState:
    """Majority-vote fractions as q(z) (gold clamped), and the q(rho), q(pi) they imply."""
    dtype = data.task_mask.dtype
    post = vote_posteriors(data, dtype)
    nu, mu, _, _ = _params(data, post, alpha, beta)
    return IBCCState(posteriors=post, nu=nu, mu=mu)


def step(data: CrowdData, state: IBCCState, *, alpha: jax.Array,
         beta: jax.Array) -> tuple[IBCCState, jax.Array]:
    """One VB sweep: q(rho), q(pi) from q(z), then q(z); returns the new ELBO per answer."""
    nu, mu, _, _ = _params(data, state.posteriors, alpha, beta)
    stats = dirichlet_stats(nu, mu)
    post, log_z = _q_z(data, stats[0][0] + task_class_sum(data, stats[1][0]))
    new = IBCCState(posteriors=post, nu=nu, mu=mu)
    return new, elbo(data, new, log_z, alpha, beta, stats) / n_answers(data)


def vb_loop(step, state, moved, *, max_iter: int, tol, atol):
    """Run ``state, elbo = step(state)`` until the ELBO gains less than ``tol`` or no class
    posterior moves by more than ``atol`` (``moved(new, old)``: the largest move; the reference
    code's rule), or ``max_iter`` sweeps; returns ``(state, Loop)``."""
    _, obj0 = jax.eval_shape(step, state)
    dtype = obj0.dtype

    def cond(c):
        return (c[2] < max_iter) & ~c[3]

    def body(c):
        st, prev, i, _, hist = c
        new, obj = step(st)
        done = ((obj - prev) < tol) | (moved(new, st) <= atol)
        return new, obj, i + 1, done, hist.at[i].set(obj)

    carry = (state, jnp.asarray(-jnp.inf, dtype), jnp.asarray(0, jnp.int32), jnp.asarray(False),
             jnp.zeros((max(max_iter, 1),), dtype))
    st, obj, n, done, hist = jax.lax.while_loop(cond, body, carry)
    hist = jnp.where(jnp.arange(hist.shape[0]) < n, hist, obj)
    return st, Loop(n_iter=n, converged=done, objective=obj, history=hist)


@functools.partial(jax.jit, static_argnames=("max_iter", "native_special"))
def fit(data: CrowdData, *, max_iter: int = 500, tol: float = 1e-7, atol: float = 1e-3,
        alpha: float | jax.Array = 1.0, beta_diag: float = 4.0, beta_off: float = 1.0,
        native_special: bool = True) -> IBCCResult:
    """Fit IBCC by mean-field VB; see the module docstring for the model and the updates.

    Stops when the ELBO (per answer) gains less than ``tol``, or when no class posterior moves
    by more than ``atol`` in a sweep (the reference code's rule), or after ``max_iter`` sweeps.
    ``native_special``: digamma and gammaln may run as the native call (:func:`digamma_gammaln`).
    """
    with _native.special_calls(native_special):
        dtype = data.task_mask.dtype
        K = data.n_classes
        alpha_k = jnp.broadcast_to(jnp.asarray(alpha, dtype), (K,))
        beta = confusion_prior(K, beta_diag, beta_off, dtype)
        state = init(data, alpha_k, beta)
        real = (data.task_mask > 0)[:, None]

        def moved(new, old):
            return jnp.where(real, jnp.abs(new.posteriors - old.posteriors), 0.0).max()

        state, loop = vb_loop(functools.partial(step, data, alpha=alpha_k, beta=beta), state, moved,
                              max_iter=max_iter, tol=tol, atol=atol)
        return IBCCResult(posteriors=state.posteriors, nu=state.nu, mu=state.mu,
                          priors=state.nu / state.nu.sum(),
                          confusion=state.mu / state.mu.sum(axis=-1, keepdims=True),
                          objective=loop.objective, history=loop.history, n_iter=loop.n_iter,
                          converged=loop.converged)


INFERENCE = ("vb", "nuts", "svi")


class IBCC(Aggregator):
    """Independent Bayesian classifier combination (Kim & Ghahramani 2012).

    Args:
        alpha: Dirichlet concentration of the class proportions (per class).
        beta_diag: Dirichlet parameter of a confusion row on its diagonal (correct answers).
        beta_off: ... and off the diagonal.
        max_iter: the most VB sweeps.
        tol: stop when the ELBO (per answer) gains less than this (None: never; in float32 the
            ELBO's rounding noise can stop a fit early, so the default relies on ``atol``)...
        atol: ... or when no class posterior moves by more than this (reference code: 1e-3).
        inference: ``vb`` (mean-field VB, the JAX kernel), or ``nuts`` / ``svi``: the NumPyro
            model in :mod:`crowdllm.aggregation.numpyro_models`, for full posteriors on small
            data (``credible_`` then holds credible intervals on each annotator's accuracy).
        num_samples, num_warmup: NUTS draws / warm-up steps (SVI: ``num_steps`` optimiser steps
            and ``num_samples`` draws from the guide).
        seed: PRNG seed of NUTS / SVI.
        progress_bar: show NumPyro's progress bar (NUTS / SVI; on by default, as in NumPyro).
        layout: ``auto``, ``coo`` or ``dense``.
        dtype: ``float32`` or ``float64``.
        native: as for :class:`~crowdllm.aggregation.DawidSkene` (VB only): on float32 data
            on AVX2 CPUs (dense panels and sparse crowds) each sweep runs on the native kernel
            (q(z) is Dawid-Skene's E-step with the tables of E[log rho], E[log pi]; the kernel
            also keeps each answer row's q(z) for the stopping rule). Elsewhere (``auto``) the
            VB steps' digamma and gammaln still run as one native call on CPU; ``off`` runs no
            native code at all.

    Attributes (after fit):
        errors_: ``[workers, K, L]`` posterior mean confusion matrices.
        priors_: ``[K]`` posterior mean class proportions.
        skills_: ``[workers]`` expected accuracy ``sum_k priors_k errors_[w, k, k]``.
        elbo_: the final ELBO (VB, per answer).
    """

    name = "ibcc"
    description = "IBCC: Bayesian Dawid-Skene with Dirichlet priors, by VB (or NUTS/SVI)"
    supports_gold = True
    iterative = True

    def __init__(self, alpha: float = 1.0, beta_diag: float = 4.0, beta_off: float = 1.0,
                 max_iter: int = 500, tol: float | None = None, atol: float = 1e-3,
                 inference: str = "vb",
                 num_samples: int = 500, num_warmup: int = 500, num_steps: int = 2000,
                 seed: int = 0, progress_bar: bool = True, layout: str = "auto",
                 dtype: str = "float32", native: str = "auto") -> None:
        if inference not in INFERENCE:
            raise ValueError(f"inference must be one of {', '.join(INFERENCE)}, got {inference!r}")
        if alpha <= 0 or beta_diag <= 0 or beta_off <= 0:
            raise ValueError("alpha, beta_diag and beta_off must be > 0")
        self.alpha, self.beta_diag, self.beta_off = alpha, beta_diag, beta_off
        self.max_iter, self.tol, self.atol, self.inference = max_iter, tol, atol, inference
        self.num_samples, self.num_warmup, self.num_steps = num_samples, num_warmup, num_steps
        self.seed, self.progress_bar = seed, progress_bar
        self.layout, self.dtype = layout, dtype
        self.native = _native.check_option(native)

    @property
    def shardable(self) -> bool:
        return self.inference == "vb"

    def _fit(self, tensor: LabelTensor, gold: np.ndarray | None) -> dict[str, Any]:
        if self.inference != "vb":
            from . import numpyro_models

            return numpyro_models.fit_aggregator(
                "ibcc", tensor, gold, inference=self.inference, num_samples=self.num_samples,
                num_warmup=self.num_warmup, num_steps=self.num_steps, seed=self.seed,
                progress_bar=self.progress_bar, alpha=self.alpha, beta_diag=self.beta_diag,
                beta_off=self.beta_off)
        with jax.enable_x64(self.dtype == "float64"):
            data = prepare(tensor, layout=self.layout, gold=gold,
                           dtype=jnp.float64 if self.dtype == "float64" else jnp.float32)
            tol = -np.inf if self.tol is None else self.tol
            self.native_used_, width = _native.coo_use(self.native, data, tensor)
            run = functools.partial(fit, native_special=self.native != "off")
            if self.native_used_:  # a sparse crowd: width and rank (the rows' order)
                run = functools.partial(_native.ibcc_fit,
                                        **_native.coo_fit_args(data, tensor, width))
            res = run(data, max_iter=self.max_iter, tol=tol, atol=self.atol, alpha=self.alpha,
                      beta_diag=self.beta_diag, beta_off=self.beta_off)
            res = jax.tree_util.tree_map(np.asarray, res)
        W = tensor.n_workers
        errors = res.confusion[:W]
        return {"probas": res.posteriors[: tensor.n_tasks], "priors": res.priors,
                "errors": errors, "skills": np.einsum("k,wkk->w", res.priors, errors),
                "elbo": float(res.objective), "credible": None, "n_iter": int(res.n_iter),
                "converged": bool(res.converged), "history": res.history}

    def skills_table(self) -> pa.Table:
        cols: dict[str, Any] = {"worker": pa.array(self.workers_.tolist()),
                                "skill": pa.array(self.skills_, type=pa.float64())}
        if getattr(self, "credible_", None) is not None:
            cols["skill_lo"] = pa.array(self.credible_[:, 0], type=pa.float64())
            cols["skill_hi"] = pa.array(self.credible_[:, 1], type=pa.float64())
        classes = self.classes_.tolist()
        for k, ck in enumerate(classes):
            for l, cl in enumerate(classes):
                cols[f"p_{ck}_{cl}"] = pa.array(self.errors_[:, k, l], type=pa.float64())
        return pa.table(cols)
