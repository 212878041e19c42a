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

Making 40 restarts cheap: every restart shares the data on the device and the compiled kernel;
with the dense layout, tasks with the same answers (and gold) are merged into one weighted row
before fitting - the model is exchangeable over tasks, so the fixed points are the same (each
merged row starts from one subtype draw instead of one per task) - and both sums over answers
are matrix products with the ``[tasks, workers * classes]`` indicator, shared by all restarts.

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

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pyarrow as pa

from ..labels import LabelTensor
from ._core import CrowdData, choose_layout, normalize, prepare, task_class_sum, task_vote, worker_confusion
from .base import Aggregator
from .ibcc import confusion_prior, dirichlet_stats, log_beta, n_answers

__all__ = ["EBCC", "EBCCState", "EBCCResult", "init", "step", "fit_one", "fit", "merge_patterns"]


class EBCCState(NamedTuple):
    zg: jax.Array  # [tasks, K, M] q(z, g)
    n_km: jax.Array  # [K, M] expected counts of (class, subtype), task weights applied
    n_wkml: jax.Array  # [workers, K, M, L] expected answer counts


class EBCCResult(NamedTuple):
    posteriors: jax.Array  # [tasks, K]: q(z), the subtypes summed out
    subtypes: jax.Array  # [tasks, K, M]: q(z, g)
    class_prior: jax.Array  # [K] E[tau]
    subtype_prior: jax.Array  # [K, M] E[pi]
    confusion: jax.Array  # [workers, K, L] E[V] averaged over subtypes with E[pi]
    objective: jax.Array  # final ELBO per answer of the kept restart
    elbos: jax.Array  # [restarts] final ELBO (per answer) of every restart
    best: jax.Array  # index of the kept restart
    history: jax.Array  # [max_iter] ELBO of the kept restart
    n_iter: jax.Array
    converged: jax.Array


class _Priors(NamedTuple):
    alpha: jax.Array  # [K]
    eta0: jax.Array  # [K, M]
    beta: jax.Array  # [K, L]
    log_beta0: tuple  # log B of the three priors: scalar, [K], [K]


def _counts(data: CrowdData, zg: jax.Array, weight: jax.Array) -> tuple[jax.Array, jax.Array]:
    T, K, M = zg.shape
    wz = zg * weight[:, None, None]
    n_wkml = worker_confusion(data, wz.reshape(T, K * M)).reshape(-1, K, M, data.n_classes)
    return wz.sum(axis=0), n_wkml


def init(data: CrowdData, key: jax.Array, weight: jax.Array, n_subtypes: int) -> EBCCState:
    """Majority-vote class fractions split over subtypes by a Dirichlet(1) draw per task and class."""
    dtype = data.task_mask.dtype
    K = data.n_classes
    z = normalize(task_vote(data, data.worker_mask.astype(dtype)))
    z = jnp.where((data.gold >= 0)[:, None],
                  jax.nn.one_hot(jnp.maximum(data.gold, 0), K, dtype=dtype), z)
    # Dirichlet(1, ..., 1) = normalised independent Exp(1) draws (cheaper to compile than gamma).
    e = jax.random.exponential(key, (data.n_tasks, K, n_subtypes), dtype)
    split = e / e.sum(axis=2, keepdims=True)
    zg = z[:, :, None] * split
    return EBCCState(zg, *_counts(data, zg, weight))


