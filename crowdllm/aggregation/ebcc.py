r"""EBCC: enhanced Bayesian classifier combination, by variational inference with restarts.

IBCC's annotators err independently given the true class. EBCC lets them err *together*: each
true class :math:`k` has :math:`M` latent subtypes, and an annotator's confusion row depends on the
class and the subtype, so annotators that tend to agree on some items of a class (a hard subtype,
an easy one) are modelled as such:

.. math::
    \tau \sim \mathrm{Dir}(\alpha), \quad \pi_k \sim \mathrm{Dir}(\tfrac{a_\pi}{M}\mathbf 1_M), \quad
    V_{wkm\cdot} \sim \mathrm{Dir}(\beta_{k\cdot}),

.. math::
    z_t \sim \mathrm{Cat}(\tau), \quad g_t \mid z_t = k \sim \mathrm{Cat}(\pi_k), \quad
    y_{tw} \mid z_t = k, g_t = m \sim \mathrm{Cat}(V_{wkm\cdot}).

Mean-field VB keeps :math:`q(\tau)q(\pi)q(V)\prod_t q(z_t, g_t)` and alternates

* :math:`\nu_k = \alpha_k + \sum_t q_t(k)`, :math:`\eta_{km} = a_\pi / M + \sum_t q_t(k, m)`,
  :math:`\mu_{wkml} = \beta_{kl} + \sum_{(t,w,l)} q_t(k, m)`;
* :math:`\log q_t(k, m) = \mathbb{E}\log\tau_k + \mathbb{E}\log\pi_{km}
  + \sum_{(t,w,l)} \mathbb{E}\log V_{wkml} - \log Z_t`.

The ELBO is :math:`\sum_t \log Z_t` plus, for every Dirichlet, :math:`\log B(a) - \log B(a_0) +
\sum (a_0 - a)\,\mathbb{E}\log x` (see :mod:`.ibcc`); it never decreases (tested). The fit
depends on the random start of the subtypes (:math:`q_t(k, \cdot)` = majority-vote fraction of
:math:`k` times a Dirichlet(1) draw), so ``restarts`` independent fits run together - ``vmap``
over PRNG keys, in chunks of ``restart_batch`` - and the one with the best final ELBO is kept
(the reference protocol keeps the best of 40 seeds). ``empirical_prior`` sets :math:`\alpha` to the
majority-vote class counts, as the reference notebook does. Gold tasks are clamped to their class
(their subtype stays free).

Making 40 restarts cheap:

* every restart shares the data on the device and the compiled kernel; restarts run ``vmap``-ed
  ``restart_batch`` at a time, and between sweeps a restart keeps only its counts and ``q(z)``,
  never the ``[tasks, K, M]`` posterior;
* with the dense layout, tasks with the same answers (and gold) are merged into one weighted row
  before fitting - the model is exchangeable over tasks, so the fixed points are the same (each
  merged row starts from one subtype draw instead of one per task): 1,000,000 synthetic tasks of
  12 annotators become 398,225 rows - and a sweep is one fused pass over the rows: on the
  native kernel where it applies (:func:`._native.ebcc_sweep`: table rows gathered by groups of
  annotators' answers, ``native``), else in XLA (:func:`._fast.subtype_sweep`: the E-step and
  both sums as products with the in-cache answer indicator); 11-17 and 100-128 ms per sweep
  there on the 2-core AMD VM (``benchmarks/ebcc_sweep_native.py``, session 27);
* on a sparse crowd (the COO layout), each task is a row of one code per answer (annotator and
  label) after the bias, and the sweep runs on the same native kernel
  (:func:`._native.ebcc_coo_rows`), over the tasks sorted by their first annotator (tasks that
  share annotators then find their table rows in cache); each restart still starts every task
  where it starts in the tasks' own order, so the fit is the one the XLA sums give (tested). On
  the 10,000-annotator crowd of ``benchmarks/speed.py`` at 1,000,000 tasks: 147 ms per sweep
  against 519 on the XLA sums on the 2-core AMD VM (session 20,
  ``benchmarks/ebcc_sparse.py``);
* the random starts come from a counter hash (threefry spent 0.74 s per restart at that size);
  on the native kernel they are drawn and summed inside it, never stored
  (:func:`._native.ebcc_start_counts`: the same draws);
* screening (``screen_iter``, ``keep``): every restart runs ``screen_iter`` sweeps, and only the
  ``keep`` best by ELBO run on to convergence. Off by default up to 1,000,000 answers (the
  reference protocol: every restart runs to the end; the tests against the reference figures
  use it), on past that (5 sweeps, keep 1). Its price, measured on the 9 shared datasets of at
  most 20,000 answers, 40 restarts, mean accuracy over seeds 0-2: full protocol 0.8545, 5/1
  0.8531, 20/4 0.8537 (reference 0.8549); the ELBO after a few sweeps ranks restarts poorly
  (zheng_face loses up to a point). A kept restart continues exactly where it stopped (tested).
* when restarts are screened and there are more than 100,000 tasks, screening runs on a
  sample of 50,000 tasks (``screen_tasks``, drawn in proportion to the rows' weights and
  reweighted to stand for the whole, each row starting where it starts in the whole), and the
  kept restart then runs on all rows from its start, so its result is the one it has unscreened
  (tested): 40 restarts' screening cost 34 s at 1,000,000 tasks on all rows, about 3 s on the
  sample;
* past 1,000,000 answers, sweeps are over-relaxed (``accelerate``, see :func:`_run`): a slow
  drift of the subtypes kept plain sweeps going for 240 to more than 500 sweeps at 1,000,000
  tasks; over-relaxed, 90-192 (the ELBO still never decreases; it stops at a fixed point of the
  same sweeps). With both, 40 restarts at 1,000,000 x 12 x 5 take 18.7-34.5 s on the 2-core VM
  with the XLA sweeps (26.6 s with compilation; the protocol before them: 74-89 s), and 5.5-8.2 s
  on the native kernel (session 19), ``benchmarks/ebcc_speed.py --native on|off``.

References:
    Y. Li, B. Rubinstein, T. Cohn. Exploiting worker correlation for label aggregation in
    crowdsourcing. ICML 2019. Reference code: ``yuan-li/truth-inference-at-scale``
    (``code/ebcc.py``).

Example:
    >>> from crowdllm.aggregation import EBCC
    >>> model = EBCC(restarts=40, seed=0)
    >>> labels = model.fit_predict("answers.csv")  # doctest: +SKIP
    >>> model.elbos_  # the final ELBO of each restart  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pyarrow as pa

from ..labels import LabelTensor
from . import _fast, _native
from ._core import (CrowdData, Dense, choose_layout, fast_enabled, hash_uniform, normalize, prepare,
                    task_class_sum, task_count, worker_confusion)
from .base import Aggregator
from .ibcc import confusion_prior, dirichlet_stats, log_beta, n_answers

__all__ = ["EBCC", "EBCCState", "EBCCResult", "start", "init", "e_step", "step", "fit_one", "fit", "merge_patterns",
           "screening_sample"]


class EBCCState(NamedTuple):
    z: jax.Array  # [tasks, K] q(z) of the last sweep, the subtypes summed out
    n_km: jax.Array  # [K, M] expected counts of (class, subtype) from the last q(z, g), weighted
    n_wkml: jax.Array  # [workers, K, M, L] expected answer counts from the last q(z, g)
    used_km: jax.Array  # the counts the last sweep's q(tau), q(pi), q(V) came from: with
    used_wkml: jax.Array  # them, e_step rebuilds the last q(z, g) without storing [tasks, K, M]


class EBCCResult(NamedTuple):
    posteriors: jax.Array  # [tasks, K]: q(z), the subtypes summed out
    subtypes: jax.Array  # [tasks, K, M]: q(z, g)
    class_prior: jax.Array  # [K] E[tau]
    subtype_prior: jax.Array  # [K, M] E[pi]
    confusion: jax.Array  # [workers, K, L] E[V] averaged over subtypes with E[pi]
    objective: jax.Array  # final ELBO per answer of the kept restart
    elbos: jax.Array  # [restarts] last ELBO (per answer) of every restart
    best: jax.Array  # index of the kept restart
    history: jax.Array  # [max_iter] ELBO of the kept restart
    n_iter: jax.Array  # sweeps of the kept restart
    converged: jax.Array  # whether the kept restart met the stopping rule
    sweeps: jax.Array  # [restarts] sweeps each restart ran (screened-out ones stop early)


class _Priors(NamedTuple):
    alpha: jax.Array  # [K]
    eta0: jax.Array  # [K, M]
    beta: jax.Array  # [K, L]
    log_beta0: tuple  # log B of the three priors: scalar, [K], [K]


class _Loop(NamedTuple):
    objective: jax.Array
    history: jax.Array
    n_iter: jax.Array
    converged: jax.Array
    eta: jax.Array  # the next sweep's extrapolation factor (1: a plain sweep), with ``accelerate``


def _state_counts(col_sum: jax.Array, counts: jax.Array, K: int, M: int
                  ) -> tuple[jax.Array, jax.Array]:
    """``(n_km [K, M], n_wkml [W, K, M, L])`` from a fused pass's column sums ``[K * M]`` and
    counts ``[W, K * M, L]``."""
    return col_sum.reshape(K, M), counts.reshape(counts.shape[0], K, M, counts.shape[2])


def _counts(data: CrowdData, zg: jax.Array, weight: jax.Array) -> tuple[jax.Array, jax.Array]:
    T, K, M = zg.shape
    wz = zg * weight[:, None, None]
    n_wkml = worker_confusion(data, wz.reshape(T, K * M)).reshape(-1, K, M, data.n_classes)
    return wz.sum(axis=0), n_wkml


def start(data: CrowdData, key: jax.Array, n_subtypes: int, rows: jax.Array | None = None) -> jax.Array:
    """The random start ``q(z, g)``: majority-vote class fractions split over subtypes by a
    Dirichlet(1) draw per task and class (gold tasks: their class).

    ``rows`` (``[tasks]``): the row of a larger data set each task is; a task then gets the draw
    that row gets in the larger set's start, so a subsample starts where the whole does.
    """
    z = vote_fractions(data)
    # Dirichlet(1, ..., 1) = normalised independent Exp(1) draws (cheaper to compile than gamma).
    e = -jnp.log(hash_uniform(key, (data.n_tasks, data.n_classes, n_subtypes), z.dtype, rows))
    return z[:, :, None] * (e / e.sum(axis=2, keepdims=True))


def vote_fractions(data: CrowdData) -> jax.Array:
    """``[tasks, K]``: each task's majority-vote class fractions (gold tasks: their class), which
    :func:`start` splits over subtypes."""
    dtype = data.task_mask.dtype
    z = normalize(task_count(data, dtype))
    return jnp.where((data.gold >= 0)[:, None],
                     jax.nn.one_hot(jnp.maximum(data.gold, 0), data.n_classes, dtype=dtype), z)


def init(data: CrowdData, key: jax.Array, weight: jax.Array, n_subtypes: int,
         rows: jax.Array | None = None, native: _native.EbccRows | _native.EbccTiers | None = None
         ) -> EBCCState:
    """The state after the random start (:func:`start`); ``native``: the start drawn and its
    counts summed by the native kernel (:func:`._native.ebcc_start_counts`; the ``[tasks, K,
    M]`` start is never stored: 1,000,000 x 12 x 5, 10 subtypes, init 162 -> 42-48 ms a
    restart)."""
    if native is not None:
        z = vote_fractions(data)
        counts, csum = _native.ebcc_start_counts(native, weight, z, key, n_subtypes, rows)
        n_km, n_wkml = _state_counts(csum, counts, data.n_classes, n_subtypes)
        return EBCCState(z, n_km, n_wkml, n_km, n_wkml)
    zg = start(data, key, n_subtypes, rows)
    n_km, n_wkml = _counts(data, zg, weight)
    return EBCCState(zg.sum(axis=2), n_km, n_wkml, n_km, n_wkml)


def _expectations(priors: _Priors, n_km: jax.Array, n_wkml: jax.Array
                  ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """q(tau), q(pi), q(V) from the counts: ``(bias [K*M], log_table [W, K*M, L], kl)``.

    ``bias`` is E log tau_k + E log pi_km, ``log_table`` E log V, and ``kl`` the Dirichlet part of
    the ELBO (every term but the sum of log Z_t).
    """
    K, M = n_km.shape
    nu = priors.alpha + n_km.sum(axis=1)
    eta = priors.eta0 + n_km
    mu = priors.beta[None, :, None, :] + n_wkml
    (e_tau, lb_tau), (e_pi, lb_pi), (e_v, lb_v) = dirichlet_stats(nu, eta, mu)
    lb0_tau, lb0_pi, lb0_v = priors.log_beta0
    kl = lb_tau - lb0_tau + ((priors.alpha - nu) * e_tau).sum()
    kl += (lb_pi - lb0_pi + ((priors.eta0 - eta) * e_pi).sum(-1)).sum()
    per_worker = lb_v - lb0_v[None, :, None] + ((priors.beta[None, :, None, :] - mu) * e_v).sum(-1)
    return (e_tau[:, None] + e_pi).reshape(K * M), e_v.reshape(-1, K * M, e_v.shape[-1]), (kl, per_worker)


def e_step(data: CrowdData, bias: jax.Array, log_table: jax.Array, n_subtypes: int
           ) -> tuple[jax.Array, jax.Array]:
    """``q(z, g)`` ``[tasks, K, M]`` and ``log Z`` ``[tasks]`` (gold tasks: their class only)."""
    K = data.n_classes
    scores = bias[None] + task_class_sum(data, log_table)
    allowed = (data.gold < 0)[:, None] | (data.gold[:, None] == jnp.arange(K)[None])
    scores = jnp.where(jnp.repeat(allowed, n_subtypes, axis=1), scores, -jnp.inf)
    log_z = jax.nn.logsumexp(scores, axis=1)
    zg = jnp.exp(scores - log_z[:, None]).reshape(-1, K, n_subtypes)
    return zg, log_z


def step(data: CrowdData, state: EBCCState, *, weight: jax.Array, priors: _Priors,
         rows: _native.EbccRows | _native.EbccTiers | None = None
         ) -> tuple[EBCCState, jax.Array, jax.Array]:
    """One VB sweep: q(tau), q(pi), q(V) from the counts of q(z, g); then q(z, g) and its counts.

    Returns ``(state, ELBO per answer, dz)``, ``dz`` the largest move of a (weighted) task's
    class posterior. With ``rows`` (:func:`._native.ebcc_rows` of ``data``), the sweep runs on
    the native kernel (:func:`._native.ebcc_sweep`); else on a dense panel the E-step and the sums
    are one fused XLA pass (:func:`._fast.subtype_sweep`); elsewhere they are the reference sums.
    """
    K, M = state.n_km.shape
    bias, table, (kl, per_worker) = _expectations(priors, state.n_km, state.n_wkml)
    if rows is not None:
        z, ll, counts, csum, dz = _native.ebcc_sweep(rows, weight, bias, table, state.z, M)
        n_km, n_wkml = _state_counts(csum, counts, K, M)
    elif isinstance(data, Dense) and fast_enabled():
        z, ll, counts, csum, dz = _fast.subtype_sweep(data.labels, data.n_classes, M, weight,
                                                      data.gold, bias, table, state.z)
        n_km, n_wkml = _state_counts(csum, counts, K, M)
    else:
        zg, log_z = e_step(data, bias, table, M)
        n_km, n_wkml = _counts(data, zg, weight)
        z, ll = zg.sum(axis=2), (weight * log_z).sum()
        dz = jnp.where(weight[:, None] > 0, jnp.abs(z - state.z), 0.0).max()
    elbo = ll + kl + (per_worker.sum(axis=(1, 2)) * data.worker_mask).sum()
    new = EBCCState(z, n_km, n_wkml, state.n_km, state.n_wkml)
    return new, elbo / n_answers(data), dz


def _priors(data: CrowdData, weight: jax.Array, n_subtypes: int, alpha: float, a_pi: float,
            beta_diag: float, beta_off: float, empirical_prior: bool) -> _Priors:
    dtype = data.task_mask.dtype
    K = data.n_classes
    if empirical_prior:
        mv = normalize(task_count(data, dtype))
        alpha_k = (mv * weight[:, None]).sum(axis=0)
        alpha_k = jnp.maximum(alpha_k, 1e-3)  # a class nobody chose keeps a proper prior
    else:
        alpha_k = jnp.full((K,), alpha, dtype)
    eta0 = jnp.full((K, n_subtypes), a_pi / n_subtypes, dtype)
    beta = confusion_prior(K, beta_diag, beta_off, dtype)
    return _Priors(alpha=alpha_k, eta0=eta0, beta=beta,
                   log_beta0=(log_beta(alpha_k), log_beta(eta0), log_beta(beta)))


#: ``accelerate``: the extrapolation factor doubles after every accepted sweep, up to this.
ETA_MAX = 16.0


def _run(data: CrowdData, weight: jax.Array, priors: _Priors, state: EBCCState, loop: _Loop, *,
         until: int, tol: float, atol: float, accelerate: bool = False,
         rows: _native.EbccRows | None = None) -> tuple[EBCCState, _Loop]:
    """Sweep until ``until`` sweeps in all, or the stopping rule (see :func:`fit_one`); ``rows``:
    the sweeps run on the native kernel (see :func:`step`).

    ``accelerate``: adaptive over-relaxation (Salakhutdinov & Roweis, ICML 2003) of the counts
    the ELBO is a function of. A sweep starts from ``used + eta * (n - used)`` (``used`` the
    counts of the last accepted sweep, ``n`` the counts its ``q(z, g)`` gives, clipped at 0) instead
    of ``n``; it is accepted if its ELBO is at least the last accepted one, and then ``eta``
    doubles (up to :data:`ETA_MAX`); else the state stays and the next sweep is a plain one
    (``eta = 1``), which VB guarantees not to lower the ELBO. The fixed points are VB's; the
    ELBO of the accepted sweeps never decreases. The stopping rule looks at accepted sweeps only,
    and divides an extrapolated sweep's move of ``q(z)`` by ``eta`` (about the move a plain sweep
    from there makes, which is what the rule bounds).
    """

    def cond(c):
        return (c[1].n_iter < until) & ~c[1].converged

    def body(c):
        st, lp = c
        point, plain = st, True
        if accelerate:
            plain = lp.eta <= 1.0

            def extrapolate(used, n):
                return jnp.where(plain, n, jnp.maximum(used + lp.eta * (n - used), 0.0))

            point = st._replace(n_km=extrapolate(st.used_km, st.n_km),
                                n_wkml=extrapolate(st.used_wkml, st.n_wkml))
        new, obj, dz = step(data, point, weight=weight, priors=priors, rows=rows)
        gain = obj - lp.objective
        eta = lp.eta
        if accelerate:
            ok = plain | (gain >= 0)
            new = jax.tree_util.tree_map(lambda a, b: jnp.where(ok, a, b), new, st)
            obj = jnp.where(ok, obj, lp.objective)
            eta = jnp.where(ok, jnp.minimum(2.0 * lp.eta, ETA_MAX), 1.0).astype(lp.eta.dtype)
            # an extrapolated sweep moves q(z) about eta times as far as a plain one would
            done = ok & ((gain < tol) | (dz <= atol * jnp.where(plain, 1.0, lp.eta)))
        else:
            done = (gain < tol) | (dz <= atol)
        return new, _Loop(obj, lp.history.at[lp.n_iter].set(obj), lp.n_iter + 1, done, eta)

    return jax.lax.while_loop(cond, body, (state, loop))


def _new_loop(max_iter: int, dtype: Any) -> _Loop:
    return _Loop(jnp.asarray(-jnp.inf, dtype), jnp.zeros((max(max_iter, 1),), dtype),
                 jnp.asarray(0, jnp.int32), jnp.asarray(False), jnp.asarray(1.0, dtype))


def fit_one(data: CrowdData, key: jax.Array, weight: jax.Array, priors: _Priors, *,
            n_subtypes: int, max_iter: int, tol: float, atol: float,
            accelerate: bool = False, rows: _native.EbccRows | None = None,
            origin: jax.Array | None = None) -> tuple[EBCCState, _Loop]:
    """One restart from ``key``, run to the end (``origin``: see :func:`fit`).

    Stops after the first sweep whose ELBO (per answer) gains less than ``tol``, or whose class
    posteriors move by at most ``atol`` anywhere (the reference code's rule), or at ``max_iter``.
    """
    state = init(data, key, weight, n_subtypes, origin, native=rows)
    return _run(data, weight, priors, state, _new_loop(max_iter, state.z.dtype), until=max_iter,
                tol=tol, atol=atol, accelerate=accelerate, rows=rows)


def _in_chunks(fn, xs: Any, n: int, batch: int) -> Any:
    """``vmap(fn)`` over the leading axis (length ``n``) of ``xs``, ``batch`` at a time (a
    ``lax.scan`` over chunks, the last one padded by repeating the first item)."""
    B = max(1, min(batch, n))
    n_chunks = -(-n // B)

    def pad(x):
        x = jnp.concatenate([x, jnp.broadcast_to(x[:1], (n_chunks * B - n,) + x.shape[1:])])
        return x.reshape((n_chunks, B) + x.shape[1:])

    _, ys = jax.lax.scan(lambda c, x: (c, jax.vmap(fn)(x)), None, jax.tree_util.tree_map(pad, xs))
    return jax.tree_util.tree_map(lambda y: y.reshape((n_chunks * B,) + y.shape[2:])[:n], ys)


def _or_lowest(elbo: jax.Array) -> jax.Array:
    """ELBOs to rank restarts by: a non-finite one (a failed restart) ranks last."""
    return jnp.where(jnp.isfinite(elbo), elbo, -jnp.inf)


def _light(state: EBCCState) -> EBCCState:
    """A state without its ``[tasks, K]`` posteriors (rebuilt by :func:`_resume`)."""
    return state._replace(z=jnp.zeros((0,), state.z.dtype))


def _last_q(data: CrowdData, priors: _Priors, state: EBCCState,
            rows: _native.EbccRows | None = None) -> jax.Array:
    """The ``q(z, g)`` of the state's last sweep, rebuilt from the counts that sweep used (on
    the native kernel with ``rows``)."""
    bias, table, _ = _expectations(priors, state.used_km, state.used_wkml)
    if rows is not None:
        return _native.ebcc_posteriors(rows, bias, table, state.n_km.shape[1])
    return e_step(data, bias, table, state.n_km.shape[1])[0]


def _resume(data: CrowdData, priors: _Priors, state: EBCCState,
            rows: _native.EbccRows | None = None) -> EBCCState:
    return state._replace(z=_last_q(data, priors, state, rows).sum(axis=2))


@functools.partial(jax.jit, static_argnames=("n_subtypes", "max_iter", "restarts", "restart_batch",
                                             "empirical_prior", "screen_iter", "keep", "accelerate",
                                             "native", "native_width", "native_sample_width",
                                             "native_special"))
def fit(data: CrowdData, key: jax.Array, weight: jax.Array | None = None, *, n_subtypes: int = 10,
        restarts: int = 1, restart_batch: int = 8, max_iter: int = 500, tol: float = 1e-6,
        atol: float = 1e-3, alpha: float = 1.0, a_pi: float = 0.1, beta_diag: float = 4.0,
        beta_off: float = 1.0, empirical_prior: bool = True, screen_iter: int | None = None,
        keep: int = 1, screen_on: tuple[CrowdData, jax.Array, jax.Array] | None = None,
        accelerate: bool = False, native: bool = False,
        native_width: _native.RowWidth | None = None,
        native_sample_width: _native.RowWidth | None = None, origin: jax.Array | None = None,
        native_special: bool = True) -> EBCCResult:
    """Fit EBCC from ``restarts`` independent keys and keep the best final ELBO.

    Restart ``r`` starts from ``jax.random.split(key, restarts)[r]``; restarts run ``vmap``-ed in
    chunks of ``restart_batch`` (a ``lax.scan`` over chunks; between chunks only each restart's
    counts are kept, not its posteriors). Each restart's result does not depend on the others
    (tested).

    With ``screen_iter``, every restart first runs at most ``screen_iter`` sweeps; only the
    ``keep`` restarts with the best ELBO at that point run on to ``max_iter`` or convergence (the
    ELBO never decreases, so a dropped restart's last ELBO is below every kept one's final ELBO).
    Without it, every restart runs to the end.

    ``screen_on = (sample, sample_weight, rows)`` screens on a sample of the rows instead:
    ``sample`` is prepared data whose task ``i`` is row ``rows[i]`` of ``data``, weighted so that
    it stands for the whole (see :func:`screening_sample`). Every restart runs ``screen_iter``
    sweeps on the sample from its own start restricted to those rows, and the ``keep`` best by
    the sample's ELBO run on ``data`` from their start to the end, so a kept restart's result is
    the one it has without screening. A dropped restart's ``elbos`` is then NaN (its ELBO on the
    sample does not compare) and its ``sweeps`` those it ran on the sample.

    Args:
        data: the answers (``prepare``).
        key: PRNG key.
        weight: ``[tasks]`` how many tasks each row stands for (merged patterns); default the
            task mask.
        native: run the sweeps on the native kernel (:func:`._native.ebcc_sweep`; float32
            data, where :func:`._native.use` says it applies).
        native_width: on the COO layout with ``native``, the rows' widths: 1 + the most
            answers a task has (:func:`._native.coo_row_width`), or tiers of widths
            (:func:`._native.coo_tiers`); native_sample_width: the screening sample's (the same
            as ``native_width`` where None).
        origin: ``[tasks]`` the task each task of ``data`` was before they were reordered
            (``EBCC`` sorts a sparse crowd's tasks for the native kernel): each restart then
            starts every task where it starts in the original order, so the fit is the one the
            original order gets. None: not reordered.
        native_special: digamma and gammaln may run as the native call
            (``ibcc.digamma_gammaln``; ``EBCC(native="off")``: not).
    """
    with _native.special_calls(native_special):
        dtype = data.task_mask.dtype
        weight = data.task_mask if weight is None else weight.astype(dtype) * data.task_mask
        priors = _priors(data, weight, n_subtypes, alpha, a_pi, beta_diag, beta_off,
                         empirical_prior)
        columns = data.n_classes * n_subtypes
        rows = _native.ebcc_rows(data, native_width, columns) if native else None
        opts = dict(tol=tol, atol=atol, accelerate=accelerate)
        screening = screen_iter is not None and screen_iter < max_iter and keep < restarts

        keys = jax.random.split(key, restarts)
        if screening and screen_on is not None:
            sample, sample_weight, rows_in_whole = screen_on
            sample_weight = sample_weight.astype(dtype) * sample.task_mask
            sample_rows = (_native.ebcc_rows(sample, native_sample_width or native_width, columns)
                           if native else None)

            def on_sample(k):
                state = init(sample, k, sample_weight, n_subtypes, rows_in_whole, sample_rows)
                return _run(sample, sample_weight, priors, state, _new_loop(max_iter, dtype),
                            until=screen_iter, rows=sample_rows, **opts)[1]

            loops = _in_chunks(on_sample, keys, restarts, restart_batch)
            top = jnp.argsort(-_or_lowest(loops.objective))[:keep]

            def whole(k):
                state, loop = fit_one(data, k, weight, priors, n_subtypes=n_subtypes,
                                      max_iter=max_iter, rows=rows, origin=origin, **opts)
                return _light(state), loop

            s2, l2 = _in_chunks(whole, keys[top], keep, restart_batch)
            # a dropped restart's ELBO on the sample does not compare with ELBOs on the whole
            loops = loops._replace(objective=jnp.full_like(loops.objective, jnp.nan))
            loops = jax.tree_util.tree_map(lambda a, b: a.at[top].set(b), loops, l2)
            i = jnp.argmax(_or_lowest(l2.objective))
            state, loop = jax.tree_util.tree_map(lambda x: x[i], (s2, l2))
            return _result(data, priors, state, loop, loops, top[i].astype(jnp.int32), rows)

        def first(k):
            state = init(data, k, weight, n_subtypes, origin, native=rows)
            until = screen_iter if screening else max_iter
            state, loop = _run(data, weight, priors, state, _new_loop(max_iter, dtype), until=until,
                               rows=rows, **opts)
            return _light(state), loop

        states, loops = _in_chunks(first, keys, restarts, restart_batch)
        if screening:
            top = jnp.argsort(-_or_lowest(loops.objective))[:keep]

            def more(x):
                state, loop = x
                state, loop = _run(data, weight, priors, _resume(data, priors, state, rows), loop,
                                   until=max_iter, rows=rows, **opts)
                return _light(state), loop

            picked = jax.tree_util.tree_map(lambda x: x[top], (states, loops))
            s2, l2 = _in_chunks(more, picked, keep, restart_batch)
            states, loops = jax.tree_util.tree_map(lambda a, b: a.at[top].set(b), (states, loops),
                                                   (s2, l2))
        best = jnp.argmax(_or_lowest(loops.objective)).astype(jnp.int32)
        state, loop = jax.tree_util.tree_map(lambda x: x[best], (states, loops))
        return _result(data, priors, state, loop, loops, best, rows)


def _result(data: CrowdData, priors: _Priors, state: EBCCState, loop: _Loop, loops: _Loop,
            best: jax.Array, rows: _native.EbccRows | None = None) -> EBCCResult:
    """The kept restart's result (``state``, ``loop``), with every restart's ``loops``
    (its posteriors rebuilt on the native kernel with ``rows``)."""
    zg = _last_q(data, priors, state, rows)
    nu = priors.alpha + state.n_km.sum(axis=1)
    eta = priors.eta0 + state.n_km
    mu = priors.beta[None, :, None, :] + state.n_wkml
    e_pi = eta / eta.sum(axis=1, keepdims=True)
    e_v = mu / mu.sum(axis=-1, keepdims=True)
    return EBCCResult(posteriors=zg.sum(axis=2), subtypes=zg, class_prior=nu / nu.sum(),
                      subtype_prior=e_pi, confusion=jnp.einsum("km,wkml->wkl", e_pi, e_v,
                                                             precision=jax.lax.Precision.HIGHEST),
                      objective=loop.objective, elbos=loops.objective, best=best, history=loop.history,
                      n_iter=loop.n_iter, converged=loop.converged, sweeps=loops.n_iter)


def merge_patterns(tensor: LabelTensor, gold: np.ndarray | None) -> tuple[LabelTensor, np.ndarray, np.ndarray, np.ndarray | None]:
    """Merge the tasks of a panel that have the same answers (and gold) into one weighted row.

    Returns ``(patterns, counts, inverse, pattern_gold)``: ``patterns`` a label tensor with one
    task per distinct answer row, ``counts[p]`` how many tasks it stands for, ``inverse[t]`` the
    pattern of task ``t``. Patterns come in ascending order of their code (each task's answers
    plus one, and its gold plus one, as digits in base ``K + 1``, the first annotator lowest).

    Where the codes stay below 2 ** 53 (12 annotators with up to 14 classes, gold included),
    they are one float64 ``bincount`` over the answers, exact, and a hash pass (pyarrow's
    ``dictionary_encode``) finds the distinct ones; else numpy's sort-based ``unique`` on the
    dense rows. 10,000,000 x 12 x 5 (2,258,887 patterns) on the 2-core AMD VM: 4.1-5.3 s against
    7.2-8.0 s for numpy's unique of the int64 codes; 1,000,000: 0.52-0.99 s against 0.66-0.76.
    """
    base = max(tensor.n_classes + 1, 2)
    n_cols = tensor.n_workers + (gold is not None)
    if n_cols * np.log2(base) < 53 and not tensor.has_repeats:
        return _merge_by_hash(tensor, gold, base, n_cols)
    dense = tensor.dense(np.int16).astype(np.int64)
    cols = [dense] if gold is None else [dense, np.asarray(gold, np.int64)[:, None]]
    rows = np.concatenate(cols, axis=1) + 1  # 0 = no answer / no gold
    base = max(tensor.n_classes + 1, 2)
    if rows.shape[1] * np.log2(base) < 62:  # one int64 code per row: a fast 1-d unique
        code = rows @ (base ** np.arange(rows.shape[1], dtype=np.int64))
        _, first, inverse, counts = np.unique(code, return_index=True, return_inverse=True,
                                              return_counts=True)
    else:
        _, first, inverse, counts = np.unique(rows, axis=0, return_index=True, return_inverse=True,
                                              return_counts=True)
    pat = dense[first]
    patterns = LabelTensor.from_dense(pat, classes=list(tensor.classes),
                                      worker_ids=list(tensor.worker_ids))
    pgold = None if gold is None else np.asarray(gold, np.int32)[first]
    return patterns, counts.astype(np.float64), inverse.reshape(-1), pgold


def _merge_by_hash(tensor: LabelTensor, gold: np.ndarray | None, base: int, n_cols: int
                   ) -> tuple[LabelTensor, np.ndarray, np.ndarray, np.ndarray | None]:
    """:func:`merge_patterns` where every code is below 2 ** 53 (the same result)."""
    W = tensor.n_workers
    place = base ** np.arange(n_cols, dtype=np.int64)
    digit = place.astype(np.float64)[tensor.worker]  # one float64 per answer, no int64 copy
    digit *= tensor.label + 1
    code = np.bincount(tensor.task, weights=digit, minlength=tensor.n_tasks).astype(np.int64)
    if gold is not None:
        code += (np.asarray(gold, np.int64) + 1) * place[W]
    enc = pa.array(code).dictionary_encode()
    uniq = enc.dictionary.to_numpy(zero_copy_only=False)
    order = np.argsort(uniq)  # ascending codes, as numpy's unique gives them
    rank = np.empty(len(order), np.int64)
    rank[order] = np.arange(len(order))
    inverse = rank[enc.indices.to_numpy(zero_copy_only=False)]
    uniq = uniq[order]
    counts = np.bincount(inverse, minlength=len(uniq))
    digits = uniq[:, None] // place[None] % base - 1
    patterns = LabelTensor.from_dense(digits[:, :W], classes=list(tensor.classes),
                                      worker_ids=list(tensor.worker_ids))
    pgold = None if gold is None else digits[:, W].astype(np.int32)
    return patterns, counts.astype(np.float64), inverse, pgold


def reorder_tasks(tensor: LabelTensor, counts: np.ndarray, gold: np.ndarray | None,
                  order: np.ndarray) -> tuple[LabelTensor, np.ndarray, np.ndarray | None]:
    """The tasks in another order: task ``i`` of the result is task ``order[i]`` (with its
    answers, counts and gold); ``order`` a permutation of the tasks. The answers come grouped by
    their new task, each task's in their own order (as ``prepare``'s stable sort would put them,
    which then has nothing to sort: at 30M answers that sort took 3.5 s)."""
    rank = np.empty(len(order), np.int64)
    rank[order] = np.arange(len(order))
    task = np.asarray(tensor.task)
    if task.size and np.all(task[1:] >= task[:-1]):  # grouped by task: move whole runs
        c = np.bincount(task, minlength=len(order))
        start, c_new = np.cumsum(c) - c, c[order]
        idx = np.int32 if task.size < 2**31 else np.int64  # (half the memory of int64)
        perm = np.repeat((start[order] - (np.cumsum(c_new) - c_new)).astype(idx), c_new)
        perm += np.arange(task.size, dtype=idx)
        new_task = np.repeat(np.arange(len(order), dtype=np.int32), c_new)  # (no gather)
    else:
        perm = np.argsort(rank[task], kind="stable")
        new_task = rank[task[perm]].astype(np.int32)
    out = dataclasses.replace(
        tensor, task=new_task, worker=tensor.worker[perm],
        label=tensor.label[perm], probs=None if tensor.probs is None else tensor.probs[perm],
        task_ids=tensor.task_ids[order],
        gold=None if tensor.gold is None else tensor.gold[order])
    return (out, np.asarray(counts)[order],
            None if gold is None else np.asarray(gold)[order])


def screening_sample(tensor: LabelTensor, counts: np.ndarray, n_draw: int, seed: int
                     ) -> tuple[LabelTensor, np.ndarray, np.ndarray]:
    """The rows to screen restarts on: ``n_draw`` tasks drawn with replacement (row ``r`` stands for
    ``counts[r]`` tasks), each drawn row weighted by how often it was drawn times ``N / n_draw``
    (``N`` the tasks in all), so the sample's counts estimate the whole's without bias.

    Returns ``(sample, weight, rows)``: the drawn rows as a label tensor (task ``i`` is row
    ``rows[i]`` of ``tensor``, with its gold), and their weights.
    """
    counts = np.asarray(counts, np.float64)
    drawn = np.random.default_rng(seed).multinomial(n_draw, counts / counts.sum())
    rows = np.flatnonzero(drawn)
    pos = np.full(tensor.n_tasks, -1, np.int64)
    pos[rows] = np.arange(len(rows))
    keep = pos[tensor.task] >= 0
    sample = dataclasses.replace(
        tensor, task=pos[tensor.task[keep]].astype(np.int32), worker=tensor.worker[keep],
        label=tensor.label[keep], task_ids=tensor.task_ids[rows],
        gold=None if tensor.gold is None else tensor.gold[rows],
        probs=None if tensor.probs is None else tensor.probs[keep])
    return sample, drawn[rows] * (counts.sum() / n_draw), rows


def _padded(values: np.ndarray, n: int, dtype: Any) -> jax.Array:
    """``values`` followed by zeros up to length ``n`` (the padded task axis of prepared data)."""
    out = np.zeros(n, np.asarray(values).dtype)
    out[: len(values)] = values
    return jnp.asarray(out, dtype)


#: ``screen_iter="auto"``: screen the restarts (``AUTO_SCREEN_ITER`` sweeps, keep ``AUTO_KEEP``)
#: when the rows to fit carry more than ``AUTO_SCREEN_ANSWERS`` answers, else run every restart
#: to the end (the reference protocol). See the module docstring for the measurements.
AUTO_SCREEN_ANSWERS = 1_000_000
AUTO_SCREEN_ITER = 5
AUTO_KEEP = 1
#: ``screen_tasks="auto"``: screen on a sample of this many tasks when there are twice as many.
AUTO_SCREEN_TASKS = 50_000


class EBCC(Aggregator):
    """Enhanced Bayesian classifier combination (Li, Rubinstein & Cohn, ICML 2019).

    Args:
        n_subtypes: latent subtypes per class, ``M`` (reference: 10).
        restarts: independent random starts; the best final ELBO is kept (reference: 40).
        restart_batch: restarts run together (``vmap``) per chunk; bounds memory. Default: 8 for
            the dense layout on the XLA sweep (matrix products batch well), 1 for COO
            (scatter-adds do not) and for the native kernel.
        seed: PRNG seed of the restarts.
        alpha: Dirichlet concentration of the class proportions (unless ``empirical_prior``).
        a_pi: total Dirichlet concentration of each class's subtype proportions (reference: 0.1).
        beta_diag, beta_off: Dirichlet parameters of the confusion rows (reference: 4 and 1).
        empirical_prior: class-proportion prior = majority-vote class counts (reference: on).
        max_iter: the most VB sweeps per restart.
        screen_iter, keep: screening of the restarts: all of them run ``screen_iter`` sweeps,
            then only the ``keep`` best by ELBO (default 1) run on to the end. None: every
            restart runs to the end (the reference protocol). ``auto``: None up to
            ``AUTO_SCREEN_ANSWERS`` answers (after merging rows), else ``AUTO_SCREEN_ITER``
            sweeps, keep 1. See the module docstring for what screening costs in accuracy and
            saves in time.
        screen_tasks: screen on a sample of this many tasks (:func:`screening_sample`) instead of
            all of them; the kept restarts then run on all tasks from their start (their result
            is the one they have without screening). None: screen on all tasks (a kept restart
            continues where screening stopped). ``auto``: ``AUTO_SCREEN_TASKS`` when there are
            more than twice as many tasks.
        accelerate: adaptive over-relaxation of the VB sweeps (see :func:`_run`): the same fixed
            points and a never-decreasing ELBO in fewer sweeps, along another path (so possibly
            another local optimum than plain sweeps from the same start). ``auto``: on past
            ``AUTO_SCREEN_ANSWERS`` answers (after merging rows), off below (the reference
            protocol).
        tol: stop a restart when its ELBO (per answer) gains less than this (None: never; float32
            rounding noise in the ELBO can stop a restart early, so the default relies on atol)...
        atol: ... or when no class posterior moves by more than this (reference: 1e-3).
        merge: merge identical answer rows of a dense panel (``auto``: when the panel is dense).
        layout: ``auto``, ``coo`` or ``dense``.
        dtype: ``float32`` or ``float64``.
        native: ``auto`` (default), ``on`` or ``off``: as for
            :class:`~crowdllm.aggregation.DawidSkene`. On float32 data on AVX2 CPUs (at most
            256 classes x subtypes) the sweeps run on the native kernel
            (:func:`._native.ebcc_sweep`), restarts one after another (``restart_batch``
            default 1 there: the kernel uses every core, and a batch of restarts sweeps until
            its slowest stops): dense panels, and sparse crowds (COO) of at most 65,534
            annotators x labels whose rows (as wide as the task with the most answers) are at
            most 4 times their answers. Elsewhere (``auto``) the VB steps' digamma and gammaln
            still run as one native call on CPU; ``off`` runs no native code at all.

    Attributes (after fit):
        errors_: ``[workers, K, L]`` expected confusion matrices (subtypes averaged).
        priors_: ``[K]`` expected class proportions.
        skills_: ``[workers]`` expected accuracy.
        elbos_: ``[restarts]`` final ELBO (per answer) of every restart (NaN: dropped by screening
            on a sample, or a restart whose ELBO was not finite); ``best_restart_``.
        subtypes_: ``[tasks, K, M]`` posterior over (class, subtype).
        native_used_: whether the native kernel ran the sweeps.
    """

    name = "ebcc"
    description = "EBCC: Bayesian classifier combination with latent subtypes (VB, best of restarts)"
    supports_gold = True
    iterative = True

    def __init__(self, n_subtypes: int = 10, restarts: int = 40, restart_batch: int | None = None,
                 seed: int = 0, alpha: float = 1.0, a_pi: float = 0.1, beta_diag: float = 4.0,
                 beta_off: float = 1.0, empirical_prior: bool = True, max_iter: int = 500,
                 tol: float | None = None, atol: float = 1e-3, screen_iter: int | str | None = "auto",
                 keep: int | None = None, screen_tasks: int | str | None = "auto",
                 accelerate: bool | str = "auto", merge: str = "auto", layout: str = "auto",
                 dtype: str = "float32", native: str = "auto") -> None:
        self.native = _native.check_option(native)
        if n_subtypes < 1 or restarts < 1 or (restart_batch is not None and restart_batch < 1):
            raise ValueError("n_subtypes, restarts and restart_batch must be >= 1")
        if (keep is not None and keep < 1) or not (
                screen_iter is None or screen_iter == "auto" or (isinstance(screen_iter, int) and screen_iter >= 1)):
            raise ValueError(f"screen_iter must be 'auto', None or an int >= 1 and keep None or >= 1, "
                             f"got screen_iter={screen_iter!r}, keep={keep!r}")
        if not (screen_tasks is None or screen_tasks == "auto"
                or (isinstance(screen_tasks, int) and screen_tasks >= 1)):
            raise ValueError(f"screen_tasks must be 'auto', None or an int >= 1, got {screen_tasks!r}")
        if accelerate not in ("auto", True, False):
            raise ValueError(f"accelerate must be 'auto', True or False, got {accelerate!r}")
        self.screen_iter, self.keep, self.screen_tasks = screen_iter, keep, screen_tasks
        self.accelerate = accelerate
        if merge not in ("auto", "on", "off"):
            raise ValueError(f"merge must be 'auto', 'on' or 'off', got {merge!r}")
        self.n_subtypes, self.restarts, self.restart_batch = n_subtypes, restarts, restart_batch
        self.seed, self.alpha, self.a_pi = seed, alpha, a_pi
        self.beta_diag, self.beta_off, self.empirical_prior = beta_diag, beta_off, empirical_prior
        self.max_iter, self.tol, self.atol, self.merge = max_iter, tol, atol, merge
        self.layout, self.dtype = layout, dtype

    def _fit(self, tensor: LabelTensor, gold: np.ndarray | None) -> dict[str, Any]:
        layout = choose_layout(tensor, self.layout)
        merge = self.merge == "on" or (self.merge == "auto" and layout == "dense")
        inverse = None
        rows, counts, rgold = tensor, np.ones(tensor.n_tasks), gold
        if merge:
            rows, counts, inverse, rgold = merge_patterns(tensor, gold)
        f64 = self.dtype == "float64"
        with jax.enable_x64(f64):
            dtype = jnp.float64 if f64 else jnp.float32
            data = prepare(rows, layout=layout, gold=rgold, dtype=dtype)
            origin = None
            # width: a sparse crowd's row width where it runs on the kernel, else None
            self.native_used_, width = _native.coo_use(self.native, data, rows,
                                                       columns=data.n_classes * self.n_subtypes)
            fit_rows, fit_counts, fit_gold = rows, counts, rgold
            if width is not None:
                # the kernel's order: tasks sorted by their first annotator (the fit is the one
                # of the original order: each task starts where it starts there)
                order = _native.coo_task_order(rows.task, rows.worker, rows.n_tasks)
                fit_rows, fit_counts, fit_gold = reorder_tasks(rows, counts, rgold, order)
                data = prepare(fit_rows, layout=layout, gold=fit_gold, dtype=dtype)
                origin = _padded(order, data.n_tasks, jnp.int32)
                rank = np.empty_like(order)
                rank[order] = np.arange(len(order))
                inverse = rank if inverse is None else rank[inverse]
            weight = _padded(fit_counts, data.n_tasks, dtype)
            screen_iter, keep = self._screening(rows.n_answers)
            screen_on = sample_width = None
            n_draw = self._screen_draws(tensor.n_tasks)
            if screen_iter is not None and n_draw is not None:
                sample, sample_weight, sample_rows = screening_sample(rows, counts, n_draw, self.seed)
                sdata = prepare(sample, layout=layout, gold=None if rgold is None else rgold[sample_rows],
                                dtype=dtype)
                screen_on = (sdata, _padded(sample_weight, sdata.n_tasks, dtype),
                             _padded(sample_rows, sdata.n_tasks, jnp.int32))
                if width is not None:  # the sample's own rows (its busiest task may be left out)
                    sample_width = _native.coo_layout(sdata, sample,
                                                      columns=data.n_classes * self.n_subtypes)
            batch = self.restart_batch or (8 if layout == "dense" and not self.native_used_ else 1)
            res = fit(data, jax.random.key(self.seed), weight,
                      n_subtypes=self.n_subtypes, restarts=self.restarts,
                      restart_batch=batch, max_iter=self.max_iter,
                      tol=-np.inf if self.tol is None else self.tol, atol=self.atol, alpha=self.alpha, a_pi=self.a_pi, beta_diag=self.beta_diag,
                      beta_off=self.beta_off, empirical_prior=self.empirical_prior,
                      screen_iter=screen_iter, keep=keep, screen_on=screen_on,
                      accelerate=self._accelerate(rows.n_answers), native=self.native_used_,
                      native_width=width, native_sample_width=sample_width, origin=origin,
                      native_special=self.native != "off")
            res = jax.tree_util.tree_map(np.asarray, res)
        post, sub = res.posteriors[: rows.n_tasks], res.subtypes[: rows.n_tasks]
        if inverse is not None:
            post, sub = post[inverse], sub[inverse]
        errors = res.confusion[: tensor.n_workers]
        return {"probas": post, "subtypes": sub, "priors": res.class_prior,
                "subtype_priors": res.subtype_prior, "errors": errors,
                "skills": np.einsum("k,wkk->w", res.class_prior, errors), "elbos": res.elbos,
                "best_restart": int(res.best), "elbo": float(res.objective),
                "n_iter": int(res.n_iter), "converged": bool(res.converged), "history": res.history,
                "sweeps": res.sweeps}

    def _screening(self, n_answers: int) -> tuple[int | None, int]:
        """``(screen_iter, keep)`` for a fit of ``n_answers`` answers (``auto`` resolved)."""
        if self.screen_iter == "auto":
            if n_answers > AUTO_SCREEN_ANSWERS:
                return AUTO_SCREEN_ITER, self.keep or AUTO_KEEP
            return None, 1
        return self.screen_iter, self.keep or 1

    def _accelerate(self, n_answers: int) -> bool:
        if self.accelerate == "auto":
            return n_answers > AUTO_SCREEN_ANSWERS
        return bool(self.accelerate)

    def _screen_draws(self, n_tasks: int) -> int | None:
        """Tasks to draw for screening on a sample (``auto`` resolved); None: screen on all."""
        if self.screen_tasks == "auto":
            return AUTO_SCREEN_TASKS if n_tasks > 2 * AUTO_SCREEN_TASKS else None
        if self.screen_tasks is None or self.screen_tasks >= n_tasks:
            return None
        return self.screen_tasks

    def skills_table(self) -> pa.Table:
        cols: dict[str, Any] = {"worker": pa.array(self.workers_.tolist()),
                                "skill": pa.array(self.skills_, type=pa.float64())}
        classes = self.classes_.tolist()
        for k, ck in enumerate(classes):
            for l, cl in enumerate(classes):
                cols[f"p_{ck}_{cl}"] = pa.array(self.errors_[:, k, l], type=pa.float64())
        return pa.table(cols)
