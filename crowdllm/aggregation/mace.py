r"""MACE: who is spamming, and how; fitted by EM or variational Bayes, with random restarts.

The generative story (Hovy et al., 2013). Each task's true class is uniform,
:math:`z_t \sim \mathrm{Cat}(1/K)`. On each answer, annotator :math:`w` knows the answer with
probability :math:`\theta_w` (then :math:`y_{tw} = z_t`) and otherwise spams
(:math:`s_{tw} = 1`), drawing the label from their own strategy :math:`\xi_w \in \Delta^{K-1}`:

.. math::
    P(y_{tw} = l \mid z_t = k) = \theta_w [l = k] + (1 - \theta_w)\,\xi_{wl},
    \qquad \theta_w \sim \mathrm{Beta}(a, b), \quad \xi_w \sim \mathrm{Dir}(\gamma).

Both variants alternate, in log space:

* E-step: :math:`\log q_t(k) = -\log K + \sum_{(t,w,l)} \log P(l \mid k) - \log Z_t` (gold tasks
  clamped to their label), and for every answer the posterior probability that it was *known*,
  :math:`\kappa_{tw} = q_t(y_{tw})\,\theta_w / (\theta_w + (1-\theta_w)\xi_{w y_{tw}})`; expected
  counts :math:`K_w = \sum_t \kappa_{tw}` (known), :math:`S_w = \sum_t (1 - \kappa_{tw})`
  (spammed) and :math:`C_{wl} = \sum_{t: y_{tw} = l} (1 - \kappa_{tw})` (spam strategy).
* EM M-step (``method="em"``): :math:`\theta_w = (K_w + \epsilon) / (K_w + S_w + 2\epsilon)`,
  :math:`\xi_{wl} \propto C_{wl} + \epsilon` - the MAP estimate under
  Beta(:math:`1+\epsilon, 1+\epsilon`) and Dir(:math:`1+\epsilon`) priors (:math:`\epsilon` =
  ``smoothing``, default :math:`0.01/K` as in crowd-kit). The objective is the log-likelihood of
  the answers plus that log prior density, per answer; EM never decreases it.
* VB M-step (``method="vb"``, default): :math:`q(\theta_w) = \mathrm{Beta}(a + K_w, b + S_w)`,
  :math:`q(\xi_w) = \mathrm{Dir}(\gamma + C_w)`, and the next E-step uses
  :math:`\exp E_q[\log\theta_w]`, :math:`\exp E_q[\log(1-\theta_w)]`, :math:`\exp E_q[\log\xi_{wl}]`
  (digamma differences). The objective is the evidence lower bound, per answer,
  :math:`\sum_t \log \tilde Z_t - \sum_w \mathrm{KL}(q(\theta_w) \| p(\theta_w)) +
  \mathrm{KL}(q(\xi_w) \| p(\xi_w))`, which never decreases (tested). Priors as in the paper:
  :math:`a = b = 0.5`, :math:`\gamma = 10`.

The class prior. The paper (and crowd-kit) fixes :math:`z_t` uniform. With ``prior="learned"``
(our default) the class proportions :math:`\rho` are estimated too: EM takes the MAP under
Dir(:math:`1 + \epsilon`) (objective term :math:`\epsilon \sum_k \log\rho_k`), VB keeps
:math:`q(\rho) = \mathrm{Dir}(\delta + \sum_t q_t)` with :math:`\delta = 1`, uses
:math:`\exp E_q[\log\rho_k]` in the E-step and subtracts its KL from the ELBO, so both objectives
still never decrease. Why: under a uniform prior, a skewed class distribution can only be
explained by spammers whose strategies favour the frequent class, and the model then calls
minority-class tasks spam. On ``zencrowd_in`` (78/22 gold classes) accuracy goes from .7260
(uniform) to .7750, on ``zheng_d_product`` from .8265 to .9311; the mean over the 21 datasets
is .8230 (crowd-kit: .8099). ``prior="uniform"`` is the paper's model.

Restarts: ``n_restarts`` random starts (each annotator's first :math:`\theta_w` and
:math:`\xi_w` drawn as crowd-kit does, from normalised Uniform(1, 1 + ``default_noise``) weights)
run one after another (``lax.map``, each stopping on its own) from PRNG keys split from ``seed``;
the run with the highest final objective is kept. Under ``vmap`` they ran 3.3 times slower on a
sparse crowd of 100,000 tasks (the batched scatters; ``benchmarks/restarts_speed.py``) and
compiled a third longer. The starts are the expected counts those parameters imply, so the first
M-step gives back (nearly) the drawn parameters.

Gold labels: clamped in every E-step; with ``init="gold"`` the known-counts of annotators who
answered gold tasks start from their hits on gold tasks instead of the random draw.

Differences from crowd-kit's ``MACE`` (1.4.2), whose defects are not copied:

* crowd-kit draws every restart with the same ``random_state``, so its 10 restarts are one
  start run 10 times; here each restart has its own key.
* crowd-kit builds the strategy counts with ``groupby(["worker", "label"])`` (sorted worker and
  label order) but reads them as if they were in ``pd.factorize`` order (first appearance), so
  annotators' strategies are swapped unless the file happens to be sorted; here counts are
  indexed by the same codes that read them.
* crowd-kit multiplies per-answer probabilities (which underflows to 0 for tasks with many
  answers) and runs a fixed 50 iterations; here everything is in log space and the loop stops
  when the objective gains less than ``tol`` (or at ``max_iter``).

What the defects are worth: crowd-kit's MACE with its strategy table indexed as it is read
scores .7912 on zencrowd_all (as shipped: .8466; ours .8025) and .8750 on crowdscale_fact_eval
with 1 restart (as shipped .9028 with 1 restart; ours .8802): the scrambled strategies happen to
help there. On li_quiz_itmanage it is one task answered 18 to 17 that crowd-kit gets right with
``random_state=0`` only (seeds 1-5: .80, our wrong tasks exactly, at the same likelihood).

References:
    D. Hovy, T. Berg-Kirkpatrick, A. Vaswani and E. Hovy. Learning whom to trust with MACE.
    NAACL-HLT 2013, 1120-1130.

Example:
    >>> from crowdllm.aggregation import MACE
    >>> mace = MACE(method="vb", n_restarts=10, seed=0)
    >>> labels = mace.fit_predict("answers.csv")  # doctest: +SKIP
    >>> mace.spamming_  # [workers, 2]: P(spam), P(know)  # doctest: +SKIP
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pyarrow as pa

from ..labels import LabelTensor
from . import _fast, _native
from ._core import TINY, CrowdData, Dense, fast_enabled, iterate, prepare
from .base import Aggregator
from .ibcc import dirichlet_stats
from .glad import (answer_view, gather_posterior, n_answers, score_with_gold, table_lookup,
                   task_label_sum, task_sum, worker_label_sum, worker_sum)

__all__ = ["MACE", "MaceState", "MaceResult", "init", "step", "fit", "fit_restarts"]


class MaceState(NamedTuple):
    """Expected counts from the last E-step (the M-step turns them into parameters)."""

    known: jax.Array  # [workers]
    spam: jax.Array  # [workers]
    strategy: jax.Array  # [workers, K]
    posteriors: jax.Array  # [tasks, K]
    class_sum: jax.Array  # [K]: sum_t q_t(k) (used when the class prior is learned)


class MaceParams(NamedTuple):
    """Log weights used by the E-step (probabilities for EM, exp E_q[log .] for VB)."""

    log_know: jax.Array  # [workers]
    log_spam: jax.Array  # [workers]
    log_strategy: jax.Array  # [workers, K]
    log_prior: jax.Array  # [K]: log rho (-log K when uniform; exp E_q[log rho] for VB)


class MaceResult(NamedTuple):
    posteriors: jax.Array  # [tasks, K]
    knowing: jax.Array  # [workers]: theta (EM) or its posterior mean (VB)
    strategy: jax.Array  # [workers, K]: xi (EM) or its posterior mean (VB)
    objective: jax.Array
    history: jax.Array
    n_iter: jax.Array
    converged: jax.Array
    start_knowing: jax.Array  # [workers]: the random start (to check restarts differ)
    priors: jax.Array  # [K]: class proportions (uniform, or the learned point / posterior mean)


def m_step(data: CrowdData, state: MaceState, *, method: str, smoothing: float, a: float,
           b: float, gamma: float, learn_prior: bool = False, delta: float = 1.0
           ) -> tuple[MaceParams, jax.Array]:
    """Parameters from expected counts, and the log prior term (EM) / minus the KL (VB).

    The class prior: uniform; or learned (EM: MAP under Dir(1 + smoothing); VB: q(rho) =
    Dir(delta + class sums), exp E_q[log rho], minus its KL to Dir(delta)).
    """
    known, spam, strat = state.known, state.spam, state.strategy
    K = strat.shape[1]
    dtype = strat.dtype
    wm = data.worker_mask
    log_rho, rho_term = jnp.full((K,), -jnp.log(K), dtype), jnp.zeros((), dtype)
    if method == "em":
        e = smoothing
        tot = known + spam + 2 * e
        log_know = jnp.log(jnp.maximum(known + e, TINY)) - jnp.log(jnp.maximum(tot, TINY))
        log_spam = jnp.log(jnp.maximum(spam + e, TINY)) - jnp.log(jnp.maximum(tot, TINY))
        st = strat + e
        log_strat = (jnp.log(jnp.maximum(st, TINY))
                     - jnp.log(jnp.maximum(st.sum(1, keepdims=True), TINY)))
        prior = e * ((log_know + log_spam + log_strat.sum(1)) * wm).sum()
        if learn_prior:
            c = state.class_sum + e
            log_rho = jnp.log(jnp.maximum(c, TINY)) - jnp.log(jnp.maximum(c.sum(), TINY))
            rho_term = e * log_rho.sum()
        return MaceParams(log_know, log_spam, log_strat, log_rho), prior + rho_term
    # VB: q(theta) = Beta(a + known, b + spam) (a Dirichlet over (know, spam)), q(xi) = Dir(gamma
    # + strat), q(rho) = Dir(delta + class sums); KL(Dir(q) || Dir(p)) = log B(p) - log B(q)
    # + sum (q - p) E_q[log x]. All posteriors and priors go through one digamma and one gammaln
    # (dirichlet_stats): each special function expands to a long polynomial (compile time).
    q_ab = jnp.stack([a + known, b + spam], axis=1)
    p_ab = jnp.stack([jnp.asarray(a, dtype), jnp.asarray(b, dtype)])[None]
    q_c, p_c = gamma + strat, jnp.full((1, K), gamma, dtype)
    q_rho, p_rho = delta + state.class_sum, jnp.full((K,), delta, dtype)
    ((e_ab, lb_ab), (log_strat, lb_c), (e_rho, lb_rho), (_, lb0_ab), (_, lb0_c),
     (_, lb0_rho)) = dirichlet_stats(q_ab, q_c, q_rho, p_ab, p_c, p_rho)
    kl_beta = lb0_ab - lb_ab + ((q_ab - p_ab) * e_ab).sum(1)
    kl_dir = lb0_c - lb_c + ((q_c - p_c) * log_strat).sum(1)
    if learn_prior:
        log_rho = e_rho
        rho_term = -(lb0_rho - lb_rho + ((q_rho - p_rho) * e_rho).sum())
    return (MaceParams(e_ab[:, 0], e_ab[:, 1], log_strat, log_rho),
            -((kl_beta + kl_dir) * wm).sum() + rho_term)


def e_step(data: CrowdData, params: MaceParams) -> tuple[MaceState, jax.Array]:
    """Posteriors (gold clamped), expected counts and sum_t log Z_t.

    Every per-answer quantity depends only on (annotator, label given), so it is computed once
    per ``[workers, K]`` table and looked up per answer: no logarithm or exponential per answer.
    The known-count of an answer is ``q_t(y) * c[w, y]``, so the expected counts need only
    ``M[w, l] = sum over answers (t, w, l) of q_t(l)`` and the answer counts ``N[w, l]``.
    """
    ls, l_match, know_frac = _answer_terms(params)
    K = data.n_classes
    if isinstance(data, Dense) and fast_enabled():
        # MACE's likelihood is a structured confusion matrix (see log_confusion), so Dawid-Skene's
        # fused E+M pass does the E-step and its counts: m[w, l] is their diagonal, n[w, l] their
        # sum over true classes.
        log_conf = log_confusion(params)
        post, ll, counts, psum = _fast.ds_em_step(data.labels, K, data.task_mask, data.gold,
                                                  params.log_prior, log_conf)
        m, n = jnp.diagonal(counts, axis1=1, axis2=2), counts.sum(axis=1)
        return _state(know_frac, m, n, post, psum), ll
    view = answer_view(data)
    base = table_lookup(data, ls, view) * view.weight
    bonus = table_lookup(data, l_match - ls, view) * view.weight
    scores = params.log_prior + task_sum(data, base)[:, None] + task_label_sum(data, bonus)
    post, log_z = score_with_gold(scores, data.gold)
    m = worker_label_sum(data, gather_posterior(data, post, view) * view.weight)  # [W, K]
    n = worker_label_sum(data, view.weight)
    state = _state(know_frac, m, n, post, (post * data.task_mask[:, None]).sum(0))
    return state, (log_z * data.task_mask).sum()


def _answer_terms(params: MaceParams) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``[W, K]`` tables: log P(y = l | spam), log P(y = l | z = l) and P(know | y = l, z = l)."""
    ls = params.log_spam[:, None] + params.log_strategy
    l_match = jnp.logaddexp(params.log_know[:, None], ls)
    return ls, l_match, jnp.exp(params.log_know[:, None] - l_match)