def step(data: CrowdData, state: EBCCState, *, weight: jax.Array,
         priors: _Priors) -> tuple[EBCCState, jax.Array]:
    """q(tau), q(pi), q(V) from the counts of q(z, g); then q(z, g); returns the ELBO per answer."""
    T, K, M = state.zg.shape
    nu = priors.alpha + state.n_km.sum(axis=1)
    eta = priors.eta0 + state.n_km
    mu = priors.beta[None, :, None, :] + state.n_wkml
    (e_tau, lb_tau), (e_pi, lb_pi), (e_v, lb_v) = dirichlet_stats(nu, eta, mu)
    scores = (e_tau[:, None] + e_pi).reshape(1, K * M) + task_class_sum(data, e_v.reshape(-1, K * M, data.n_classes))
    allowed = (data.gold < 0)[:, None] | (data.gold[:, None] == jnp.arange(K)[None])
    scores = jnp.where(jnp.repeat(allowed, M, axis=1), scores, -jnp.inf)
    log_z = jax.nn.logsumexp(scores, axis=1)
    zg = jnp.exp(scores - log_z[:, None]).reshape(T, K, M)
    n_km, n_wkml = _counts(data, zg, weight)
    lb0_tau, lb0_pi, lb0_v = priors.log_beta0
    elbo = (weight * log_z).sum()
    elbo += lb_tau - lb0_tau + ((priors.alpha - nu) * e_tau).sum()
    elbo += (lb_pi - lb0_pi + ((priors.eta0 - eta) * e_pi).sum(-1)).sum()
    per_worker = lb_v - lb0_v[None, :, None] + ((priors.beta[None, :, None, :] - mu) * e_v).sum(-1)
    elbo += (per_worker.sum(axis=(1, 2)) * data.worker_mask).sum()
    return EBCCState(zg, n_km, n_wkml), elbo / n_answers(data)


def _priors(data: CrowdData, weight: jax.Array, n_subtypes: int, alpha: float, a_pi: float,
            beta_diag: float, beta_off: float, empirical_prior: bool) -> _Priors:
    dtype = data.task_mask.dtype
    K = data.n_classes
    if empirical_prior:
        mv = normalize(task_vote(data, data.worker_mask.astype(dtype)))
        alpha_k = (mv * weight[:, None]).sum(axis=0)
        alpha_k = jnp.maximum(alpha_k, 1e-3)  # a class nobody chose keeps a proper prior
    else:
        alpha_k = jnp.full((K,), alpha, dtype)
    eta0 = jnp.full((K, n_subtypes), a_pi / n_subtypes, dtype)
    beta = confusion_prior(K, beta_diag, beta_off, dtype)
    return _Priors(alpha=alpha_k, eta0=eta0, beta=beta,
                   log_beta0=(log_beta(alpha_k), log_beta(eta0), log_beta(beta)))


class _Loop(NamedTuple):
    objective: jax.Array
    history: jax.Array
    n_iter: jax.Array
    converged: jax.Array


def fit_one(data: CrowdData, key: jax.Array, weight: jax.Array, priors: _Priors, *,
            n_subtypes: int, max_iter: int, tol: float, atol: float) -> tuple[EBCCState, _Loop]:
    """One restart from ``key``.

    Stops after the first sweep whose ELBO (per answer) gains less than ``tol``, or whose class
    posteriors move by at most ``atol`` anywhere (the reference code's rule), or at ``max_iter``.
    """
    state = init(data, key, weight, n_subtypes)
    mask = data.task_mask[:, None] > 0
    dtype = data.task_mask.dtype

    def cond(c):
        return (c[2] < max_iter) & ~c[3]

    def body(c):
        st, prev, i, _, hist = c
        new, obj = step(data, st, weight=weight, priors=priors)
        dz = jnp.where(mask, jnp.abs(new.zg.sum(axis=2) - st.zg.sum(axis=2)), 0.0).max()
        done = ((obj - prev) < tol) | (dz <= atol)
        return new, obj, i + 1, done, hist.at[i].set(obj)

    carry = (state, jnp.asarray(-jnp.inf, dtype), jnp.asarray(0, jnp.int32), jnp.asarray(False),
             jnp.zeros((max(max_iter, 1),), dtype))
    st, obj, n, done, hist = jax.lax.while_loop(cond, body, carry)
    hist = jnp.where(jnp.arange(hist.shape[0]) < n, hist, obj)
    return st, _Loop(objective=obj, history=hist, n_iter=n, converged=done)


@functools.partial(jax.jit, static_argnames=("n_subtypes", "max_iter", "restarts", "restart_batch",
                                             "empirical_prior"))
