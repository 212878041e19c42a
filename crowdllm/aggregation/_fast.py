r"""Fast sums over a dense panel, and Dawid-Skene's fused E+M step.

The straightforward dense sums (kept in :mod:`._core` as ``_reference_*``) build the
``[tasks, workers, classes]`` one-hot indicator of the answers and contract it with ``einsum``:
at 1,000,000 x 12 x 5 that is a 240 MB float array written and read on every sum, several
times per EM iteration. The versions here never build it:

* the task axis is cut into chunks of :data:`CHUNK` tasks and walked with ``lax.scan``, so that
  everything one chunk needs stays in cache;
* ``out[t, k] = sum_w table[w, k, y_tw]`` (the E-step's log-likelihood) is the small matrix
  product of the chunk's ``[C, workers * L]`` answer indicator (in cache only; a missing
  answer is a zero row) with the ``[workers * L, K]`` table. An earlier version gathered table
  rows by label code instead; XLA's CPU gathers are scalar loops, and the product was 2x
  faster for the whole DS iteration at 1M x 12 x 5 on the 2-core VM (see ``git log``);
* ``out[w, k, l] = sum_t [y_tw = l] q_t(k)`` (the M-step's counts) is the product of the same
  indicator, transposed, with the chunk's posteriors;
* :func:`ds_em_step` does Dawid-Skene's E-step and the M-step's sums in the same pass over the
  chunks: one iteration reads the ``int8`` labels once and writes the posteriors once.

Labels stay ``int8`` (``int16`` past 127 classes); accumulators are the float dtype of the data
(float32, or float64 with x64 enabled). Each function equals its reference to rounding (tested
in ``tests/test_fast_paths.py``).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp

__all__ = ["CHUNK", "task_class_sum", "worker_confusion", "task_vote", "worker_agreement",
           "ds_em_step", "ds_fit_dense", "chunked", "subtype_sweep"]

#: tasks per chunk; None = by backend: 4096 on CPU (4096 tasks x 12 workers x 5 classes of
#: float32 temporaries is ~1 MB, cache-sized), 2**24 on accelerators (one chunk up to 16M tasks:
#: on an H200, 16 sequential chunks of 65536 ran at 0.55 ms per DS iteration at 1M items, twice
#: the one-hot reference's 0.26 ms, which XLA fuses well there).
CHUNK: int | None = None


def _default_chunk() -> int:
    if CHUNK is not None:
        return CHUNK
    return 4096 if jax.default_backend() == "cpu" else 1 << 24

_HIGHEST = jax.lax.Precision.HIGHEST  # no TF32 / bf16 passes on accelerators: exact f32 sums


def _chunk_size(n_tasks: int, chunk: int) -> int:
    """The chunk length: ``n_tasks`` itself when small, else a divisor of it near ``chunk``."""
    if n_tasks <= chunk:
        return max(n_tasks, 1)
    c = math.gcd(n_tasks, chunk)
    return c if c >= chunk // 8 else chunk  # bucketed sizes are multiples of large powers of 2


def chunked(labels: jax.Array, per_task: tuple[jax.Array, ...], fn: Callable, init: Any,
            chunk: int | None = None) -> tuple[Any, Any]:
    """``lax.scan`` ``fn(carry, labels_chunk, *per_task_chunks) -> (carry, out)`` over task chunks.

    ``labels`` is ``[T, W]``; every array in ``per_task`` has ``T`` rows. When no chunk size
    divides ``T``, the rows are padded (labels with ``-1``, the rest with zeros) and the
    outputs cut back to ``T`` rows.
    """
    T = labels.shape[0]
    C = _chunk_size(T, _default_chunk() if chunk is None else chunk)
    n = -(-T // C)
    pad = n * C - T
    if pad:
        labels = jnp.pad(labels, ((0, pad), (0, 0)), constant_values=-1)
        # zeros for masks and posteriors; -1 (no gold) for integer arrays such as gold codes
        per_task = tuple(jnp.pad(x, ((0, pad),) + ((0, 0),) * (x.ndim - 1),
                                 constant_values=-1 if jnp.issubdtype(x.dtype, jnp.integer) else 0)
                         for x in per_task)
    xs = (labels.reshape(n, C, labels.shape[1]),) + tuple(
        x.reshape((n, C) + x.shape[1:]) for x in per_task)
    carry, ys = jax.lax.scan(lambda c, x: fn(c, *x), init, xs)
    ys = jax.tree_util.tree_map(lambda y: y.reshape((n * C,) + y.shape[2:])[:T], ys)
    return carry, ys


def _flat_table(table: jax.Array) -> jax.Array:
    """``[W, K, L]`` -> ``[W * L, K]`` (rows in :func:`_onehot_flat`'s column order).

    Entries are floored at a large finite negative number: a ``-inf`` (log 0) times the zero of
    a missing answer would be NaN in the product, where a gather simply skipped it.
    """
    W, K, L = table.shape
    floor = jnp.asarray(jnp.finfo(table.dtype).min / (4 * max(W, 1)), table.dtype)
    return jnp.maximum(table.transpose(0, 2, 1).reshape(W * L, K), floor)


def _onehot_flat(lab: jax.Array, n_classes: int, dtype: Any) -> jax.Array:
    """``[C, W * L]`` indicator of one chunk's answers (zeros where none)."""
    C, W = lab.shape
    oh = lab.astype(jnp.int32)[..., None] == jnp.arange(n_classes, dtype=jnp.int32)
    return oh.astype(dtype).reshape(C, W * n_classes)


def task_class_sum(labels: jax.Array, n_classes: int, table: jax.Array) -> jax.Array:
    """``out[t, k] = sum_w table[w, k, y_tw]`` over the answered cells: ``[T, K]``."""
    tab = _flat_table(table)
    dtype = table.dtype

    def body(carry, lab):
        return carry, jnp.matmul(_onehot_flat(lab, n_classes, dtype), tab, precision=_HIGHEST)

    return chunked(labels, (), body, None)[1]


def worker_confusion(labels: jax.Array, n_classes: int, post: jax.Array) -> jax.Array:
    """``out[w, k, l] = sum_t [y_tw = l] post[t, k]``: ``[W, K, L]``."""
    W, L, K = labels.shape[1], n_classes, post.shape[1]

    def body(acc, lab, p):
        oh = _onehot_flat(lab, L, p.dtype)
        return acc + jnp.matmul(oh.T, p, precision=_HIGHEST), None

    acc, _ = chunked(labels, (post,), body, jnp.zeros((W * L, K), post.dtype))
    return acc.reshape(W, L, K).transpose(0, 2, 1)


def task_vote(labels: jax.Array, n_classes: int, worker_weight: jax.Array) -> jax.Array:
    """``out[t, l] = sum_w worker_weight[w] [y_tw = l]``: ``[T, L]``.

    Each chunk is the reference's own contraction (so every task's sum over workers adds in
    the reference's order, and exact vote ties stay exact ties for the tie-breaking rule).
    """
    W, L = labels.shape[1], n_classes

    def body(carry, lab):
        oh = _onehot_flat(lab, L, worker_weight.dtype).reshape(lab.shape[0], W, L)
        return carry, jnp.einsum("twl,w->tl", oh, worker_weight, precision=_HIGHEST)

    return chunked(labels, (), body, None)[1]


def task_count(labels: jax.Array, n_classes: int, worker_weight: jax.Array) -> jax.Array:
    """:func:`task_vote` for whole-number weights (the annotators' mask): sums of whole numbers
    (below 2^24 in float32) are exact in any order, so one fused pass adds each task's votes
    worker by worker, without the one-hot array: 1,000,000 x 12 x 5 in ~5-7 ms instead of
    ~85 ms on the 2-core VM, the same sums to the bit. Past 16 annotators, a ``lax.scan`` over
    groups of 16."""
    T, W = labels.shape
    dtype = worker_weight.dtype
    cls = jnp.arange(n_classes, dtype=jnp.int32)
    zero = jnp.zeros((), dtype)

    def add(acc, lab, w):  # lab [T, G], w [G]: the group's votes added to acc
        lab = lab.astype(jnp.int32)
        for j in range(lab.shape[1]):
            acc = acc + jnp.where(lab[:, j, None] == cls, w[j], zero)
        return acc

    acc = jnp.zeros((T, n_classes), dtype)
    G = 16
    if W <= G:
        return add(acc, labels, worker_weight)
    n = -(-W // G)
    lab = jnp.pad(labels, ((0, 0), (0, n * G - W)), constant_values=-1)
    wts = jnp.pad(worker_weight, (0, n * G - W))
    xs = (lab.reshape(T, n, G).transpose(1, 0, 2), wts.reshape(n, G))
    return jax.lax.scan(lambda a, x: (add(a, *x), None), acc, xs)[0]


def worker_agreement(labels: jax.Array, n_classes: int, post: jax.Array) -> jax.Array:
    """``out[w] = sum_t post[t, y_tw]`` over the answered cells: ``[W]``."""
    W = labels.shape[1]

    def body(acc, lab, p):
        lab32 = lab.astype(jnp.int32)
        hit = jnp.take_along_axis(p, jnp.maximum(lab32, 0), axis=1)
        return acc + jnp.where(lab32 >= 0, hit, 0).sum(axis=0), None

    acc, _ = chunked(labels, (post,), body, jnp.zeros((W,), post.dtype))
    return acc


def _softmax(s: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(softmax(s), logsumexp(s))`` over the last axis with one ``exp`` per entry
    (``logsumexp`` then ``exp(s - log_z)`` computes it twice; exp is the dearest op here)."""
    top = s.max(axis=-1, keepdims=True)
    e = jnp.exp(s - top)
    tot = e.sum(axis=-1, keepdims=True)
    return e * (1.0 / tot), (top + jnp.log(tot))[..., 0]


def ds_posteriors(s: jax.Array, mask: jax.Array, gold: jax.Array
                  ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Dawid-Skene's E-step from the scores ``s [T, K]`` of some tasks: ``(posteriors, the
    masked log-likelihood, posteriors * mask)``; gold tasks (``gold >= 0``) are clamped to their
    class and scored at it."""
    K = s.shape[1]
    p, log_z = _softmax(s)
    is_gold = gold >= 0
    g0 = jnp.maximum(gold, 0)
    p = jnp.where(is_gold[:, None], jax.nn.one_hot(g0, K, dtype=s.dtype), p)
    gold_s = jnp.take_along_axis(s, g0[:, None], axis=1)[:, 0]
    ll = (jnp.where(is_gold, gold_s, log_z) * mask).sum()
    return p, ll, p * mask[:, None]


def ds_em_step(labels: jax.Array, n_classes: int, task_mask: jax.Array, gold: jax.Array,
               log_prior: jax.Array, log_conf: jax.Array
               ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    r"""Dawid-Skene's E-step and the M-step's sums in one pass over the task chunks.

    Per chunk: scores :math:`s_{tk} = \log\rho_k + \sum_w \log\pi^{(w)}_{k y_{tw}}` (indicator x table),
    :math:`\log Z_t = \mathrm{logsumexp}_k s_{tk}`, posteriors :math:`q_t = e^{s_t - \log Z_t}`
    (gold tasks clamped to their label), then the chunk's contributions to the confusion counts
    :math:`\sum_t [y_{tw} = l] q_t(k)`, to :math:`\sum_t q_t(k)` and to the log-likelihood.

    Returns:
        ``(post [T, K], ll, counts [W, K, L], post_sum [K])``: the E-step's posteriors and
        log-likelihood (gold tasks scored at their gold class), and the masked sums the
        M-step turns into new parameters. Equal to ``e_step`` then ``worker_confusion`` and
        ``post.sum(0)`` of :mod:`.dawid_skene` on the reference path.
    """
    W, L, K = labels.shape[1], n_classes, log_conf.shape[1]
    dtype = log_conf.dtype
    tab = _flat_table(log_conf)

    def body(carry, lab, mask, g):
        counts, psum, ll = carry
        oh = _onehot_flat(lab, L, dtype)
        p, ll_chunk, pm = ds_posteriors(log_prior + jnp.matmul(oh, tab, precision=_HIGHEST),
                                        mask, g)
        counts = counts + jnp.matmul(oh.T, pm, precision=_HIGHEST)
        return (counts, psum + pm.sum(axis=0), ll + ll_chunk), p

    init = (jnp.zeros((W * L, K), dtype), jnp.zeros((K,), dtype), jnp.zeros((), dtype))
    (counts, psum, ll), post = chunked(labels, (task_mask, gold), body, init)
    return post, ll, counts.reshape(W, L, K).transpose(0, 2, 1), psum


def _ds_params(counts: jax.Array, psum: jax.Array, smoothing: float) -> tuple[jax.Array, jax.Array]:
    """Dawid-Skene's M-step from the summed counts (same formulas as ``dawid_skene.m_step``)."""
    from ._core import TINY, normalize

    given = counts.sum(axis=1, keepdims=True) > 0
    c = jnp.where(given, jnp.maximum(counts, TINY), 0.0) + smoothing
    total = jnp.maximum(c.sum(axis=2, keepdims=True), TINY)
    log_conf = jnp.log(jnp.maximum(c, TINY)) - jnp.log(total)
    prior = jnp.maximum(normalize(psum + smoothing), TINY)
    return jnp.log(prior), log_conf


@functools.partial(jax.jit, static_argnames=("max_iter", "init_from_gold"))
def ds_fit_dense(data: Any, *, max_iter: int = 100, tol: float = 1e-5, smoothing: float = 0.01,
                 init_from_gold: bool = False):
    """Dawid-Skene on a :class:`~._core.Dense` panel with :func:`ds_em_step` as the iteration.

    Same model, start, stopping rule, objective and result (``dawid_skene.DSResult``) as
    ``dawid_skene.fit``; each iteration is one fused pass over the labels instead of an E-step
    pass and an M-step pass.
    """
    from . import dawid_skene as ds
    from ._core import iterate

    n_ans = jnp.maximum((data.labels >= 0).sum().astype(data.task_mask.dtype), 1.0)

    def step(state):
        post, ll, counts, psum = ds_em_step(data.labels, data.n_classes, data.task_mask,
                                            data.gold, state.log_prior, state.log_conf)
        obj = (ll + ds.log_prior_density(data, state.log_prior, state.log_conf, smoothing)) / n_ans
        log_prior, log_conf = _ds_params(counts, psum, smoothing)
        return ds.DSState(log_prior=log_prior, log_conf=log_conf, posteriors=post), obj

    state = ds.init(data, smoothing=smoothing, init_from_gold=init_from_gold)
    state, loop = iterate(step, state, max_iter=max_iter, tol=tol)
    return ds.DSResult(posteriors=state.posteriors, priors=jnp.exp(state.log_prior),
                       confusion=jnp.exp(state.log_conf), objective=loop.objective,
                       history=loop.history, n_iter=loop.n_iter, converged=loop.converged)


def subtype_sweep(labels: jax.Array, n_classes: int, n_subtypes: int, weight: jax.Array,
                  gold: jax.Array, bias: jax.Array, log_table: jax.Array, z_prev: jax.Array
                  ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array]:
    r"""One pass of a model whose latent state is a (class, subtype) pair (EBCC), fused.

    Columns ``c = k * M + m``. Per chunk: scores :math:`s_{tc} = b_c + \sum_w T_{w c y_{tw}}`
    (indicator x table; gold tasks keep only their class's columns), :math:`\log Z_t`,
    :math:`q_t(c) = e^{s_{tc} - \log Z_t}`, the class posterior :math:`z_t(k) = \sum_m q_t(k, m)`
    and its largest move from ``z_prev`` over the weighted tasks, then the weighted sums
    :math:`\sum_t w_t [y_{tw} = l] q_t(c)` and :math:`\sum_t w_t q_t(c)`. The ``[tasks, K * M]``
    posterior never leaves the chunk.

    Args:
        weight: ``[T]`` how many tasks each row stands for (0: padding).
        bias: ``[K * M]``; log_table: ``[W, K * M, L]``; z_prev: ``[T, K]``.

    Returns:
        ``(z [T, K], sum_t w_t log Z_t, counts [W, K * M, L], col_sum [K * M], dz)``.
    """
    W, L, KM = labels.shape[1], n_classes, log_table.shape[1]
    M, K = n_subtypes, KM // n_subtypes
    dtype = log_table.dtype
    # gold as K more indicator columns whose table rows rule out the other classes' columns: a
    # large finite negative (a select over the scores costs more than these K columns)
    off = jnp.asarray(jnp.finfo(dtype).min / 4, dtype)
    rule_out = jnp.where(jnp.arange(K)[:, None] == jnp.arange(KM)[None] // M, 0.0, off).astype(dtype)
    tab = jnp.concatenate([_flat_table(log_table), rule_out])

    def body(carry, lab, w, g, zp):
        counts, csum, ll, dz = carry
        oh = _onehot_flat(lab, L, dtype)
        gold_oh = (g[:, None] == jnp.arange(K, dtype=g.dtype)).astype(dtype)
        s = bias + jnp.matmul(jnp.concatenate([oh, gold_oh], axis=1), tab, precision=_HIGHEST)
        p, log_z = _softmax(s)
        z = p.reshape(-1, K, M).sum(axis=2)
        real = (w > 0).astype(dtype)
        dz = jnp.maximum(dz, (jnp.abs(z - zp) * real[:, None]).max())
        pw = p * w[:, None]
        counts = counts + jnp.matmul(oh.T, pw, precision=_HIGHEST)
        return (counts, csum + pw.sum(axis=0), ll + (w * log_z).sum(), dz), z

    init = (jnp.zeros((W * L, KM), dtype), jnp.zeros((KM,), dtype), jnp.zeros((), dtype),
            jnp.zeros((), dtype))
    (counts, csum, ll, dz), z = chunked(labels, (weight, gold, z_prev), body, init)
    return z, ll, counts.reshape(W, L, KM).transpose(0, 2, 1), csum, dz