def log_confusion(params: MaceParams) -> jax.Array:
    """``[W, K, L]``: MACE's likelihood as a confusion matrix, log P(y = l | z = k) = ls[w, l]
    + [k = l] (l_match - ls)[w, l]."""
    ls, l_match, _ = _answer_terms(params)
    K = ls.shape[1]
    return ls[:, None, :] + jnp.eye(K, dtype=ls.dtype)[None] * (l_match - ls)[:, None, :]


def _state(know_frac: jax.Array, m: jax.Array, n: jax.Array, post: jax.Array,
           class_sum: jax.Array) -> MaceState:
    """Expected counts from ``m[w, l]`` (posterior mass of the labels given) and ``n[w, l]``
    (answers given): known = know_frac * m, the rest spammed."""
    known_l = know_frac * m
    return MaceState(known=known_l.sum(1), spam=(n - known_l).sum(1), strategy=n - known_l,
                     posteriors=post, class_sum=class_sum)


def init(data: CrowdData, key: jax.Array, *, default_noise: float = 0.5,
         init_from_gold: bool = False) -> MaceState:
    """Random start: expected counts of n_w answers under a random theta_w and xi_w."""
    dtype = data.task_mask.dtype
    K = data.n_classes
    view = answer_view(data)
    n = worker_sum(data, view.weight)
    gold_counts = None
    if init_from_gold:
        on_gold = (data.gold[view.task] >= 0).astype(dtype) * view.weight
        hit = (view.label == data.gold[view.task]).astype(dtype) * on_gold
        gold_counts = (worker_sum(data, on_gold), worker_sum(data, hit))
    known, spam, strategy = start_counts(n, key, K, default_noise=default_noise,
                                         gold_counts=gold_counts)
    post = jnp.full((data.n_tasks, K), 1.0 / K, dtype)
    return MaceState(known=known, spam=spam, strategy=strategy, posteriors=post,
                     class_sum=(post * data.task_mask[:, None]).sum(0))