def fit(data: CrowdData, key: jax.Array, weight: jax.Array | None = None, *, n_subtypes: int = 10,
        restarts: int = 1, restart_batch: int = 8, max_iter: int = 500, tol: float = 1e-6,
        atol: float = 1e-3, alpha: float = 1.0, a_pi: float = 0.1, beta_diag: float = 4.0,
        beta_off: float = 1.0, empirical_prior: bool = True) -> EBCCResult:
    """Fit EBCC ``restarts`` times from independent keys and keep the best final ELBO.

    Restart ``r`` starts from ``jax.random.split(key, restarts)[r]``; restarts run ``vmap``-ed in
    chunks of ``restart_batch`` (a ``lax.scan`` over chunks carries the best state so far, so
    memory holds one chunk). Each restart's result does not depend on the others (tested).

    Args:
        data: the answers (``prepare``).
        key: PRNG key.
        weight: ``[tasks]`` how many tasks each row stands for (merged patterns); default the
            task mask.
    """
    dtype = data.task_mask.dtype
    weight = data.task_mask if weight is None else weight.astype(dtype) * data.task_mask
    priors = _priors(data, weight, n_subtypes, alpha, a_pi, beta_diag, beta_off, empirical_prior)
    run = jax.vmap(functools.partial(fit_one, data, weight=weight, priors=priors,
                                     n_subtypes=n_subtypes, max_iter=max_iter, tol=tol, atol=atol))
    B = max(1, min(restart_batch, restarts))
    n_chunks = -(-restarts // B)
    keys = jax.random.split(key, restarts)
    keys = jnp.concatenate([keys, jnp.broadcast_to(keys[:1], (n_chunks * B - restarts,) + keys.shape[1:])])
    valid = (jnp.arange(n_chunks * B) < restarts).reshape(n_chunks, B)
    keys = keys.reshape((n_chunks, B) + keys.shape[1:])

    def chunk(best, xs):
        ks, ok = xs
        states, loops = run(ks)
        obj = jnp.where(ok & jnp.isfinite(loops.objective), loops.objective, -jnp.inf)
        i = jnp.argmax(obj)
        pick = jax.tree_util.tree_map(lambda x: x[i], (states, loops))
        better = obj[i] > best[0]
        best = jax.tree_util.tree_map(lambda new, old: jnp.where(better, new, old),
                                      (obj[i], pick), best)
        return best, obj

    zeros = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape[1:], s.dtype),
                                   jax.eval_shape(run, keys[0]))
    (best_obj, (state, loop)), elbos = jax.lax.scan(
        chunk, (jnp.asarray(-jnp.inf, dtype), zeros), (keys, valid))
    elbos = elbos.reshape(-1)[:restarts]
    best = jnp.argmax(elbos).astype(jnp.int32)
    nu = priors.alpha + state.n_km.sum(axis=1)
    eta = priors.eta0 + state.n_km
    mu = priors.beta[None, :, None, :] + state.n_wkml
    e_pi = eta / eta.sum(axis=1, keepdims=True)
    e_v = mu / mu.sum(axis=-1, keepdims=True)
    return EBCCResult(posteriors=state.zg.sum(axis=2), subtypes=state.zg, class_prior=nu / nu.sum(),
                      subtype_prior=e_pi, confusion=jnp.einsum("km,wkml->wkl", e_pi, e_v),
                      objective=loop.objective, elbos=elbos, best=best, history=loop.history,
                      n_iter=loop.n_iter, converged=loop.converged)


def merge_patterns(tensor: LabelTensor, gold: np.ndarray | None) -> tuple[LabelTensor, np.ndarray, np.ndarray, np.ndarray | None]:
    """Merge the tasks of a panel that have the same answers (and gold) into one weighted row.

    Returns ``(patterns, counts, inverse, pattern_gold)``: ``patterns`` a label tensor with one
    task per distinct answer row, ``counts[p]`` how many tasks it stands for, ``inverse[t]`` the
    pattern of task ``t``.
    """
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


