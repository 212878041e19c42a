r"""GLAD: annotator expertise and item difficulty, fitted by EM with an optax M-step.

The generative story (Whitehill et al., 2009). Each task :math:`t` has a true class
:math:`z_t \sim \mathrm{Cat}(\rho)` and an inverse difficulty :math:`\beta_t = e^{b_t} > 0`;
each annotator :math:`w` has an expertise :math:`\alpha_w \in \mathbb{R}` (negative = adversarial).
An answer is right with probability :math:`\sigma(\alpha_w\beta_t)`, otherwise one of the other
:math:`K-1` classes uniformly:

.. math::
    P(y_{tw} = l \mid z_t = k) = \begin{cases} \sigma(\alpha_w e^{b_t}) & l = k \\
        \dfrac{1 - \sigma(\alpha_w e^{b_t})}{K - 1} & l \neq k \end{cases}

with Gaussian priors :math:`\alpha_w \sim \mathcal N(\mu_\alpha, 1)`,
:math:`b_t = \log\beta_t \sim \mathcal N(\mu_\beta, 1)` (:math:`\mu_\alpha = \mu_\beta = 1`, as
in crowd-kit and the authors' code).

EM:

* E-step: :math:`\log q_t(k) = \log\rho_k + \sum_{(t,w,l)} [l = k]\log\sigma(x_{tw})
  + [l \neq k](\log\sigma(-x_{tw}) - \log(K-1)) - \log Z_t`, :math:`x_{tw} = \alpha_w e^{b_t}`,
  all in log space (``log_sigmoid``, ``logsumexp``); gold tasks are clamped to their label.
* M-step: gradient ascent on the expected complete log-likelihood plus the log priors,

  .. math::
      Q(\alpha, b) = \sum_{(t,w,l)} \big[p_{tw}\log\sigma(x_{tw}) + (1-p_{tw})\log\sigma(-x_{tw})\big]
        - \tfrac12\sum_w(\alpha_w-\mu_\alpha)^2 - \tfrac12\sum_t(b_t-\mu_\beta)^2 + \text{const},

  :math:`p_{tw} = q_t(y_{tw})`, with gradients
  :math:`\partial Q/\partial\alpha_w = \sum_t (p_{tw} - \sigma(x_{tw})) e^{b_t} - (\alpha_w - \mu_\alpha)`
  and :math:`\partial Q/\partial b_t = \sum_w (p_{tw} - \sigma(x_{tw})) x_{tw} - (b_t - \mu_\beta)`.
  ``m_steps`` Adam steps (optax) run per EM iteration inside ``lax.scan``; the optimiser state is
  carried across iterations. After each step the parameters are clipped to
  :math:`|\alpha| \le 50`, :math:`b \in [-10, 5]` (so :math:`|x| \le 50 e^5`, where
  ``log_sigmoid`` is still exact in float32 and nothing overflows). If the inner steps lowered
  :math:`Q` they are undone and retried with a 4 times smaller step (up to 4 times; then the
  old parameters are kept), which makes this a *generalised* EM: the objective (marginal
  log-likelihood of the answers plus the log priors, per answer) never decreases (tested). The class prior :math:`\rho` is uniform and fixed, as in the paper and
  crowd-kit, unless ``learn_prior=True`` (then :math:`\rho_k \propto 0.01 + \sum_t q_t(k)`).

Gold labels: clamped on every E-step (``fit(data, gold=...)``); with ``init="gold"`` the first
expertise of each annotator who answered gold tasks is
:math:`\alpha_w = \mathrm{logit}(\hat a_w) / e^{\mu_\beta}`, from their smoothed accuracy
:math:`\hat a_w = (1 + \text{hits}) / (2 + \text{answers})` on gold tasks.

Differences from crowd-kit's ``GLAD``: the M-step is Adam (optax) rather than SciPy's
conjugate gradient (``m_step_max_iter=25``), the parameters are clipped, and a step that lowers
Q is rejected (crowd-kit's objective can go down). crowd-kit's first convergence check compares
a per-answer Q with an unnormalised one, so it always runs a second iteration; its later checks
compare Q under different posteriors, so it stops wherever Q dips once. Ours uses the shared
stopping rule (gain of the per-answer objective below ``tol``). Where that matters: on
zheng_s_relevance crowd-kit stops after 2 iterations (Q -0.328021 then -0.329367) at .5646;
run on, its GLAD drifts to .531 (10 iterations) and .5130 (40), as ours does to .5004
(converged at 51; the crowd-kit paper reports .511 there).

References:
    J. Whitehill, P. Ruvolo, T. Wu, J. Bergsma and J. Movellan. Whose vote should count more:
    optimal integration of labels from labelers of unknown expertise. NIPS 22, 2009.

Example:
    >>> from crowdllm.aggregation import GLAD
    >>> glad = GLAD(max_iter=50)
    >>> labels = glad.fit_predict("answers.csv")  # doctest: +SKIP
    >>> glad.alphas_, glad.betas_  # expertise per annotator, inverse difficulty per task  # doctest: +SKIP
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pyarrow as pa

from ..labels import LabelTensor
from . import _fast, _native
from ._core import (TINY, Coo, CrowdData, Dense, clamp_gold, fast_enabled, iterate, normalize,
                    prepare)
from .base import Aggregator

__all__ = ["GLAD", "GladState", "GladResult", "init", "step", "fit", "e_step",
           "answer_view", "table_lookup", "task_sum", "worker_sum", "task_label_sum", "worker_label_sum",
           "n_answers"]

ALPHA_MAX = 50.0
LOG_BETA_MIN, LOG_BETA_MAX = -10.0, 5.0


# --------------------------------------------------------------------------------------------
# Per-answer sums on either layout. For the dense layout the "answers" are the [tasks, workers]
# cells (missing ones have weight 0), so per-answer formulas broadcast over that grid; for COO
# they are the flat answer arrays. (Also used by MACE and KOS.)
# --------------------------------------------------------------------------------------------


class AnswerView(NamedTuple):
    task: jax.Array  # int32: [A] (coo) or [T, 1] (dense)
    worker: jax.Array  # int32: [A] or [1, W]
    label: jax.Array  # int32: [A] or [T, W] (0 where missing)
    weight: jax.Array  # float: [A] or [T, W] (0 where missing / padding)


def answer_view(data: CrowdData, dtype: Any = None) -> AnswerView:
    """The answers as arrays that broadcast to one value per answer, whatever the layout."""
    dtype = dtype or data.task_mask.dtype
    if isinstance(data, Coo):
        return AnswerView(data.task, data.worker, data.label, data.weight.astype(dtype))
    T, W = data.labels.shape
    lab = data.labels.astype(jnp.int32)
    return AnswerView(jnp.arange(T, dtype=jnp.int32)[:, None],
                      jnp.arange(W, dtype=jnp.int32)[None, :],
                      jnp.maximum(lab, 0), (lab >= 0).astype(dtype))


def task_sum(data: CrowdData, vals: jax.Array) -> jax.Array:
    """``out[t] = sum of vals over the answers of task t`` (vals already weighted)."""
    if isinstance(data, Coo):
        return jax.ops.segment_sum(vals, data.task, num_segments=data.n_tasks,
                                   indices_are_sorted=True)
    return vals.sum(axis=1)


def worker_sum(data: CrowdData, vals: jax.Array) -> jax.Array:
    """``out[w] = sum of vals over the answers of worker w``."""
    if isinstance(data, Coo):
        return jax.ops.segment_sum(vals, data.worker, num_segments=data.n_workers)
    return vals.sum(axis=0)


def table_lookup(data: CrowdData, table: jax.Array, view: AnswerView) -> jax.Array:
    """``table[w, y_tw]`` for every answer, from a small ``[workers, K]`` table."""
    if isinstance(data, Coo):
        return table[view.worker, view.label]
    lab = data.labels.astype(jnp.int32)
    out = jnp.zeros(lab.shape, table.dtype)
    for k in range(data.n_classes):  # K selects: cheaper than a gather on CPU
        out = jnp.where(lab == k, table[None, :, k], out)
    return out


def task_label_sum(data: CrowdData, vals: jax.Array) -> jax.Array:
    """``out[t, l] = sum of vals over the answers of task t with label l``: ``[tasks, K]``."""
    K = data.n_classes
    if isinstance(data, Coo):
        flat = jax.ops.segment_sum(vals, data.task * K + data.label,
                                   num_segments=data.n_tasks * K, indices_are_sorted=True)
        return flat.reshape(data.n_tasks, K)
    lab = data.labels
    return jnp.stack([jnp.where(lab == k, vals, 0).sum(axis=1) for k in range(K)], axis=1)


def materialize(x: Any) -> Any:
    """Ask XLA to compute ``x`` into memory before the reductions that read it.

    XLA fuses an elementwise producer into the reduction that consumes it; on CPU such fused
    reductions (with a select or a transcendental inside) ran as scalar loops, 3-20x slower than
    writing the values once and summing them (measured at 1M x 12 on the 2-core VM, early
    sessions). The barrier is an identity: results are unchanged. With jax 0.10.2 on CPU it no
    longer changes anything: XLA's CPU pipeline removes the barrier before fusion (session 21:
    ``log_sigmoid(x) * w`` summed over rows of 1M x 12 compiles to the same two fusions, 68 and
    73 ms, with and without it). Kept for the backends and versions that honour it.
    """
    return jax.lax.optimization_barrier(x)


def worker_label_sum(data: CrowdData, vals: jax.Array) -> jax.Array:
    """``out[w, l] = sum of vals over the answers of worker w with label l``: ``[workers, K]``."""
    K = data.n_classes
    if isinstance(data, Coo):
        flat = jax.ops.segment_sum(vals, data.worker * K + data.label,
                                   num_segments=data.n_workers * K)
        return flat.reshape(data.n_workers, K)
    lab = data.labels
    return jnp.stack([jnp.where(lab == k, vals, 0).sum(axis=0) for k in range(K)], axis=1)


def gather_posterior(data: CrowdData, post: jax.Array, view: AnswerView) -> jax.Array:
    """``post[t, y_tw]`` for every answer: the posterior mass of the label given."""
    if isinstance(data, Coo):
        return post[view.task, view.label]
    lab = data.labels
    out = jnp.zeros(lab.shape, post.dtype)
    for k in range(post.shape[1]):  # K selects: XLA's CPU gathers are scalar loops
        out = jnp.where(lab == k, post[:, k, None], out)
    return out


def n_answers(data: CrowdData) -> jax.Array:
    """Number of real answers (at least 1)."""
    if isinstance(data, Coo):
        return jnp.maximum(data.weight.sum(), 1.0)
    return jnp.maximum((data.labels >= 0).sum().astype(data.task_mask.dtype), 1.0)


def score_with_gold(scores: jax.Array, gold: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Posteriors (softmax, gold clamped) and ``log Z_t`` (the gold class's score on gold tasks)."""
    log_z = jax.nn.logsumexp(scores, axis=1)
    post = clamp_gold(jnp.exp(scores - log_z[:, None]), gold)
    gold_score = jnp.take_along_axis(scores, jnp.maximum(gold, 0)[:, None], axis=1)[:, 0]
    return post, jnp.where(gold >= 0, gold_score, log_z)