def start_counts(n: jax.Array, key: jax.Array, n_classes: int, *, default_noise: float,
                 gold_counts: tuple[jax.Array, jax.Array] | None = None
                 ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(known, spam, strategy)`` counts of a random start, from each annotator's answer count
    ``n`` (and ``gold_counts = (answers on gold, hits on gold)`` for ``init="gold"``)."""
    dtype, W, K = n.dtype, n.shape[0], n_classes
    k1, k2 = jax.random.split(key)
    u = jax.random.uniform(k1, (W, 2), dtype, 1.0, 1.0 + default_noise)
    theta = u[:, 1] / u.sum(1)
    v = jax.random.uniform(k2, (W, K), dtype, 1.0, 1.0 + default_noise)
    xi = v / v.sum(1, keepdims=True)
    known = n * theta
    if gold_counts is not None:
        n_gold, hits = gold_counts
        acc = (1 + hits) / (2 + n_gold)
        known = jnp.where(n_gold > 0, n * acc, known)
    spam = n - known
    return known, spam, spam[:, None] * xi


def step(data: CrowdData, state: MaceState, **kw: Any) -> tuple[MaceState, jax.Array]:
    """M-step from the last counts, then the E-step; returns the parameters' objective."""
    params, prior_term = m_step(data, state, **kw)
    new, ll = e_step(data, params)
    return new, (ll + prior_term) / n_answers(data)


def _summary(data: CrowdData, state: MaceState, *, method: str, smoothing: float, a: float,
             b: float, gamma: float, **_: Any) -> tuple[jax.Array, jax.Array]:
    """Point estimates of theta and xi from the final counts (EM: MAP; VB: posterior means)."""
    if method == "em":
        params, _ = m_step(data, state, method=method, smoothing=smoothing, a=a, b=b, gamma=gamma)
        return jnp.exp(params.log_know), jnp.exp(params.log_strategy)
    theta = (a + state.known) / (a + b + state.known + state.spam)
    pc = gamma + state.strategy
    return theta, pc / pc.sum(1, keepdims=True)


def _prior_summary(state: MaceState, *, method: str, smoothing: float, learn_prior: bool,
                   delta: float, **_: Any) -> jax.Array:
    """The class proportions: uniform, the MAP (EM) or the posterior mean of rho (VB)."""
    K = state.class_sum.shape[0]
    if not learn_prior:
        return jnp.full((K,), 1.0 / K, state.class_sum.dtype)
    c = state.class_sum + (smoothing if method == "em" else delta)
    return c / jnp.maximum(c.sum(), TINY)


def fit_one(data: CrowdData, key: jax.Array, *, max_iter: int, tol: float, method: str,
            smoothing: float, a: float, b: float, gamma: float, default_noise: float,
            init_from_gold: bool, learn_prior: bool = False, delta: float = 1.0) -> MaceResult:
    """One restart (not jitted on its own: :func:`fit_restarts` maps it over keys)."""
    kw = dict(method=method, smoothing=smoothing, a=a, b=b, gamma=gamma,
              learn_prior=learn_prior, delta=delta)
    state = init(data, key, default_noise=default_noise, init_from_gold=init_from_gold)
    start = state.known / jnp.maximum(state.known + state.spam, TINY)
    state, loop = iterate(functools.partial(step, data, **kw), state, max_iter=max_iter, tol=tol)
    # The posteriors that go with the final parameters (one more M- and E-step).
    params, _ = m_step(data, state, **kw)
    final, _ = e_step(data, params)
    theta, xi = _summary(data, state, **kw)
    return MaceResult(posteriors=final.posteriors, knowing=theta, strategy=xi,
                      objective=loop.objective, history=loop.history, n_iter=loop.n_iter,
                      converged=loop.converged, start_knowing=start,
                      priors=_prior_summary(state, **kw))


@functools.partial(jax.jit, static_argnames=("max_iter", "method", "init_from_gold", "learn_prior",
                                             "native_special"))
def fit_restarts(data: CrowdData, keys: jax.Array, *, max_iter: int = 50, tol: float = 1e-5,
                 method: str = "vb", smoothing: float = 0.0, a: float = 0.5, b: float = 0.5,
                 gamma: float = 10.0, default_noise: float = 0.5,
                 init_from_gold: bool = False, learn_prior: bool = False,
                 delta: float = 1.0, native_special: bool = True) -> MaceResult:
    """Every restart (one per key, one after another); results have a leading restart axis.
    ``native_special``: VB's digamma and gammaln may run as the native call
    (``ibcc.digamma_gammaln``)."""
    if method not in ("em", "vb"):
        raise ValueError(f"method must be 'em' or 'vb', got {method!r}")
    one = functools.partial(fit_one, data, max_iter=max_iter, tol=tol, method=method,
                            smoothing=smoothing, a=a, b=b, gamma=gamma,
                            default_noise=default_noise, init_from_gold=init_from_gold,
                            learn_prior=learn_prior, delta=delta)
    with _native.special_calls(native_special):
        return jax.lax.map(one, keys)


def best_restart(res: MaceResult) -> MaceResult:
    """The restart with the highest final objective (on host arrays, no program is compiled)."""
    best = int(np.argmax(np.asarray(res.objective)))
    return jax.tree_util.tree_map(lambda x: x[best], res)


def fit(data: CrowdData, key: jax.Array, *, n_restarts: int = 10, **kw: Any) -> MaceResult:
    """Fit MACE with ``n_restarts`` restarts from keys split off ``key``; keep the best."""
    return best_restart(fit_restarts(data, jax.random.split(key, n_restarts), **kw))


class MACE(Aggregator):
    """MACE (Hovy et al., 2013): spamming probability and spam strategy per annotator.

    Args:
        method: ``vb`` (variational Bayes, default) or ``em``.
        n_restarts: random restarts, run one after another; the best objective is kept.
        max_iter: the most iterations per restart.
        tol: stop a restart when its objective (per answer) gains less than this.
        smoothing: EM pseudo-count; None = 0.01 / number of classes (crowd-kit's choice).
        alpha, beta: Beta prior on the knowing probability theta (VB).
        gamma: symmetric Dirichlet prior on the spam strategy (VB).
        default_noise: spread of the random starts.
        seed: PRNG seed of the restarts.
        init: ``random`` or ``gold`` (known-counts from hits on gold tasks).
        prior: ``learned`` (class proportions estimated, default) or ``uniform`` (the paper's).
        layout, dtype: as for every kernel.
        native: ``auto`` (default), ``on`` or ``off``: as for
            :class:`~crowdllm.aggregation.DawidSkene`. MACE's E-step is Dawid-Skene's with
            structured confusion matrices, so on float32 data on AVX2 CPUs (dense panels, rows
            merged once, and sparse crowds) every iteration runs on the native kernel (restarts
            one after another).
            Elsewhere (``auto``) VB's digamma and gammaln still run as one native call on CPU;
            ``off`` runs no native code at all.

    Attributes (after fit):
        spamming_: ``[workers, 2]``: probability of spamming, of knowing (crowd-kit's order).
        thetas_: ``[workers, K]`` spam strategies. skills_: ``[workers]`` knowing probability.
        objectives_: ``[n_restarts]`` final objective of every restart.
        priors_: ``[K]`` class proportions (uniform when ``prior="uniform"``).
        native_used_: whether the native kernel ran the fit.
    """

    name = "mace"
    description = "MACE: spamming probability and spam strategy per annotator (EM or VB)"
    supports_gold = True
    iterative = True

    def __init__(self, method: str = "vb", n_restarts: int = 10, max_iter: int = 50,
                 tol: float = 1e-5, smoothing: float | None = None, alpha: float = 0.5,
                 beta: float = 0.5, gamma: float = 10.0, default_noise: float = 0.5,
                 seed: int = 0, init: str = "random", prior: str = "learned",
                 layout: str = "auto", dtype: str = "float32", native: str = "auto") -> None:
        self.native = _native.check_option(native)
        if prior not in ("uniform", "learned"):
            raise ValueError(f"prior must be 'uniform' or 'learned', got {prior!r}")
        self.prior = prior
        if method not in ("em", "vb"):
            raise ValueError(f"method must be 'em' or 'vb', got {method!r}")
        if init not in ("random", "gold"):
            raise ValueError(f"init must be 'random' or 'gold', got {init!r}")
        if n_restarts < 1:
            raise ValueError(f"n_restarts must be >= 1, got {n_restarts}")
        if min(alpha, beta, gamma) <= 0 or (smoothing is not None and smoothing <= 0):
            raise ValueError("alpha, beta, gamma and smoothing must be > 0")
        self.method, self.n_restarts, self.max_iter, self.tol = method, n_restarts, max_iter, tol
        self.smoothing, self.alpha, self.beta, self.gamma = smoothing, alpha, beta, gamma
        self.default_noise, self.seed, self.init = default_noise, seed, init
        self.layout, self.dtype = layout, dtype

    def _fit(self, tensor: LabelTensor, gold: np.ndarray | None) -> dict[str, Any]:
        if self.init == "gold" and gold is None:
            raise ValueError("init='gold' needs gold labels: fit(data, gold=...)")
        K = max(tensor.n_classes, 1)
        smoothing = self.smoothing if self.smoothing is not None else 0.01 / K
        with jax.enable_x64(self.dtype == "float64"):
            data = prepare(tensor, layout=self.layout, gold=gold,
                           dtype=jnp.float64 if self.dtype == "float64" else jnp.float32)
            keys = jax.random.split(jax.random.key(self.seed), self.n_restarts)
            self.native_used_, width = _native.coo_use(self.native, data, tensor)
            run = functools.partial(fit_restarts, native_special=self.native != "off")
            if self.native_used_:  # a sparse crowd: width and rank (the rows' order)
                run = functools.partial(_native.mace_fit_restarts,
                                        **_native.coo_fit_args(data, tensor, width))
            allres = run(data, keys, max_iter=self.max_iter, tol=self.tol, method=self.method,
                         smoothing=smoothing, a=self.alpha, b=self.beta, gamma=self.gamma,
                         default_noise=self.default_noise, init_from_gold=self.init == "gold",
                         learn_prior=self.prior == "learned")
            # on the host: indexing each device array would compile a slice per field
            allres = jax.tree_util.tree_map(np.asarray, allres)
            res, objectives = best_restart(allres), allres.objective
        W = tensor.n_workers
        theta = res.knowing[:W]
        return {"probas": res.posteriors[: tensor.n_tasks], "skills": theta,
                "spamming": np.stack([1 - theta, theta], axis=1), "thetas": res.strategy[:W],
                "priors": res.priors,
                "objectives": objectives, "n_iter": int(res.n_iter),
                "converged": bool(res.converged), "history": res.history}

    def skills_table(self) -> pa.Table:
        cols: dict[str, Any] = {"worker": pa.array(self.workers_.tolist()),
                                "p_knowing": pa.array(self.skills_, type=pa.float64())}
        for l, c in enumerate(self.classes_.tolist()):
            cols[f"strategy_{c}"] = pa.array(self.thetas_[:, l], type=pa.float64())
        return pa.table(cols)