class EBCC(Aggregator):
    """Enhanced Bayesian classifier combination (Li, Rubinstein & Cohn, ICML 2019).

    Args:
        n_subtypes: latent subtypes per class, ``M`` (reference: 10).
        restarts: independent random starts; the best final ELBO is kept (reference: 40).
        restart_batch: restarts run together (``vmap``) per chunk; bounds memory. Default: 8 for
            the dense layout (matrix products batch well), 1 for COO (scatter-adds do not).
        seed: PRNG seed of the restarts.
        alpha: Dirichlet concentration of the class proportions (unless ``empirical_prior``).
        a_pi: total Dirichlet concentration of each class's subtype proportions (reference: 0.1).
        beta_diag, beta_off: Dirichlet parameters of the confusion rows (reference: 4 and 1).
        empirical_prior: class-proportion prior = majority-vote class counts (reference: on).
        max_iter: the most VB sweeps per restart.
        tol: stop a restart when its ELBO (per answer) gains less than this (None: never; float32
            rounding noise in the ELBO can stop a restart early, so the default relies on atol)...
        atol: ... or when no class posterior moves by more than this (reference: 1e-3).
        merge: merge identical answer rows of a dense panel (``auto``: when the panel is dense).
        layout: ``auto``, ``coo`` or ``dense``.
        dtype: ``float32`` or ``float64``.

    Attributes (after fit):
        errors_: ``[workers, K, L]`` expected confusion matrices (subtypes averaged).
        priors_: ``[K]`` expected class proportions.
        skills_: ``[workers]`` expected accuracy.
        elbos_: ``[restarts]`` final ELBO (per answer) of every restart; ``best_restart_``.
        subtypes_: ``[tasks, K, M]`` posterior over (class, subtype).
    """

    name = "ebcc"
    description = "EBCC: Bayesian classifier combination with latent subtypes (VB, best of restarts)"
    supports_gold = True
    iterative = True

    def __init__(self, n_subtypes: int = 10, restarts: int = 40, restart_batch: int | None = None,
                 seed: int = 0, alpha: float = 1.0, a_pi: float = 0.1, beta_diag: float = 4.0,
                 beta_off: float = 1.0, empirical_prior: bool = True, max_iter: int = 500,
                 tol: float | None = None, atol: float = 1e-3, merge: str = "auto", layout: str = "auto",
                 dtype: str = "float32") -> None:
        if n_subtypes < 1 or restarts < 1 or (restart_batch is not None and restart_batch < 1):
            raise ValueError("n_subtypes, restarts and restart_batch must be >= 1")
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
            weight = np.zeros(data.n_tasks)
            weight[: rows.n_tasks] = counts
            res = fit(data, jax.random.key(self.seed), jnp.asarray(weight, dtype),
                      n_subtypes=self.n_subtypes, restarts=self.restarts,
                      restart_batch=self.restart_batch or (8 if layout == "dense" else 1), max_iter=self.max_iter,
                      tol=-np.inf if self.tol is None else self.tol, atol=self.atol, alpha=self.alpha, a_pi=self.a_pi, beta_diag=self.beta_diag,
                      beta_off=self.beta_off, empirical_prior=self.empirical_prior)
            res = jax.tree_util.tree_map(np.asarray, res)
        post, sub = res.posteriors[: rows.n_tasks], res.subtypes[: rows.n_tasks]
        if inverse is not None:
            post, sub = post[inverse], sub[inverse]
        errors = res.confusion[: tensor.n_workers]
        return {"probas": post, "subtypes": sub, "priors": res.class_prior,
                "subtype_priors": res.subtype_prior, "errors": errors,
                "skills": np.einsum("k,wkk->w", res.class_prior, errors), "elbos": res.elbos,
                "best_restart": int(res.best), "elbo": float(res.objective),
                "n_iter": int(res.n_iter), "converged": bool(res.converged), "history": res.history}

    def skills_table(self) -> pa.Table:
        cols: dict[str, Any] = {"worker": pa.array(self.workers_.tolist()),
                                "skill": pa.array(self.skills_, type=pa.float64())}
        classes = self.classes_.tolist()
        for k, ck in enumerate(classes):
            for l, cl in enumerate(classes):
                cols[f"p_{ck}_{cl}"] = pa.array(self.errors_[:, k, l], type=pa.float64())
        return pa.table(cols)