# --------------------------------------------------------------------------------------------
# GLAD
# --------------------------------------------------------------------------------------------


class GladParams(NamedTuple):
    alpha: jax.Array  # [workers]
    log_beta: jax.Array  # [tasks]


class GladState(NamedTuple):
    params: GladParams
    opt_state: Any
    log_prior: jax.Array  # [K]
    posteriors: jax.Array  # [tasks, K]
    lr_scale: jax.Array  # scalar: backtracking factor on the learning rate


class GladResult(NamedTuple):
    posteriors: jax.Array  # [tasks, K]
    alphas: jax.Array  # [workers] expertise
    betas: jax.Array  # [tasks] inverse difficulty exp(log_beta)
    priors: jax.Array  # [K]
    objective: jax.Array
    history: jax.Array
    n_iter: jax.Array
    converged: jax.Array


def _logits(view: AnswerView, params: GladParams) -> jax.Array:
    return params.alpha[view.worker] * jnp.exp(params.log_beta[view.task])


def _e_parts(data: CrowdData, params: GladParams, log_prior: jax.Array
             ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """:func:`e_step`, plus the per-answer logits x and log sigma(x) it computed."""
    view = answer_view(data)
    K = data.n_classes
    x = _logits(view, params)
    x, log_right = materialize((x, jax.nn.log_sigmoid(x)))
    log_wrong = log_right - x - jnp.log(max(K - 1, 1))  # log sigma(-x) = log sigma(x) - x
    if isinstance(data, Dense) and fast_enabled() and K > 1:
        # log sigma(x) - log_wrong = alpha_w beta_t + log(K - 1), so the per-label part of the
        # scores is beta_t V[t, k] + log(K - 1) N[t, k] with V the alpha-weighted votes and N
        # the vote counts: one indicator x table product (see _fast) instead of per-label sums
        eye = jnp.eye(K, dtype=x.dtype)
        table = jnp.concatenate([params.alpha[:, None, None] * eye[None],
                                 jnp.broadcast_to(eye[None], (data.n_workers, K, K))], axis=1)
        vn = _fast.task_class_sum(data.labels, K, table)  # [T, 2K]
        wrong = materialize(log_wrong * view.weight)
        per_label = (jnp.exp(params.log_beta)[:, None] * vn[:, :K]
                     + jnp.log(max(K - 1, 1)) * vn[:, K:])
        scores = log_prior + task_sum(data, wrong)[:, None] + per_label
    else:
        wrong, diff = materialize((log_wrong * view.weight, (log_right - log_wrong) * view.weight))
        scores = log_prior + task_sum(data, wrong)[:, None] + task_label_sum(data, diff)
    post, ll_task = score_with_gold(scores, data.gold)
    return post, (ll_task * data.task_mask).sum(), x, log_right


def e_step(data: CrowdData, params: GladParams, log_prior: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Posteriors (gold clamped) and the marginal log-likelihood of the answers."""
    post, ll, _, _ = _e_parts(data, params, log_prior)
    return post, ll


def log_prior_density(data: CrowdData, params: GladParams, mu_alpha: float,
                      mu_beta: float) -> jax.Array:
    """Gaussian log priors on alpha and log-beta (real annotators and tasks; constants dropped)."""
    return gaussian_log_priors(params, data.worker_mask, data.task_mask, mu_alpha, mu_beta)


def gaussian_log_priors(params: GladParams, worker_weight: jax.Array, task_weight: jax.Array,
                        mu_alpha: float, mu_beta: float) -> jax.Array:
    """:func:`log_prior_density` with each annotator's and task's term weighted (0: padding; a
    merged row: the number of tasks it stands for)."""
    return (-0.5 * (((params.alpha - mu_alpha) ** 2) * worker_weight).sum()
            - 0.5 * (((params.log_beta - mu_beta) ** 2) * task_weight).sum())


def learned_log_prior(class_sum: jax.Array) -> jax.Array:
    """``learn_prior``: log rho with rho proportional to 0.01 + the summed class posteriors."""
    return jnp.log(jnp.maximum(normalize(class_sum + 0.01), TINY))


def q_value(data: CrowdData, params: GladParams, p_right: jax.Array, mu_alpha: float,
            mu_beta: float) -> jax.Array:
    """The M-step objective Q (expected complete log-likelihood of alpha, beta + log priors)."""
    view = answer_view(data)
    x = _logits(view, params)
    return (_q_answers(x, jax.nn.log_sigmoid(x), p_right, view)
            + log_prior_density(data, params, mu_alpha, mu_beta))


def _q_answers(x: jax.Array, log_sig_x: jax.Array, p_right: jax.Array, view: AnswerView
               ) -> jax.Array:
    """Q's answer term from the logits and their log-sigmoid:
    ``p log sigma(x) + (1 - p) log sigma(-x)``, with ``log sigma(-x) = log sigma(x) - x``."""
    return materialize((log_sig_x - (1 - p_right) * x) * view.weight).sum()


def q_grad(data: CrowdData, params: GladParams, p_right: jax.Array, mu_alpha: float,
           mu_beta: float) -> GladParams:
    """Gradient of :func:`q_value` (closed form: one pass over the answers)."""
    view = answer_view(data)
    beta = jnp.exp(params.log_beta)
    x = params.alpha[view.worker] * beta[view.task]
    g, x = materialize(((p_right - jax.nn.sigmoid(x)) * view.weight, x))
    d_alpha = worker_sum(data, g * beta[view.task]) - (params.alpha - mu_alpha)
    d_log_beta = task_sum(data, g * x) - (params.log_beta - mu_beta)
    return GladParams(d_alpha * data.worker_mask, d_log_beta * data.task_mask)


def _clip(params: GladParams) -> GladParams:
    return GladParams(jnp.clip(params.alpha, -ALPHA_MAX, ALPHA_MAX),
                      jnp.clip(params.log_beta, LOG_BETA_MIN, LOG_BETA_MAX))


#: Adam's constants (optax's defaults), also given to the native M-step
ADAM_B1, ADAM_B2, ADAM_EPS = 0.9, 0.999, 1e-8


def _optimizer() -> optax.GradientTransformation:
    return optax.scale_by_adam(b1=ADAM_B1, b2=ADAM_B2, eps=ADAM_EPS)


def m_step(data: CrowdData, state: GladState, post: jax.Array, *, lr: float, m_steps: int,
           mu_alpha: float, mu_beta: float, learn_prior: bool, max_tries: int = 4,
           e_parts: tuple[jax.Array, jax.Array] | None = None) -> GladState:
    """``m_steps`` Adam steps on Q (``lax.scan``), backtracking until Q does not fall.

    The Adam direction (``optax.scale_by_adam``) is scaled by ``lr * state.lr_scale``. If Q is
    lower after the steps, they are undone and retried with a 4 times smaller scale (at most
    ``max_tries`` times; if all fail the parameters stay as they were). After a success the
    scale doubles again (up to 1). So Q never decreases, and with it the EM objective.
    ``e_parts``: the E-step's per-answer logits and their log-sigmoid at the current
    parameters, from which Q there is summed without recomputing them.
    """
    view = answer_view(data)
    p_right = gather_posterior(data, post, view)
    if e_parts is None:
        q_old = q_value(data, state.params, p_right, mu_alpha, mu_beta)
    else:
        q_old = (_q_answers(*e_parts, p_right, view)
                 + log_prior_density(data, state.params, mu_alpha, mu_beta))
    params, opt_state, scale = adam_steps(
        state, q_old, lambda prm: q_value(data, prm, p_right, mu_alpha, mu_beta),
        lambda prm: q_grad(data, prm, p_right, mu_alpha, mu_beta), lr=lr, m_steps=m_steps,
        max_tries=max_tries)
    log_prior = state.log_prior
    if learn_prior:
        log_prior = learned_log_prior((post * data.task_mask[:, None]).sum(0))
    return GladState(params=params, opt_state=opt_state, log_prior=log_prior, posteriors=post,
                     lr_scale=scale)


def adam_steps(state: GladState, q_old: jax.Array, q_fn: Any, grad_fn: Any, *, lr: float,
               m_steps: int, max_tries: int = 4) -> tuple[GladParams, Any, jax.Array]:
    """The M-step's optimiser: ``m_steps`` Adam steps from ``state`` along ``grad_fn(params)``,
    undone and retried with a 4 times smaller scale while ``q_fn(params) < q_old`` (at most
    ``max_tries`` times). Returns ``(params, opt_state, lr scale)`` (the old ones if all fail)."""
    opt = _optimizer()

    def run(scale):
        def one(carry, _):
            params, opt_state = carry
            direction, opt_state = opt.update(grad_fn(params), opt_state, params)
            params = jax.tree_util.tree_map(lambda p, d: p + (lr * scale) * d, params, direction)
            return (_clip(params), opt_state), None

        (params, opt_state), _ = jax.lax.scan(one, (state.params, state.opt_state), None,
                                              length=m_steps)
        return params, opt_state

    def cond(c):
        tries, _, accepted, _, _ = c
        return (~accepted) & (tries < max_tries)

    def body(c):
        tries, scale, _, _, _ = c
        params, opt_state = run(scale)
        accepted = q_fn(params) >= q_old
        return tries + 1, jnp.where(accepted, scale, scale / 4), accepted, params, opt_state

    c0 = (jnp.asarray(0, jnp.int32), state.lr_scale, jnp.asarray(False), state.params,
          state.opt_state)
    _, scale, accepted, params, opt_state = jax.lax.while_loop(cond, body, c0)
    keep = lambda new, old: jax.tree_util.tree_map(  # noqa: E731
        lambda a, b: jnp.where(accepted, a, b), new, old)
    params, opt_state = keep(params, state.params), keep(opt_state, state.opt_state)
    return params, opt_state, jnp.where(accepted, jnp.minimum(scale * 2, 1.0), scale)


def alpha_from_gold(alpha: jax.Array, n_gold: jax.Array, hits: jax.Array,
                    mu_beta: float) -> jax.Array:
    """``init="gold"``: P(right) = sigma(alpha * beta0) at the smoothed accuracy on gold tasks,
    so alpha = logit(acc) / beta0 (clipped), for annotators who answered any."""
    acc = (1 + hits) / (2 + n_gold)
    a_gold = jnp.clip((jnp.log(acc) - jnp.log1p(-acc)) / jnp.exp(mu_beta), -ALPHA_MAX, ALPHA_MAX)
    return jnp.where(n_gold > 0, a_gold, alpha)


def init(data: CrowdData, *, mu_alpha: float = 1.0, mu_beta: float = 1.0,
         init_from_gold: bool = False) -> GladState:
    """alpha = mu_alpha, log-beta = mu_beta, uniform class prior (alpha from gold if asked)."""
    dtype = data.task_mask.dtype
    K = data.n_classes
    alpha = jnp.full((data.n_workers,), mu_alpha, dtype)
    log_beta = jnp.full((data.n_tasks,), mu_beta, dtype)
    if init_from_gold:
        view = answer_view(data)
        on_gold = (data.gold[view.task] >= 0).astype(dtype) * view.weight
        hit = (view.label == data.gold[view.task]).astype(dtype) * on_gold
        alpha = alpha_from_gold(alpha, worker_sum(data, on_gold), worker_sum(data, hit), mu_beta)
    params = GladParams(alpha, log_beta)
    log_prior = jnp.full((K,), -jnp.log(K), dtype)
    post, _ = e_step(data, params, log_prior)
    return GladState(params=params, opt_state=_optimizer().init(params), log_prior=log_prior,
                     posteriors=post, lr_scale=jnp.asarray(1.0, dtype))


def step(data: CrowdData, state: GladState, *, lr: float, m_steps: int, mu_alpha: float,
         mu_beta: float, learn_prior: bool) -> tuple[GladState, jax.Array]:
    """E-step with the current parameters, then the M-step; returns their objective."""
    post, ll, x, log_right = _e_parts(data, state.params, state.log_prior)
    obj = (ll + log_prior_density(data, state.params, mu_alpha, mu_beta)) / n_answers(data)
    state = m_step(data, state, post, lr=lr, m_steps=m_steps, mu_alpha=mu_alpha,
                   mu_beta=mu_beta, learn_prior=learn_prior, e_parts=(x, log_right))
    return state, obj


@functools.partial(jax.jit, static_argnames=("max_iter", "m_steps", "learn_prior",
                                             "init_from_gold"))
def fit(data: CrowdData, *, max_iter: int = 100, tol: float = 1e-5, lr: float = 0.1,
        m_steps: int = 5, mu_alpha: float = 1.0, mu_beta: float = 1.0,
        learn_prior: bool = False, init_from_gold: bool = False) -> GladResult:
    """Fit GLAD by (generalised) EM; see the module docstring for the model."""
    state = init(data, mu_alpha=mu_alpha, mu_beta=mu_beta, init_from_gold=init_from_gold)
    body = functools.partial(step, data, lr=lr, m_steps=m_steps, mu_alpha=mu_alpha,
                             mu_beta=mu_beta, learn_prior=learn_prior)
    state, loop = iterate(body, state, max_iter=max_iter, tol=tol)
    post, _ = e_step(data, state.params, state.log_prior)  # posteriors of the final parameters
    return GladResult(posteriors=post, alphas=state.params.alpha,
                      betas=jnp.exp(state.params.log_beta), priors=jnp.exp(state.log_prior),
                      objective=loop.objective, history=loop.history, n_iter=loop.n_iter,
                      converged=loop.converged)


class GLAD(Aggregator):
    """GLAD (Whitehill et al., 2009): expertise per annotator, difficulty per task.

    Args:
        max_iter: the most EM iterations.
        tol: stop when the objective (per answer) gains less than this.
        m_steps: Adam steps per M-step.
        lr: Adam learning rate.
        mu_alpha, mu_beta: prior means of alpha and log-beta (unit variance).
        learn_prior: re-estimate the class prior in each M-step (default: uniform, fixed).
        init: ``default`` (alpha = mu_alpha) or ``gold`` (alpha from accuracy on gold tasks).
        layout: ``auto``, ``coo`` or ``dense``.
        dtype: ``float32`` or ``float64``.
        native: ``auto`` (default), ``on`` or ``off``, as for
            :class:`~crowdllm.aggregation.DawidSkene`: on dense float32 panels on AVX2 CPUs
            the E-step and the gradient passes run as native kernels (``native/glad.cc``) over
            the distinct answer rows (tasks with the same answers and gold keep the same
            difficulty, so they are fitted once, weighted), and the M-step (Adam, the Q check
            and the retries) is one native call per iteration. A sparse crowd (the COO layout)
            runs on the same kernels as rows of its tasks' answer slots, each answer's expertise
            gathered by its annotator (at most 8 classes), in blocks of 8 tasks with as many
            answers, so that a few busy tasks widen only their own blocks.

    Attributes (after fit):
        alphas_: ``[workers]`` expertise. betas_: ``[tasks]`` inverse difficulty (> 0).
        skills_: same as ``alphas_``. priors_: ``[K]`` class prior.
        native_used_: whether the native kernels ran the fit.
    """

    name = "glad"
    description = "GLAD: annotator expertise and task difficulty (EM, optax M-step)"
    supports_gold = True
    iterative = True

    def __init__(self, max_iter: int = 100, tol: float = 1e-5, m_steps: int = 5, lr: float = 0.1,
                 mu_alpha: float = 1.0, mu_beta: float = 1.0, learn_prior: bool = False,
                 init: str = "default", layout: str = "auto", dtype: str = "float32",
                 native: str = "auto") -> None:
        self.native = _native.check_option(native)
        if init not in ("default", "gold"):
            raise ValueError(f"init must be 'default' or 'gold', got {init!r}")
        if m_steps < 1 or lr <= 0:
            raise ValueError("m_steps must be >= 1 and lr > 0")
        self.max_iter, self.tol, self.m_steps, self.lr = max_iter, tol, m_steps, lr
        self.mu_alpha, self.mu_beta, self.learn_prior = mu_alpha, mu_beta, learn_prior
        self.init, self.layout, self.dtype = init, layout, dtype

    def _fit(self, tensor: LabelTensor, gold: np.ndarray | None) -> dict[str, Any]:
        if self.init == "gold" and gold is None:
            raise ValueError("init='gold' needs gold labels: fit(data, gold=...)")
        with jax.enable_x64(self.dtype == "float64"):
            data = prepare(tensor, layout=self.layout, gold=gold,
                           dtype=jnp.float64 if self.dtype == "float64" else jnp.float32)
            # a sparse crowd runs on the kernels as rows of its tasks' answers (ragged blocks)
            self.native_used_, layout = _native.glad_coo_use(self.native, data, tensor)
            run = fit
            if self.native_used_:
                run = functools.partial(_native.glad_fit, layout=layout)
            res = run(data, max_iter=self.max_iter, tol=self.tol, lr=self.lr,
                      m_steps=self.m_steps, mu_alpha=self.mu_alpha, mu_beta=self.mu_beta,
                      learn_prior=self.learn_prior, init_from_gold=self.init == "gold")
            res = jax.tree_util.tree_map(np.asarray, res)
        W, T = tensor.n_workers, tensor.n_tasks
        return {"probas": res.posteriors[:T], "alphas": res.alphas[:W], "betas": res.betas[:T],
                "skills": res.alphas[:W], "priors": res.priors, "n_iter": int(res.n_iter),
                "converged": bool(res.converged), "history": res.history}

    def skills_table(self) -> pa.Table:
        return pa.table({"worker": pa.array(self.workers_.tolist()),
                         "alpha": pa.array(self.alphas_, type=pa.float64())})
