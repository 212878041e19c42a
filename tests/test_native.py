"""The native Dawid-Skene kernel (``aggregation._native``) equals the XLA path, for Dawid-Skene,
one-coin Dawid-Skene, IBCC (VB), MACE (EM and VB) and BWA (vote passes); and the GLAD kernels (``native/glad.cc``)
equal GLAD's XLA E-step, gradient and Q, and the native GLAD fit the XLA fit.

Kernel level: the per-combination sums, turned into confusion counts and class totals, equal the
fused XLA pass's (``_fast.ds_em_step``) on panels with missing answers, gold, padding rows, every
class count 1-8, annotator counts that leave a short last group, and more than three groups (the
general row-merging path); the merged rows are exactly numpy's distinct rows. Fit level: the
native fit equals ``dawid_skene.fit`` (posteriors, confusion matrices, objective history) on real
datasets and on data drawn from Dawid-Skene's own generative story, with and without gold.
Fallback: where the kernel cannot run (turned off, no compiler), DawidSkene uses the XLA path
and says so; ``native='on'`` refuses with the reason. The build cache: built once, reused, safe
under concurrent first uses.
"""

from __future__ import annotations

import functools
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from crowdllm.aggregation import (BWA, EBCC, GLAD, IBCC, MACE, DawidSkene, OneCoinDawidSkene,
                                  Wawa, ZeroBasedSkill, _core, _fast, _native, bwa, dawid_skene,
                                  ebcc, glad, ibcc, mace, majority_vote, one_coin, wawa,
                                  zero_based_skill)
from crowdllm.labels import LabelTensor

from conftest import DATA

WHY = _native.why_unavailable()
needs_kernel = pytest.mark.skipif(WHY is not None, reason=f"native kernel unavailable: {WHY}")


def _hide(lab, truth, rng, missing, gold_frac):
    """``(lab, gold, truth)``: a fraction of the answers removed, some tasks' truth as gold."""
    T, W = lab.shape
    lab[rng.random((T, W)) < missing] = -1
    gold = np.where(rng.random(T) < gold_frac, truth, -1).astype(np.int32)
    return lab, gold, truth


def _draw(T, W, K, missing, gold_frac, seed):
    """Answers drawn from Dawid-Skene's generative story (a confusion matrix per annotator)."""
    rng = np.random.default_rng(seed)
    prior = rng.dirichlet(np.ones(K) * 3)
    truth = rng.choice(K, T, p=prior)
    conf = rng.dirichlet(np.ones(K) * 0.6, (W, K)) * 0.5 + np.eye(K)[None] * 0.5  # [W, K, L]
    u = rng.random((T, W, 1))
    lab = (u > np.cumsum(conf[np.arange(W)[None, :], truth[:, None]], axis=-1)).sum(-1)
    lab = np.minimum(lab, K - 1).astype(np.int8)
    return _hide(lab, truth, rng, missing, gold_frac)


def _step_inputs(T, W, K, missing, gold_frac, seed, pad=5):
    rng = np.random.default_rng(seed + 100)
    lab, gold, _ = _draw(T, W, K, missing, gold_frac, seed)
    lab[0] = -1  # a task nobody answered
    mask = np.ones(T, np.float32)
    mask[-pad:] = 0  # padding rows
    lab[-pad:] = -1
    gold[-pad:] = -1
    log_conf = np.log(rng.dirichlet(np.ones(K) * 2, (W, K))).astype(np.float32)
    log_prior = np.log(rng.dirichlet(np.ones(K) * 5)).astype(np.float32)
    return (jnp.asarray(lab), jnp.asarray(mask), jnp.asarray(gold), jnp.asarray(log_prior),
            jnp.asarray(log_conf))


@needs_kernel
@pytest.mark.parametrize("T,W,K,missing,gold_frac", [
    (1003, 12, 5, 0.2, 0.1),    # 3 groups of 4 (the LLM-panel shape), a ragged last block
    (64, 1, 2, 0.0, 0.0),       # one annotator
    (777, 13, 3, 0.5, 0.1),     # groups of 6, 6 and 1
    (500, 7, 8, 0.1, 0.2),      # 8 classes: groups of 3, 3, 1
    (9, 3, 1, 0.0, 0.0),        # one class, fewer rows than a block
    (40_000, 30, 5, 0.3, 0.05),  # 8 groups (rows merged through the general path), 2 threads
])
def test_sums_equal_the_fused_xla_pass(T, W, K, missing, gold_frac):
    labels, mask, gold, log_prior, log_conf = _step_inputs(T, W, K, missing, gold_frac, seed=T)
    post, ll, counts, psum = _fast.ds_em_step(labels, K, mask, gold, log_prior, log_conf)
    p = _native.plan(W, K)

    @jax.jit  # one program, as in a fit (op by op, each op compiles on its own: ~90 per case)
    def native(labels, mask, gold, log_prior, log_conf):
        rows = _native.unique(_native.encode(labels, p), _native.flags_of(mask, gold))
        tab = _native.tables(p, log_prior, log_conf)
        C, ll2 = _native.sums(rows, tab, K)
        return (*_native.counts_from(p, C, K), ll2, _native.posteriors(rows, tab, K))

    counts2, psum2, ll2, post2 = native(labels, mask, gold, log_prior, log_conf)
    np.testing.assert_allclose(np.asarray(counts2), np.asarray(counts), rtol=2e-5, atol=2e-4)
    np.testing.assert_allclose(np.asarray(psum2), np.asarray(psum), rtol=2e-5, atol=2e-4)
    np.testing.assert_allclose(float(ll2), float(ll), rtol=2e-6)
    real = np.asarray(mask) > 0
    np.testing.assert_allclose(np.asarray(post2)[real], np.asarray(post)[real], atol=1e-5)
    assert (np.asarray(post2)[~real] == 0).all()
    # the counts sum to the answers of the real rows (what ds_fit uses as n_answers)
    n_ans = int((np.asarray(labels)[real] >= 0).sum())
    assert abs(float(counts2.sum()) - n_ans) <= 1e-5 * n_ans + 1e-3


@needs_kernel
@pytest.mark.parametrize("T,W,K", [  # G = 3 (64-bit keys) and G = 8 (row compare); 80,000 tasks:
    (20_000, 12, 5), (80_000, 12, 5), (20_000, 30, 5)])  # the key table doubles twice on the way
def test_merged_rows_are_the_distinct_rows(T, W, K):
    labels, mask, gold, _, _ = _step_inputs(T, W, K, 0.6, 0.1, seed=W)
    lab = np.asarray(labels)
    if W == 30:  # many repeats on the general path too
        lab = lab[np.random.default_rng(0).integers(0, 500, lab.shape[0])]
        labels = jnp.asarray(lab)
    p = _native.plan(W, K)
    codes = _native.encode(labels, p)
    flags = _native.flags_of(mask, gold)
    rows = _native.unique(codes, flags)
    n = int(rows.n[0])
    real = np.asarray(mask) > 0
    key = np.concatenate([lab, np.asarray(flags)[:, None]], axis=1)[real]
    distinct, counts = np.unique(key, axis=0, return_counts=True)
    assert n == len(distinct)
    inv = np.asarray(rows.inverse)
    assert (inv[~real] == -1).all()
    # each task's merged row has its codes and gold; the weights count the tasks
    np.testing.assert_array_equal(np.asarray(rows.codes)[inv[real]], np.asarray(codes)[real])
    np.testing.assert_array_equal(np.asarray(rows.flags)[inv[real]], np.asarray(flags)[real])
    np.testing.assert_array_equal(np.asarray(rows.weights)[:n],
                                  np.bincount(inv[real], minlength=n).astype(np.float32))
    assert sorted(np.asarray(rows.weights)[:n].astype(int)) == sorted(counts.tolist())
    assert (np.asarray(rows.weights)[n:] == 0).all()
    # the distinct rows come in the order of their first task
    ids, first = np.unique(inv[real], return_index=True)
    assert (ids == np.arange(n)).all() and (np.diff(first) > 0).all()
    if T == 80_000:
        assert n > 65_536  # enough distinct rows to grow the table from 65,536 slots twice


def _tensor(lab, K):
    return LabelTensor.from_dense(lab, classes=[f"c{k}" for k in range(K)])


@needs_kernel
@pytest.mark.parametrize("T,W,K,gold_frac,init_from_gold", [
    (3000, 12, 5, 0.05, False), (3000, 12, 5, 0.05, True), (2000, 9, 3, 0.1, False),
    (2000, 9, 3, 0.1, True), (1500, 20, 2, 0.0, False)])  # init from gold needs gold
def test_native_fit_equals_the_xla_fit_on_sampled_data(T, W, K, gold_frac, init_from_gold):
    lab, gold, truth = _draw(T, W, K, 0.3, gold_frac, seed=W)
    data = _core.prepare(_tensor(lab, K), layout="dense", gold=gold, dtype=jnp.float32)
    assert _native.applies(data, jnp.float32) is None
    a = dawid_skene.fit(data, max_iter=40, tol=-1.0, init_from_gold=init_from_gold)
    b = _native.ds_fit(data, max_iter=40, tol=-1.0, init_from_gold=init_from_gold)
    assert int(a.n_iter) == int(b.n_iter) == 40
    np.testing.assert_allclose(np.asarray(b.posteriors)[:T], np.asarray(a.posteriors)[:T], atol=1e-5)
    np.testing.assert_allclose(np.asarray(b.confusion), np.asarray(a.confusion), atol=1e-5)
    np.testing.assert_allclose(np.asarray(b.priors), np.asarray(a.priors), atol=1e-5)
    np.testing.assert_allclose(np.asarray(b.history), np.asarray(a.history), rtol=1e-5)
    # and it is a good Dawid-Skene fit: above majority vote on data from the model
    mv = np.asarray(_core.normalize(jnp.asarray(np.stack([(lab == k).sum(1) for k in range(K)], 1),
                                                jnp.float32))).argmax(1)
    assert (np.asarray(b.posteriors)[:T].argmax(1) == truth).mean() >= (mv == truth).mean()


@needs_kernel
@pytest.mark.parametrize("T,W,K,gold_frac", [(3000, 12, 5, 0.05), (1500, 20, 2, 0.0)])
def test_native_one_coin_fit_equals_the_xla_fit_on_sampled_data(T, W, K, gold_frac):
    lab, gold, truth = _draw(T, W, K, 0.3, gold_frac, seed=W + 1)
    data = _core.prepare(_tensor(lab, K), layout="dense", gold=gold, dtype=jnp.float32)
    a = one_coin.fit(data, max_iter=40, tol=-1.0)
    b = _native.onecoin_fit(data, max_iter=40, tol=-1.0)
    assert int(a.n_iter) == int(b.n_iter) == 40
    np.testing.assert_allclose(np.asarray(b.posteriors)[:T], np.asarray(a.posteriors)[:T], atol=1e-5)
    np.testing.assert_allclose(np.asarray(b.skills), np.asarray(a.skills), atol=1e-5)
    np.testing.assert_allclose(np.asarray(b.history), np.asarray(a.history), rtol=1e-5)


@needs_kernel
@pytest.mark.parametrize("T,W,K,gold_frac", [(3000, 12, 5, 0.05), (2000, 9, 3, 0.1),
                                             (500, 7, 8, 0.1)])
def test_native_ibcc_equals_the_xla_vb_on_sampled_data(T, W, K, gold_frac):
    lab, gold, truth = _draw(T, W, K, 0.3, gold_frac, seed=W + 2)
    data = _core.prepare(_tensor(lab, K), layout="dense", gold=gold, dtype=jnp.float32)
    # the reference stopping rule (a class posterior moves by <= 1e-3), and 30 sweeps exactly
    for kw in ({"max_iter": 500, "tol": -np.inf, "atol": 1e-3},
               {"max_iter": 30, "tol": -np.inf, "atol": -1.0}):
        a = ibcc.fit(data, **kw)
        b = _native.ibcc_fit(data, **kw)
        assert int(a.n_iter) == int(b.n_iter) and 3 < int(b.n_iter) < 500
        np.testing.assert_allclose(np.asarray(b.posteriors)[:T], np.asarray(a.posteriors)[:T],
                                   atol=1e-5)
        np.testing.assert_allclose(np.asarray(b.mu), np.asarray(a.mu), rtol=1e-5)
        np.testing.assert_allclose(np.asarray(b.nu), np.asarray(a.nu), rtol=1e-5)
        np.testing.assert_allclose(np.asarray(b.history), np.asarray(a.history), rtol=1e-5)
        assert bool(b.converged) == bool(a.converged)


def _draw_mace(T, W, K, missing, gold_frac, seed):
    """Answers drawn from MACE's story: annotator w knows (answers the truth) w.p. theta_w, else
    draws from their own strategy xi_w."""
    rng = np.random.default_rng(seed)
    truth = rng.choice(K, T, p=rng.dirichlet(np.ones(K) * 3))
    theta = rng.uniform(0.2, 0.9, W)
    xi = rng.dirichlet(np.ones(K) * 0.5, W)
    spam = np.stack([rng.choice(K, T, p=xi[w]) for w in range(W)], axis=1)
    lab = np.where(rng.random((T, W)) < theta, truth[:, None], spam).astype(np.int8)
    return _hide(lab, truth, rng, missing, gold_frac)


@needs_kernel
@pytest.mark.parametrize("method,learn_prior,init_from_gold", [
    ("vb", True, False), ("em", False, True)])
def test_native_mace_equals_the_xla_restarts_on_sampled_data(method, learn_prior, init_from_gold):
    T, W, K = 2500, 10, 4
    lab, gold, truth = _draw_mace(T, W, K, 0.3, 0.05, seed=len(method) + learn_prior)
    data = _core.prepare(_tensor(lab, K), layout="dense", gold=gold, dtype=jnp.float32)
    keys = jax.random.split(jax.random.key(3), 3)
    kw = dict(method=method, smoothing=0.01 / K, learn_prior=learn_prior,
              init_from_gold=init_from_gold)
    # a fixed 25 iterations: the same sweeps
    a = mace.fit_restarts(data, keys, max_iter=25, tol=-1.0, **kw)
    b = _native.mace_fit_restarts(data, keys, max_iter=25, tol=-1.0, **kw)
    np.testing.assert_array_equal(np.asarray(b.n_iter), 25)
    np.testing.assert_allclose(np.asarray(b.posteriors)[:, :T], np.asarray(a.posteriors)[:, :T],
                               atol=1e-5)
    np.testing.assert_allclose(np.asarray(b.knowing), np.asarray(a.knowing), atol=1e-5)
    np.testing.assert_allclose(np.asarray(b.strategy), np.asarray(a.strategy), atol=1e-5)
    np.testing.assert_allclose(np.asarray(b.priors), np.asarray(a.priors), atol=1e-5)
    np.testing.assert_allclose(np.asarray(b.start_knowing), np.asarray(a.start_knowing), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(b.history), np.asarray(a.history), rtol=1e-5)
    if not init_from_gold:  # the restarts differ (from gold: every annotator here answered gold)
        assert np.unique(np.asarray(b.start_knowing)[:, 0]).size == 3
    # the stopping rule, each restart on its own: the gains near tol differ by float rounding
    # (~1e-6 per answer: XLA sums the log-likelihood in float32), so a restart may stop one
    # sweep apart; each stops after its first gain below tol
    a = mace.fit_restarts(data, keys, max_iter=200, tol=1e-5, **kw)
    b = _native.mace_fit_restarts(data, keys, max_iter=200, tol=1e-5, **kw)
    for r in range(3):
        n, n_xla = int(b.n_iter[r]), int(a.n_iter[r])
        assert 3 < n < 200 and abs(n - n_xla) <= 1 and bool(b.converged[r])
        gains = np.diff(np.asarray(b.history[r])[:n])
        assert (gains[:-1] >= 1e-5).all() and gains[-1] < 1e-5
        m = min(n, n_xla)
        np.testing.assert_allclose(np.asarray(b.history[r])[:m], np.asarray(a.history[r])[:m],
                                   rtol=1e-5)
    # a good MACE fit: above majority vote on data from the model
    best = mace.best_restart(b)
    mv = np.stack([(lab == k).sum(1) for k in range(K)], 1).argmax(1)
    assert (np.asarray(best.posteriors)[:T].argmax(1) == truth).mean() > (mv == truth).mean()


def _draw_glad(T, W, K, missing, gold_frac, seed):
    """Answers drawn from GLAD's story: right w.p. sigma(alpha_w beta_t), else another class."""
    rng = np.random.default_rng(seed)
    truth = rng.choice(K, T)
    alpha = rng.normal(1.5, 1.0, W)
    beta = np.exp(rng.normal(0.3, 0.5, T))
    right = rng.random((T, W)) < 1 / (1 + np.exp(-alpha[None] * beta[:, None]))
    other = (truth[:, None] + rng.integers(1, max(K, 2), (T, W))) % K
    lab = np.where(right, truth[:, None], other).astype(np.int8)
    return _hide(lab, truth, rng, missing, gold_frac)


@needs_kernel
@pytest.mark.parametrize("T,W,K", [(1003, 12, 5), (301, 7, 8), (250, 5, 2), (97, 3, 1)])
def test_glad_passes_equal_the_xla_e_step_gradient_and_q(T, W, K):
    """Every row (no merging) with padding rows, gold, missing answers, a task nobody answered,
    and row counts that leave a partial block of 8."""
    lab, gold, _ = _draw_glad(T, W, K, 0.25, 0.1, seed=T)
    lab[0] = -1
    data = _core.prepare(_tensor(lab, K), layout="dense", gold=gold, dtype=jnp.float32)
    n_rows = data.n_tasks
    rng = np.random.default_rng(1)
    prm = glad.GladParams(jnp.asarray(rng.normal(1, 2, W), jnp.float32),
                          jnp.asarray(rng.normal(0.5, 1, n_rows), jnp.float32))
    log_prior = jnp.log(jnp.asarray(rng.dirichlet(np.ones(K) * 3), jnp.float32))

    # each side as one jitted program, as the fits run them (op by op, each op would compile on
    # its own: ~110 small compiles per case)
    @jax.jit
    def xla(data, prm, log_prior):
        post, ll, x, log_right = glad._e_parts(data, prm, log_prior)
        view = glad.answer_view(data)
        p_right = glad.gather_posterior(data, post, view)
        q = glad._q_answers(x, log_right, p_right, view)
        return post, ll, p_right, q, glad.q_grad(data, prm, p_right, 0.0, 0.0)

    lab_b, flags, wts, n, _ = _native.glad_rows(data, merge=False)  # counts rows on the host
    assert int(n[0]) == n_rows and flags.shape[0] % 8 == 0 and flags.shape[0] >= n_rows
    pad = flags.shape[0] - n_rows  # the kernels' rows: a multiple of 8

    @jax.jit
    def native(prm, log_prior, p_right):
        log_beta = jnp.pad(prm.log_beta, (0, pad))
        post_n, p_n, ll_n, q_n, class_n = _native.glad_e(
            lab_b, flags, wts, n, prm.alpha, log_beta, log_prior, jnp.zeros(lab_b.shape), True)
        p_in = _native.block(jnp.pad(p_right, ((0, pad), (0, 0))))
        da, db, q2 = _native.glad_grad(lab_b, wts, n, p_in, prm.alpha, log_beta, q=True)
        return post_n, _native.unblock(p_n), ll_n, q_n, class_n, da, db, q2

    post, ll, p_right, q_xla, g = xla(data, prm, log_prior)
    post_n, p_rows, ll_n, q_n, class_n, da, db, q2 = native(prm, log_prior, p_right)
    real = np.asarray(data.task_mask) > 0
    np.testing.assert_allclose(np.asarray(post_n)[:n_rows][real], np.asarray(post)[real],
                               atol=2e-6)
    p_rows = np.asarray(p_rows)[:n_rows]
    np.testing.assert_allclose(p_rows[real], np.asarray(p_right)[real], atol=2e-6)
    assert float(ll_n) == pytest.approx(float(ll), rel=1e-5)
    assert float(q_n) == pytest.approx(float(q_xla), rel=1e-5)
    np.testing.assert_allclose(np.asarray(class_n), np.asarray(post)[real].sum(0), rtol=1e-5)
    db = np.asarray(db)[:n_rows]
    # priors' terms in the gradient: d = -(theta - 0)
    np.testing.assert_allclose(np.asarray(da) - np.asarray(prm.alpha), np.asarray(g.alpha),
                               rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose((np.asarray(db) - np.asarray(prm.log_beta))[real],
                               np.asarray(g.log_beta)[real], rtol=1e-4, atol=1e-4)
    assert float(q2) == pytest.approx(float(q_xla), rel=1e-5)


def _on_threads(monkeypatch, threads):
    """The native kernels called from now on run on ``threads`` threads."""
    monkeypatch.setattr(_native, "_threads", lambda: threads)
    jax.clear_caches()  # the thread count is an attribute of the compiled calls


def _same_floats_on_1_2_3_threads(monkeypatch, fit):
    """``fit()`` (a tuple of arrays) run with the native kernels on 1, 2 and 3 threads gives the
    same floats each time."""
    fits = []
    for threads in (1, 2, 3):
        _on_threads(monkeypatch, threads)
        fits.append([np.asarray(x) for x in fit()])
    for other in fits[1:]:
        for a, b in zip(fits[0], other):
            np.testing.assert_array_equal(a, b)


@needs_kernel
@pytest.mark.parametrize("K", [1, 2, 3, 5])
def test_posteriors_of_every_row_on_1_2_3_threads(monkeypatch, K):
    """The posterior passes (softmax of the table sums, ratio of two tables' sums) write every
    task's posteriors, whichever thread writes its neighbours: against numpy on 1, 2 and 3
    threads. With K < 4 a row's 8-lane store reaches past the next row: unmasked at the end of
    a thread's share, it overwrote the next share's first rows (binary Dawid-Skene posteriors
    of two tasks at each thread boundary were zeros)."""
    T, W = 3 * 4096 + 13, 7
    rng = np.random.default_rng(K)
    lab = rng.integers(-1, K, (T, W)).astype(np.int8)
    gold = np.where(rng.random(T) < 0.05, rng.integers(0, K, T), -1).astype(np.int32)
    data = _core.prepare(_tensor(lab, K), layout="dense", gold=gold, dtype=jnp.float32)
    p = _native.plan(W, K)
    rows = _native.every_row(_native.encode(data.labels, p),
                             _native.flags_of(data.task_mask, data.gold))
    codes, flags = np.asarray(rows.codes), np.asarray(rows.flags)
    tab = jnp.asarray(rng.normal(size=(p.n_combos, 8)), jnp.float32)
    den = jnp.asarray(rng.random((p.n_combos, 8)) + 0.5, jnp.float32)
    s = np.asarray(tab)[codes].sum(1)[:, :K]  # [T, K]: each row's table sums
    soft = np.exp(s - s.max(1, keepdims=True))
    soft /= soft.sum(1, keepdims=True)
    ratio = s / np.asarray(den)[codes].sum(1)[:, :K]
    for ref in (soft, ratio):
        g = flags >= 0
        ref[g] = np.eye(K)[flags[g]]
    for threads in (1, 2, 3):
        _on_threads(monkeypatch, threads)
        post = np.asarray(_native.posteriors(rows, tab, K))
        np.testing.assert_allclose(post, soft, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(np.asarray(_native.ratio_values(rows, tab, den, K)), ratio,
                                   rtol=1e-4, atol=1e-5)


@needs_kernel
def test_glad_passes_do_not_depend_on_the_number_of_threads(monkeypatch):
    """The GLAD passes sum fixed chunks of rows, whichever thread takes a chunk: a fit on 1, 2
    and 3 threads gives the same floats (a panel of more than two chunks of distinct rows)."""
    T, W, K = 9000, 12, 5
    lab, gold, _ = _draw_glad(T, W, K, 0.2, 0.02, seed=11)
    data = _core.prepare(_tensor(lab, K), layout="dense", gold=gold, dtype=jnp.float32)
    assert int(_native.glad_rows(data)[3][0]) > 2 * 4096

    def fit():
        res = _native.glad_fit(data, max_iter=8, tol=-1.0)
        return res.posteriors, res.alphas, res.betas, res.history

    _same_floats_on_1_2_3_threads(monkeypatch, fit)


@needs_kernel
def test_kept_worker_threads_serve_changing_thread_counts_and_concurrent_calls(monkeypatch):
    """The native kernels' worker threads are kept between calls (``native/simd.h``: Workers).
    GLAD fits on 4, 2 and 4 threads in turn (a worker sits the 2-thread calls out, then takes
    its share again), and four fits at once from four Python threads (a call that finds the
    workers busy starts threads of its own), each give the floats of the same fit on one
    thread. A worker that ran a call twice, or missed one, or a caller that returned before its
    workers were done, would change or lose a share of the sums."""
    panels = []
    for seed in range(4):
        lab, gold, _ = _draw_glad(9000, 12, 5, 0.2, 0.02, seed=20 + seed)
        panels.append(_core.prepare(_tensor(lab, 5), layout="dense", gold=gold,
                                    dtype=jnp.float32))

    def fit(data):
        res = _native.glad_fit(data, max_iter=6, tol=-1.0)
        return [np.asarray(x) for x in (res.posteriors, res.alphas, res.betas, res.history)]

    def same(a, b):
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x, y)

    _on_threads(monkeypatch, 1)
    alone = [fit(d) for d in panels]
    for threads in (4, 2, 4):
        _on_threads(monkeypatch, threads)
        for d, want in zip(panels, alone):
            same(fit(d), want)
    _on_threads(monkeypatch, 3)
    fit(panels[0])  # compiled before the threads start
    got = [None] * len(panels)
    errors = []

    def run(i):
        try:
            got[i] = fit(panels[i])
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    ts = [threading.Thread(target=run, args=(i,)) for i in range(len(panels))]
    for t in ts:
        t.start()
    for t in ts:
        t.join(timeout=300)
    assert not errors and not any(t.is_alive() for t in ts)
    for g, want in zip(got, alone):
        same(g, want)


@needs_kernel
@pytest.mark.parametrize("lr,q_shift,tries", [(0.05, 0.0, 1), (40.0, 0.0, None),
                                              (0.05, np.inf, 4)])
def test_native_m_step_equals_adam_steps_on_the_pass_gradients(lr, q_shift, tries):
    """``_native.glad_m`` (Adam, the difficulties stepped inside the gradient pass, the Q check
    and the retries in C++) against ``glad.adam_steps`` driven by the gradient and Q passes (the
    path it replaced, whose passes equal XLA's): a first-try step, a step so long that Q falls
    and it is retried with smaller ones, and a Q target no step reaches (every try rejected:
    the old parameters and moments come back). Rows as drawn, a partial block of 8, padding
    rows past n, weighted (merged) rows, a non-zero Adam state and gold rows. The call also
    returns the next E-step (each try's Q check is that E pass, written into the scratch
    buffer): it must be ``glad_e``'s at the returned parameters and the next log prior (not the
    one q_t(y_tw) came from), and the old q_t(y_tw), which every try's gradients read, must be
    left as it was. That E pass also returns the gradient sums there (g1, the next M-step's
    first step): the gradient pass's at the returned parameters and q_t(y_tw). Given the first
    step's gradient sums (g1 from the E pass at the start), the call takes the same steps as
    when it sums them in a pass."""
    T, W, K = 1003, 12, 5
    lab, gold, _ = _draw_glad(T, W, K, 0.25, 0.1, seed=3)
    data = _core.prepare(_tensor(lab, K), layout="dense", gold=gold, dtype=jnp.float32)
    lab_b, flags, wts, n, _ = _native.glad_rows(data)  # distinct rows, weighted
    S, R = flags.shape[0], int(n[0])
    assert R % 8 and S > R  # a partial block, and rows past n stepped with a zero gradient
    rng = np.random.default_rng(5)
    f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
    prm = glad.GladParams(f32(rng.normal(1, 1, W)), f32(np.r_[rng.normal(0.5, 1, R),
                                                             np.ones(S - R)]))
    opt = glad._optimizer().init(prm)
    opt = opt._replace(count=jnp.asarray(3, jnp.int32),
                       mu=glad.GladParams(f32(rng.normal(0, .1, W)),
                                          f32(np.r_[rng.normal(0, .1, R), np.zeros(S - R)])),
                       nu=glad.GladParams(f32(rng.uniform(0, .1, W)),
                                          f32(np.r_[rng.uniform(0, .1, R), np.zeros(S - R)])))
    log_prior = jnp.full((K,), -np.log(K), jnp.float32)
    _, p_right, _, q_ans, _ = _native.glad_e(lab_b, flags, wts, n, prm.alpha, prm.log_beta,
                                             log_prior, jnp.zeros(lab_b.shape))
    state = glad.GladState(prm, opt, log_prior, p_right, jnp.asarray(0.5, jnp.float32))
    wm = jnp.ones(W, jnp.float32)

    def prior(p):
        return glad.gaussian_log_priors(p, wm, wts, 1.0, 1.0)

    q_old = q_ans + prior(prm) + q_shift

    @jax.jit
    def reference(state, q_old):
        def q_fn(p):
            return _native.glad_grad(lab_b, wts, n, p_right, p.alpha, p.log_beta, grad=False,
                                     q=True)[2] + prior(p)

        def grad_fn(p):
            return _native._glad_pass_grad(lab_b, wts, n, p_right, p, wm, 1.0, 1.0)

        return glad.adam_steps(state, q_old, q_fn, grad_fn, lr=lr, m_steps=5)

    a_prm, a_opt, a_scale = reference(state, q_old)
    prior_next = f32(np.log([0.4, 0.25, 0.15, 0.12, 0.08]))
    scratch = jnp.full(lab_b.shape, np.nan, jnp.float32)
    m_step = jax.jit(functools.partial(_native.glad_m, lr=lr, m_steps=5, mu_alpha=1.0,
                                       mu_beta=1.0))
    for which, bufs in ((0, (p_right, scratch)), (1, (scratch, p_right))):
        b_prm, b_opt, b_scale, b_tries, b_bufs, b_e, b_g1 = m_step(
            lab_b, flags, wts, n, (*bufs, jnp.asarray(which)), state, q_old, wm, prior_next)
        _, p_new, *e_next = _native.glad_e(lab_b, flags, wts, n, b_prm.alpha, b_prm.log_beta,
                                           prior_next, jnp.zeros(lab_b.shape))
        # the E pass's gradient sums: the gradient pass's there (sigma(x) from exp(-|x|), not
        # 1 / (1 + exp(-x)): float32 rounding apart)
        g_a, g_b, _ = _native.glad_grad(lab_b, wts, n, p_new, b_prm.alpha, b_prm.log_beta)
        np.testing.assert_allclose(np.asarray(b_g1)[:W], np.asarray(g_a), rtol=1e-5,
                                   atol=1e-5 * np.abs(np.asarray(g_a)).max())
        np.testing.assert_allclose(np.asarray(b_g1)[W:], np.asarray(g_b), rtol=1e-5,
                                   atol=1e-5 * np.abs(np.asarray(g_b)).max())
        assert np.abs(np.asarray(g_b)[:R]).max() > 1e-2 and np.all(np.asarray(b_g1)[W + R:] == 0)
        assert int(b_bufs[2]) == 1 - which
        # the same kernel at the same inputs: the same floats
        np.testing.assert_array_equal(np.asarray(b_bufs[1 - which]), np.asarray(p_new))
        np.testing.assert_array_equal(np.asarray(b_bufs[which]), np.asarray(p_right))
        for x, y in zip(b_e, e_next):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
        assert np.abs(np.asarray(p_new) - np.asarray(p_right)).max() > 1e-2
    # given the first step's gradient sums (the E pass's at the start), the same steps
    _, _, _, _, _, _, g1_start = m_step(lab_b, flags, wts, n, (scratch, p_right, jnp.asarray(1)),
                                        state, jnp.asarray(np.inf), wm, log_prior)
    c_prm, c_opt, c_scale, c_tries, _, c_e, _ = m_step(
        lab_b, flags, wts, n, (p_right, scratch, jnp.asarray(0)), state, q_old, wm, prior_next,
        (g1_start, 1))
    assert int(c_tries) == int(b_tries) and float(c_scale) == float(b_scale)
    for x, y in [(b_prm.alpha, c_prm.alpha), (b_prm.log_beta, c_prm.log_beta),
                 (b_opt.nu.log_beta, c_opt.nu.log_beta)]:
        x, y = np.asarray(x), np.asarray(y)
        np.testing.assert_allclose(y, x, rtol=1e-5, atol=1e-5 * np.abs(x).max())
    np.testing.assert_allclose(np.asarray(c_e[0]), np.asarray(b_e[0]), rtol=1e-5)
    if tries is not None:
        assert int(b_tries) == tries
    else:  # the long step lowered Q at least once before a shorter one was kept
        assert 1 < int(b_tries) < 4 and float(b_scale) < 0.5
    assert float(b_scale) == float(a_scale)
    assert int(b_opt.count) == int(a_opt.count) == (3 if tries == 4 else 8)
    # the same float32 steps, rounded in another order (and in another order of the gradients'
    # sums after the first step): within 1e-4 of each array's scale (measured: 1.4e-5 at most)
    for a, b in [(a_prm, b_prm), (a_opt.mu, b_opt.mu), (a_opt.nu, b_opt.nu)]:
        for x, y in [(a.alpha, b.alpha), (a.log_beta, b.log_beta)]:
            x, y = np.asarray(x), np.asarray(y)
            np.testing.assert_allclose(y, x, rtol=1e-4, atol=1e-4 * np.abs(x).max())
    if tries == 4:  # nothing kept: exactly the state it was given
        np.testing.assert_array_equal(np.asarray(b_prm.log_beta), np.asarray(prm.log_beta))
        np.testing.assert_array_equal(np.asarray(b_opt.nu.alpha), np.asarray(opt.nu.alpha))
    else:
        assert np.abs(np.asarray(b_prm.log_beta) - np.asarray(prm.log_beta))[:R].max() > 1e-3
    np.testing.assert_array_equal(np.asarray(b_prm.log_beta)[R:], 1.0)


@needs_kernel
@pytest.mark.parametrize("merge,learn_prior,init_from_gold,m_step", [
    (True, False, False, "native"), (True, True, True, "native"), (False, True, False, "native"),
    (True, True, True, "jax")])
def test_native_glad_fit_equals_the_xla_fit_on_sampled_data(merge, learn_prior, init_from_gold,
                                                            m_step):
    T, W, K = 3000, 10, 4
    lab, gold, truth = _draw_glad(T, W, K, 0.3, 0.05, seed=7)
    data = _core.prepare(_tensor(lab, K), layout="dense", gold=gold, dtype=jnp.float32)
    kw = dict(max_iter=20, tol=-1.0, learn_prior=learn_prior, init_from_gold=init_from_gold)
    a = glad.fit(data, **kw)
    b = _native.glad_fit(data, merge=merge, m_step=m_step, **kw)
    assert int(a.n_iter) == int(b.n_iter) == 20
    np.testing.assert_allclose(np.asarray(b.posteriors)[:T], np.asarray(a.posteriors)[:T],
                               atol=1e-5)
    np.testing.assert_allclose(np.asarray(b.alphas), np.asarray(a.alphas), rtol=1e-5, atol=1e-6)
    # a task's difficulty takes 100 Adam steps of its own gradient (a sum of ~7 float32 terms
    # in another order): up to ~2e-5 apart
    np.testing.assert_allclose(np.asarray(b.betas)[:T], np.asarray(a.betas)[:T], rtol=1e-4)
    np.testing.assert_allclose(np.asarray(b.priors), np.asarray(a.priors), atol=1e-6)
    np.testing.assert_allclose(np.asarray(b.history), np.asarray(a.history), rtol=1e-5)
    # tasks with the same answers (and no gold) end with the same difficulty
    rows, inv, counts = np.unique(lab, axis=0, return_inverse=True, return_counts=True)
    same = np.flatnonzero((inv.reshape(-1) == counts.argmax()) & (gold < 0))
    assert same.size > 2 and np.ptp(np.asarray(b.betas)[same]) == 0
    mv = np.stack([(lab == k).sum(1) for k in range(K)], 1).argmax(1)
    assert (np.asarray(b.posteriors)[:T].argmax(1) == truth).mean() >= (mv == truth).mean()


def _draw_bwa(T, W, K, missing, gold_frac, seed):
    """Answers as BWA sees them: each annotator right with their own accuracy, otherwise a
    uniformly drawn other class (indicators = truth + annotator noise)."""
    rng = np.random.default_rng(seed)
    truth = rng.choice(K, T, p=rng.dirichlet(np.ones(K) * 4))
    acc = rng.uniform(0.35, 0.95, W)
    other = (truth[:, None] + rng.integers(1, max(K, 2), (T, W))) % K
    lab = np.where(rng.random((T, W)) < acc, truth[:, None], other).astype(np.int8)
    return _hide(lab, truth, rng, missing, gold_frac)


@needs_kernel
@pytest.mark.parametrize("T,W,K,gold_frac,prior_correction", [
    (3000, 12, 5, 0.05, True), (1200, 9, 3, 0.0, False), (400, 7, 8, 0.1, True)])
def test_native_bwa_equals_the_xla_fit_on_sampled_data(T, W, K, gold_frac, prior_correction):
    lab, gold, truth = _draw_bwa(T, W, K, 0.3, gold_frac, seed=T + W)
    lab[0] = -1  # a task nobody answered: its truth is the class means
    data = _core.prepare(_tensor(lab, K), layout="dense", gold=gold, dtype=jnp.float32)
    for kw in ({"max_iter": 30, "tol": -np.inf}, {"max_iter": 0}, {"max_iter": 1}):
        a = bwa.fit(data, prior_correction=prior_correction, **kw)
        b = _native.bwa_fit(data, prior_correction=prior_correction, **kw)
        assert int(a.n_iter) == int(b.n_iter) == kw["max_iter"]
        np.testing.assert_allclose(np.asarray(b.posteriors)[:T], np.asarray(a.posteriors)[:T],
                                   atol=1e-5)
        np.testing.assert_allclose(np.asarray(b.truth)[:T], np.asarray(a.truth)[:T], atol=1e-5)
        np.testing.assert_allclose(np.asarray(b.precision), np.asarray(a.precision), rtol=1e-5)
        np.testing.assert_allclose(np.asarray(b.history), np.asarray(a.history), rtol=1e-5)
    mv = np.stack([(lab == k).sum(1) for k in range(K)], 1).argmax(1)
    assert (np.asarray(b.posteriors)[:T].argmax(1) == truth).mean() >= (mv == truth).mean() - 0.01


@needs_kernel
@pytest.mark.parametrize("K", [2, 5, 8])
def test_tracked_sums_report_the_largest_posterior_move(K):
    labels, mask, gold, log_prior, log_conf = _step_inputs(1003, 12, K, 0.2, 0.1, seed=5)
    p = _native.plan(12, K)
    rows = _native.unique(_native.encode(labels, p), _native.flags_of(mask, gold))
    tabs = [_native.tables(p, log_prior, log_conf), _native.tables(p, log_prior * 0.5, log_conf * 0.8)]
    track = _native.track_buffer(rows, K)
    posts, dzs = [], []
    for tab in tabs:
        C, ll, track, dz = _native.sums_tracked(rows, tab, K, track)
        C2, ll2 = _native.sums(rows, tab, K)
        np.testing.assert_array_equal(np.asarray(C), np.asarray(C2))
        posts.append(np.asarray(_native.posteriors(rows, tab, K)))
        dzs.append(float(dz))
    real = np.asarray(mask) > 0
    assert dzs[0] == pytest.approx(np.abs(posts[0][real]).max(), abs=1e-6)  # from zeros
    assert dzs[1] == pytest.approx(np.abs(posts[1] - posts[0])[real].max(), abs=1e-6)


@needs_kernel
@pytest.mark.filterwarnings("ignore:MACE did not converge")
@pytest.mark.filterwarnings("ignore:GLAD did not converge")
@pytest.mark.filterwarnings("ignore:BWA did not converge")
@pytest.mark.parametrize("name", ["zencrowd_in", "bluebird"])
def test_dawid_skene_class_native_equals_xla_on_real_data(name):
    tensor = LabelTensor.coerce(DATA / name / "answers.csv")
    native = DawidSkene(layout="dense").fit(tensor)
    xla = DawidSkene(layout="dense", native="off").fit(tensor)
    assert native.native_used_ and not xla.native_used_
    assert native.n_iter_ == xla.n_iter_
    np.testing.assert_allclose(native.probas_, xla.probas_, atol=1e-5)
    np.testing.assert_allclose(native.errors_, xla.errors_, atol=1e-5)
    np.testing.assert_array_equal(native.labels_, xla.labels_)
    oc = OneCoinDawidSkene(layout="dense").fit(tensor)
    oc_xla = OneCoinDawidSkene(layout="dense", native="off").fit(tensor)
    assert oc.native_used_ and not oc_xla.native_used_ and oc.n_iter_ == oc_xla.n_iter_
    np.testing.assert_allclose(oc.probas_, oc_xla.probas_, atol=1e-5)
    np.testing.assert_allclose(oc.skills_, oc_xla.skills_, atol=1e-5)
    if name != "zencrowd_in":  # MACE, GLAD, BWA: one dataset is enough (test time)
        ib = IBCC(layout="dense").fit(tensor)
        ib_xla = IBCC(layout="dense", native="off").fit(tensor)
        assert ib.native_used_ and ib.n_iter_ == ib_xla.n_iter_
        np.testing.assert_allclose(ib.probas_, ib_xla.probas_, atol=1e-5)
        return
    # a fixed 30 sweeps (under the stopping rule a restart may stop one sweep apart: see above)
    ma = MACE(layout="dense", n_restarts=3, max_iter=30, tol=-1.0).fit(tensor)
    ma_xla = MACE(layout="dense", n_restarts=3, max_iter=30, tol=-1.0, native="off").fit(tensor)
    assert ma.native_used_ and not ma_xla.native_used_ and ma.n_iter_ == ma_xla.n_iter_
    np.testing.assert_allclose(ma.probas_, ma_xla.probas_, atol=1e-5)
    np.testing.assert_allclose(ma.objectives_, ma_xla.objectives_, rtol=1e-5)
    np.testing.assert_allclose(ma.spamming_, ma_xla.spamming_, atol=1e-5)
    # GLAD: 10 iterations. Past ~20 on zencrowd_in the fit creeps along a flat ridge where
    # whether a step raises Q (the backtracking test) is decided by float rounding: the two paths
    # then keep the same objective (to 2e-7 per answer) with posteriors ~1e-3 apart
    gl = GLAD(layout="dense", max_iter=10, tol=-1.0).fit(tensor)
    gl_xla = GLAD(layout="dense", max_iter=10, tol=-1.0, native="off").fit(tensor)
    assert gl.native_used_ and not gl_xla.native_used_ and gl.n_iter_ == gl_xla.n_iter_
    np.testing.assert_allclose(gl.probas_, gl_xla.probas_, atol=1e-5)
    np.testing.assert_allclose(gl.alphas_, gl_xla.alphas_, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(gl.betas_, gl_xla.betas_, rtol=1e-4)
    np.testing.assert_allclose(gl.loss_history_, gl_xla.loss_history_, rtol=1e-5)
    bw = BWA(layout="dense", max_iter=20, tol=-np.inf).fit(tensor)  # a fixed 20 sweeps (as MACE)
    bw_xla = BWA(layout="dense", max_iter=20, tol=-np.inf, native="off").fit(tensor)
    assert bw.native_used_ and not bw_xla.native_used_ and bw.n_iter_ == bw_xla.n_iter_
    np.testing.assert_allclose(bw.probas_, bw_xla.probas_, atol=1e-5)
    np.testing.assert_allclose(bw.precision_, bw_xla.precision_, rtol=1e-5)
    ib = IBCC(layout="dense").fit(tensor)
    ib_xla = IBCC(layout="dense", native="off").fit(tensor)
    assert ib.native_used_ and not ib_xla.native_used_ and ib.n_iter_ == ib_xla.n_iter_
    np.testing.assert_allclose(ib.probas_, ib_xla.probas_, atol=1e-5)
    np.testing.assert_allclose(ib.errors_, ib_xla.errors_, atol=1e-5)


@needs_kernel
@pytest.mark.filterwarnings("ignore:DawidSkene did not converge")
def _draw_ebcc(T, W, K, M, missing, gold_frac, seed):
    """Answers drawn from EBCC's story: a true class and a subtype per task, and a confusion row
    per (annotator, class, subtype), so annotators err together on a subtype."""
    rng = np.random.default_rng(seed)
    truth = rng.choice(K, T, p=rng.dirichlet(np.ones(K) * 3))
    sub = rng.integers(0, M, T)
    acc = rng.uniform(0.3, 0.95, (W, K, M))
    conf = rng.dirichlet(np.ones(K) * 0.5, (W, K, M)) * (1 - acc)[..., None] \
        + np.eye(K)[None, :, None, :] * acc[..., None]  # [W, K, M, L]
    p = conf[np.arange(W)[None], truth[:, None], sub[:, None]]  # [T, W, L]
    lab = (rng.random((T, W, 1)) > np.cumsum(p, axis=-1)).sum(-1)
    return _hide(np.minimum(lab, K - 1).astype(np.int8), truth, rng, missing, gold_frac)


@needs_kernel
@pytest.mark.parametrize("T,W,K,M,missing,gold_frac,sharp", [
    (1003, 12, 5, 10, 0.2, 0.1, 1),    # 4 groups of 3, 50 columns (padded to 56)
    (777, 13, 3, 3, 0.5, 0.1, 1),      # groups of 5, 5 and 3; 9 columns
    (64, 1, 2, 1, 0.0, 0.0, 1),        # one annotator, one subtype
    (300, 3, 12, 2, 0.1, 0.2, 1),      # 12 classes (more than the DS kernel takes); 24 columns
    (200, 2, 15, 17, 0.0, 0.1, 1),     # 255 columns, the most the kernel takes
    (20_000, 30, 5, 4, 0.3, 0.05, 1),  # 10 groups, 2 threads
    # log-confusion entries 40 times as spread: the groups' factors disagree so much that many
    # rows' products would leave the float range, and take the log path instead
    (1003, 12, 5, 10, 0.2, 0.1, 40),
])
def test_ebcc_sweep_equals_the_xla_sweep(T, W, K, M, missing, gold_frac, sharp):
    """One EBCC sweep on the native kernel equals the fused XLA sweep (``_fast.subtype_sweep``):
    class posteriors of every row, weighted log-likelihood, per-annotator counts, column sums
    and the largest move of a weighted row's posteriors; rows weigh their counts, padding rows
    weigh 0 (and move nothing), gold rows keep their class's columns."""
    rng = np.random.default_rng(T + K)
    lab, gold, _ = _draw_ebcc(T, W, K, M, missing, gold_frac, seed=T)
    lab[0] = -1  # a row nobody answered
    weight = rng.integers(1, 6, T).astype(np.float32)
    weight[-5:], lab[-5:], gold[-5:] = 0, -1, -1  # padding rows
    KM = K * M
    log_table = (sharp * np.log(rng.dirichlet(np.ones(K), (W, KM)))).astype(np.float32)
    bias = np.log(rng.dirichlet(np.ones(KM))).astype(np.float32)
    z_prev = rng.dirichlet(np.ones(K), T).astype(np.float32)
    args = [jnp.asarray(x) for x in (weight, gold, bias, log_table, z_prev)]
    z, ll, counts, csum, dz = jax.jit(lambda lab, *x: _fast.subtype_sweep(lab, K, M, *x))(
        jnp.asarray(lab), *args)
    data = _core.Dense(labels=jnp.asarray(lab), task_mask=jnp.asarray((weight > 0) * 1.0),
                       worker_mask=jnp.ones(W), gold=jnp.asarray(gold), n_classes=K)

    @jax.jit
    def native(data, weight, gold, bias, log_table, z_prev):
        return _native.ebcc_sweep(_native.ebcc_rows(data, columns=KM), weight, bias, log_table,
                                  z_prev, M)

    z2, ll2, counts2, csum2, dz2 = native(data, *args)
    # both against the class posteriors in float64: the kernel at least as close as XLA's sweep
    # (whose float32 scores, up to 1,700 in the sharp case, lose 1e-5 in their exp)
    s64 = np.tile(bias.astype(np.float64), (T, 1))
    for w in range(W):
        ok = lab[:, w] >= 0
        s64[ok] += log_table[w][:, lab[ok, w]].T
    allowed = np.repeat((gold < 0)[:, None] | (gold[:, None] == np.arange(K)[None]), M, axis=1)
    s64 = np.where(allowed, s64, -np.inf)
    p64 = np.exp(s64 - s64.max(axis=1, keepdims=True))
    z64 = (p64 / p64.sum(axis=1, keepdims=True)).reshape(T, K, M).sum(axis=2)
    live = weight > 0
    err_xla = np.abs(np.asarray(z) - z64)[live].max()
    assert np.abs(np.asarray(z2) - z64)[live].max() <= max(1e-6, 1.2 * err_xla)
    np.testing.assert_allclose(np.asarray(z2), np.asarray(z), atol=1e-5 * sharp)
    np.testing.assert_allclose(float(ll2), float(ll), rtol=2e-6)
    np.testing.assert_allclose(np.asarray(counts2), np.asarray(counts), rtol=2e-5, atol=2e-4)
    np.testing.assert_allclose(np.asarray(csum2), np.asarray(csum), rtol=2e-5, atol=2e-4)
    np.testing.assert_allclose(float(dz2), float(dz), atol=1e-5)
    g = gold >= 0  # gold rows: their class only
    assert (np.asarray(z2)[g, gold[g]] > 1 - 1e-6).all()
    # every weighted answer is counted once: the counts sum to them
    n_ans = float(((lab >= 0) * weight[:, None]).sum())
    assert abs(float(counts2.sum()) - n_ans) <= 1e-5 * n_ans
    # the E-step's posteriors q(z, g) (EBCC's result), and the sums of given posteriors (its
    # random start), against ebcc.e_step and ebcc._counts
    q_ref = ebcc.e_step(data, jnp.asarray(bias), jnp.asarray(log_table), M)[0]
    q_nat = jax.jit(lambda d, b, t: _native.ebcc_posteriors(_native.ebcc_rows(d, columns=KM), b,
                                                            t, M))(
        data, jnp.asarray(bias), jnp.asarray(log_table))
    np.testing.assert_allclose(np.asarray(q_nat), np.asarray(q_ref), atol=1e-5 * sharp)
    q64 = (p64 / p64.sum(axis=1, keepdims=True)).reshape(T, K, M)
    assert (np.abs(np.asarray(q_nat) - q64)[live].max()
            <= max(1e-6, 1.2 * np.abs(np.asarray(q_ref) - q64)[live].max()))
    given = jnp.asarray(rng.dirichlet(np.ones(KM), T).astype(np.float32).reshape(T, K, M))
    n_km, n_wkml = ebcc._counts(data, given, jnp.asarray(weight))
    cnt3, csum3 = jax.jit(lambda d, w, q: _native.ebcc_counts(_native.ebcc_rows(d, columns=KM), w,
                                                              q, K))(
        data, jnp.asarray(weight), given)
    np.testing.assert_allclose(np.asarray(cnt3), np.asarray(n_wkml).reshape(W, KM, K),
                               rtol=2e-5, atol=2e-4)
    np.testing.assert_allclose(np.asarray(csum3), np.asarray(n_km).reshape(KM), rtol=2e-5,
                               atol=2e-4)
    _check_start_counts(data, _native.ebcc_rows(data, columns=KM), jnp.asarray(weight), M, rng)


def _check_start_counts(data, rows, weight, M, rng):
    """The random start drawn inside the kernel (``ebcc_start_counts``) sums to the counts of
    ``ebcc.start``'s draws (XLA) summed by the kernel, with each row's own draws and with the
    draws of other rows (a screening sample's rows in the whole set: ``row_ids``)."""
    K = data.n_classes
    key = jax.random.key(int(rng.integers(1 << 30)))
    ids = jnp.asarray(rng.permutation(data.n_tasks * 3)[: data.n_tasks].astype(np.int32))
    for row_ids in (None, ids):
        want = jax.jit(lambda d, w, k, i: _native.ebcc_counts(
            rows, w, ebcc.start(d, k, M, i), K))(data, weight, key, row_ids)
        got = jax.jit(lambda d, w, k, i: _native.ebcc_start_counts(
            rows, w, ebcc.vote_fractions(d), k, M, i))(data, weight, key, row_ids)
        for g, w in zip(got, want):
            np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=2e-5,
                                       atol=2e-5 * float(np.abs(np.asarray(w)).max()))


@needs_kernel
@pytest.mark.parametrize("kw", [{}, {"accelerate": True, "screen_iter": 3, "keep": 2,
                                     "screen_tasks": 700}])
def test_native_ebcc_equals_the_xla_fit_on_sampled_data(kw):
    """EBCC with its sweeps on the native kernel equals EBCC on the XLA sweeps: a fixed number
    of sweeps from the same restarts (gold clamped), plainly or over-relaxed and screened on a
    sample: every restart's ELBO, the kept restart, its posteriors and ELBO history."""
    T, W, K, M = 2000, 8, 4, 3
    lab, gold, truth = _draw_ebcc(T, W, K, M, 0.3, 0.05, seed=len(kw))
    tensor = _tensor(lab, K)
    gold = {tensor.task_ids[t]: tensor.classes[g] for t, g in enumerate(gold) if g >= 0}
    opts = dict(n_subtypes=M, restarts=3, max_iter=25, tol=None, atol=0.0, seed=2, **kw)
    a = EBCC(native="off", **opts).fit(tensor, gold=gold)
    b = EBCC(native="on", **opts).fit(tensor, gold=gold)
    assert b.native_used_ and not a.native_used_
    np.testing.assert_array_equal(b.sweeps_, a.sweeps_)
    np.testing.assert_allclose(b.elbos_, a.elbos_, rtol=1e-5)  # NaN: dropped by screening
    assert b.best_restart_ == a.best_restart_
    np.testing.assert_allclose(b.probas_, a.probas_, atol=1e-4)
    np.testing.assert_allclose(b.loss_history_, a.loss_history_, rtol=1e-5)
    mv = np.stack([(lab == k).sum(1) for k in range(K)], 1).argmax(1)
    assert (b.label_codes_ == truth).mean() > (mv == truth).mean()
    if not kw:  # restarts vmapped two at a time: the kernel runs once per restart, same fits
        c = EBCC(native="on", restart_batch=2, **opts).fit(tensor, gold=gold)
        np.testing.assert_allclose(c.elbos_, b.elbos_, rtol=1e-6)
        np.testing.assert_allclose(c.probas_, b.probas_, atol=1e-6)


def _draw_ebcc_sparse(T, W, K, M, most, gold_frac, seed, busy=(0, 0)):
    """A sparse crowd drawn from EBCC's story: task t gets 1 to ``most`` distinct annotators
    (``(task, worker, label)`` arrays, gold codes per task, truth); ``busy = (n, answers)``: the
    first n tasks get ``answers`` annotators each (control questions)."""
    rng = np.random.default_rng(seed)
    truth = rng.integers(0, K, T)
    sub = rng.integers(0, M, T)
    acc = rng.uniform(0.3, 0.95, (W, K, M))
    conf = rng.dirichlet(np.ones(K) * 0.5, (W, K, M)) * (1 - acc)[..., None] \
        + np.eye(K)[None, :, None, :] * acc[..., None]  # [W, K, M, L]
    n = rng.integers(1, most + 1, T)
    n[: busy[0]] = busy[1]
    task = np.repeat(np.arange(T, dtype=np.int32), n)
    slot = np.arange(task.size) - np.repeat(np.cumsum(n) - n, n)
    worker = ((rng.integers(0, W, T)[task] + slot * 7919) % W).astype(np.int32)  # distinct
    p = conf[worker, truth[task], sub[task]]
    label = np.minimum((rng.random((task.size, 1)) > np.cumsum(p, axis=-1)).sum(-1), K - 1)
    gold = np.where(rng.random(T) < gold_frac, truth, -1).astype(np.int32)
    return task, worker, label.astype(np.int32), gold, truth


def _sparse_tensor(task, worker, label, T, W, K):
    return LabelTensor(task=task, worker=worker, label=label, task_ids=np.arange(T),
                       worker_ids=np.arange(W), classes=np.arange(K))


def _with_a_busy_task(n_subtypes):
    """200 tasks of 1-2 answers from 100 annotators (EBCC's story, 3 classes), and a task with 60
    answers: COO rows of 61 slots are mostly empty, but cost fewer slots than a tier
    (:func:`_native.coo_tiers`)."""
    task, worker, label, _, _ = _draw_ebcc_sparse(200, 100, 3, n_subtypes, 2, 0.0, seed=1)
    busy = np.arange(60, dtype=np.int32)
    return _sparse_tensor(np.concatenate([task, np.full(60, 200, np.int32)]),
                          np.concatenate([worker, busy]),
                          np.concatenate([label, busy % 3]).astype(np.int32), 201, 100, 3)


@needs_kernel
@pytest.mark.parametrize("T,W,K,M,most,busy", [
    (3001, 300, 4, 3, 9, (0, 0)),     # 1-9 answers a task, rows of 10 slots
    (150_000, 2000, 3, 2, 3, (0, 0)),  # codes past the chunk: some sums carried over less often,
                                       # 2 threads
    (3001, 300, 4, 3, 4, (7, 250)),   # 1-4 answers, 7 tasks with 250: rows in tiers by width
])
def test_ebcc_coo_sweep_equals_the_float64_reference(T, W, K, M, most, busy):
    """EBCC's sweep on a sparse crowd's rows (one code per answer, ``ebcc_coo_rows``) equals the
    reference sums (``ebcc.e_step``, ``ebcc._counts`` on the COO layout) computed in float64:
    class posteriors, weighted log-likelihood, per-annotator counts, column sums, largest move;
    also the posteriors q(z, g) and the sums of given posteriors (the random start). Rows weigh
    2-5 tasks, padding rows 0; gold rows keep their class. With a few busy tasks the rows come
    in tiers by width (``coo_tiers``), each swept on its own and their sums added."""
    task, worker, label, gold, _ = _draw_ebcc_sparse(T, W, K, M, most, 0.05, seed=T, busy=busy)
    tensor = _sparse_tensor(task, worker, label, T, W, K)
    rng = np.random.default_rng(W)
    KM = K * M
    with jax.enable_x64(True):
        d64 = _core.prepare(tensor, layout="coo", gold=gold, dtype=jnp.float64)
    Tp, Wp = d64.n_tasks, d64.n_workers
    weight = np.zeros(Tp, np.float32)
    weight[:T] = rng.integers(2, 6, T)
    log_table = np.log(rng.dirichlet(np.ones(K), (Wp, KM))).astype(np.float32)
    bias = np.log(rng.dirichlet(np.ones(KM))).astype(np.float32)
    z_prev = rng.dirichlet(np.ones(K), Tp).astype(np.float32)
    given = rng.dirichlet(np.ones(KM), Tp).astype(np.float32).reshape(Tp, K, M)
    with jax.enable_x64(True):
        w64 = jnp.asarray(weight, jnp.float64)
        q, log_z = ebcc.e_step(d64, jnp.asarray(bias, jnp.float64),
                               jnp.asarray(log_table, jnp.float64), M)
        n_km, n_wkml = ebcc._counts(d64, q, w64)
        g_km, g_wkml = ebcc._counts(d64, jnp.asarray(given, jnp.float64), w64)
        q, z, ll = np.asarray(q), np.asarray(q.sum(axis=2)), float((w64 * log_z).sum())
        dz = float(np.where(weight[:, None] > 0, np.abs(z - z_prev), 0).max())
        n_km, n_wkml, g_km, g_wkml = (np.asarray(x) for x in (n_km, n_wkml, g_km, g_wkml))
    data = _core.prepare(tensor, layout="coo", gold=gold)
    width = _native.coo_tiers(task, Tp)
    if busy[0]:  # the busy tasks in a tier of their own, the rest in narrower tiers
        assert width[-1] == (256, busy[0]) and sum(n for _, n in width) == Tp
        assert [w for w, _ in width] == sorted({w for w, _ in width})
        assert width[-2][0] < 1 + busy[1]
        assert _native.use("on", data, columns=KM, row_slots=(width, Tp, task.size))
        assert not _native.use("auto", data, columns=KM, row_slots=(1 + busy[1], Tp, task.size))
    else:
        # the width rounded up to 1.5x steps: nearby widths share a program
        assert width == {4: 4, 10: 12}[_native.coo_row_width(task, T)] == {3: 4, 9: 12}[most]
    assert _native.applies(data, jnp.float32, columns=KM) is None
    args = [jnp.asarray(x) for x in (weight, bias, log_table, z_prev)]

    @jax.jit
    def sweep(data, weight, bias, log_table, z_prev):
        return _native.ebcc_sweep(_native.ebcc_rows(data, width), weight, bias, log_table,
                                  z_prev, M)

    z2, ll2, counts2, csum2, dz2 = sweep(data, *args)
    q2 = jax.jit(lambda d, b, t: _native.ebcc_posteriors(_native.ebcc_rows(d, width), b, t, M))(
        data, args[1], args[2])
    tol = np.full(Tp, 2e-6)  # a row's bound on its posteriors' distance from float64
    if busy[0]:
        # a busy task's scores sum 251 float32 terms: XLA's float32 E-step is ~1.4e-5 from
        # float64 there; the kernel is held to twice its distance on those rows
        q32 = np.asarray(ebcc.e_step(data, args[1], args[2], M)[0])
        tol[: busy[0]] = np.maximum(tol[: busy[0]],
                                    2 * np.abs(q32 - q).max(axis=(1, 2))[: busy[0]])
        # and the tiers' sweep is the one of rows all as wide as the busiest task's
        one = jax.jit(lambda d, *a: _native.ebcc_sweep(_native.ebcc_rows(d, 1 + busy[1]), *a, M))(
            data, *args)
        np.testing.assert_array_equal(np.asarray(z2), np.asarray(one[0]))
        for got, want in zip((ll2, counts2, csum2, dz2), one[1:]):
            np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)
    assert (np.abs(np.asarray(z2) - z).max(axis=1) <= tol).all()
    np.testing.assert_allclose(float(ll2), ll, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(counts2), n_wkml.reshape(Wp, KM, K), rtol=1e-5,
                               atol=1e-4)
    np.testing.assert_allclose(np.asarray(csum2), n_km.reshape(KM), rtol=1e-5)
    np.testing.assert_allclose(float(dz2), dz, atol=tol.max())
    assert (np.abs(np.asarray(q2) - q).max(axis=(1, 2)) <= tol).all()
    cnt3, csum3 = jax.jit(lambda d, w, g: _native.ebcc_counts(_native.ebcc_rows(d, width), w, g,
                                                              K))(data, args[0], jnp.asarray(given))
    np.testing.assert_allclose(np.asarray(cnt3), g_wkml.reshape(Wp, KM, K), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(np.asarray(csum3), g_km.reshape(KM), rtol=1e-5)
    _check_start_counts(data, _native.ebcc_rows(data, width), jnp.asarray(weight), M, rng)


@needs_kernel
@pytest.mark.filterwarnings("ignore:EBCC did not converge")
@pytest.mark.parametrize("screen,busy", [(False, (0, 0)), (True, (0, 0)), (True, (5, 150))])
def test_native_ebcc_on_a_sparse_crowd_equals_the_xla_fit(screen, busy):
    """On the COO layout (a sparse crowd of 400 annotators, 1-7 answers a task, gold), EBCC on the
    native kernel equals EBCC on the reference sums: the same sweeps from the same restarts,
    every restart's ELBO, the kept restart, its posteriors and ELBO history (plainly, or
    over-relaxed and screened on a sample of the tasks). The kernel runs on the tasks sorted by
    their first annotator; the fit is the one of the tasks' own order (tested by the XLA fit,
    which keeps it). With 5 tasks of 150 answers (``busy``) the rows come in tiers by width, and
    the screening sample's rows in its own tiers."""
    T, W, K, M = 3000, 400, 3, 4
    task, worker, label, gold, truth = _draw_ebcc_sparse(T, W, K, M, 7, 0.05, seed=11, busy=busy)
    assert isinstance(_native.coo_tiers(task, T), tuple) == (busy[0] > 0)
    tensor = _sparse_tensor(task, worker, label, T, W, K)
    gold = {t: g for t, g in enumerate(gold) if g >= 0}
    kw = {"accelerate": True, "screen_iter": 3, "keep": 2, "screen_tasks": 900} if screen else {}
    opts = dict(n_subtypes=M, restarts=3, max_iter=20, tol=None, atol=0.0, seed=4, layout="coo",
                **kw)
    a = EBCC(native="off", **opts).fit(tensor, gold=gold)
    b = EBCC(native="on", **opts).fit(tensor, gold=gold)
    assert b.native_used_ and not a.native_used_
    np.testing.assert_array_equal(b.sweeps_, a.sweeps_)
    np.testing.assert_allclose(b.elbos_, a.elbos_, rtol=1e-5)
    assert b.best_restart_ == a.best_restart_
    np.testing.assert_allclose(b.loss_history_, a.loss_history_, rtol=1e-5)
    # the kernel sums in another order (its rows sorted by first annotator): the posteriors are
    # held to the float64 fit. Over-relaxed sweeps amplify float32 rounding: after 20 sweeps
    # the XLA float32 fit's posteriors are 6e-5 from it and the native's 1.6e-4, their
    # confusion matrices 7e-6 and 1.7e-5 (plain sweeps: 1.4e-5 and 1.9e-5, 1.7e-6 and 3.1e-6)
    c = EBCC(native="off", dtype="float64", **opts).fit(tensor, gold=gold)
    assert c.best_restart_ == b.best_restart_
    np.testing.assert_allclose(b.probas_, c.probas_, atol=5e-4 if screen else 1e-4)
    np.testing.assert_allclose(b.errors_, c.errors_, atol=5e-5 if screen else 1e-5)
    assert (b.label_codes_ == truth).mean() > 0.6


@needs_kernel
@pytest.mark.filterwarnings("ignore::crowdllm.aggregation.base.ConvergenceWarning")
@pytest.mark.parametrize("T,W,K,most,gold_frac,busy", [
    (3000, 300, 4, 9, 0.05, (0, 0)),   # 1-9 answers a task
    (2000, 150, 12, 4, 0.1, (0, 0)),   # 12 classes: more than the dense kernel takes
    (40_000, 2000, 3, 5, 0.02, (0, 0)),  # 10,000 codes (carried over less often), 2 threads
    (3000, 300, 4, 3, 0.05, (6, 150)),  # 6 control questions of 150 answers: tiers by width
])
def test_native_fits_on_a_sparse_crowd_equal_the_float64_fits(T, W, K, most, gold_frac, busy,
                                                                monkeypatch):
    """On the COO layout (a sparse crowd drawn from Dawid-Skene's story, 1 to ``most`` answers a
    task, gold), Dawid-Skene (majority-vote and gold starts), one-coin DS and IBCC run on EBCC's
    sweep with one subtype a class, and their fits equal the XLA fits in float64: the same
    iterations, posteriors within 2e-5, confusion matrices and skills within 1e-5 (the bounds
    of the dense kernel's tests), objectives. (The XLA float32 fits are as far from float64:
    their segment sums round as much; on two real crowds much further, see
    test_native_fits_on_real_sparse_crowds.) BWA runs on the kernel's ratio pass instead, to the
    same bounds. MACE, whose random start differs in float64, equals the XLA float32 restarts. With control questions (``busy``) the rows come in tiers by width
    (``_native.coo_tiers``)."""
    task, worker, label, gold, truth = _draw_ebcc_sparse(T, W, K, 1, most, gold_frac, seed=T,
                                                         busy=busy)
    assert isinstance(_native.coo_tiers(task, T), tuple) == (busy[0] > 0)
    tensor = _sparse_tensor(task, worker, label, T, W, K)
    gold = {t: g for t, g in enumerate(gold) if g >= 0}
    fixed = dict(max_iter=40, tol=-1.0, layout="coo")
    cases = [(DawidSkene, fixed, ("errors_", "priors_")),
             (OneCoinDawidSkene, fixed, ("skills_", "priors_")),
             (IBCC, dict(layout="coo"), ("errors_", "priors_"))]
    if K < 12:  # gold starts on 12 classes with ~17 gold tasks are ill-conditioned: 3e-4 apart
        cases.append((DawidSkene, dict(fixed, init="gold"), ("errors_",)))
    if T > 10_000:  # the carrying over is the kernel's: Dawid-Skene alone
        cases = cases[:1]
    for cls, kw, attrs in cases:
        a = cls(native="on", **kw).fit(tensor, gold=gold)
        c = cls(native="off", dtype="float64", **kw).fit(tensor, gold=gold)
        assert a.native_used_ and not c.native_used_
        assert a.n_iter_ == c.n_iter_
        np.testing.assert_allclose(a.probas_, c.probas_, atol=2e-5, err_msg=cls.__name__)
        for attr in attrs:
            np.testing.assert_allclose(getattr(a, attr), getattr(c, attr), atol=1e-5,
                                       err_msg=f"{cls.__name__}.{attr}")
        np.testing.assert_allclose(a.loss_history_, c.loss_history_, rtol=1e-5)
        assert (a.label_codes_ == truth).mean() > 0.7
    # BWA (its truths are ratios, not softmax posteriors) on the kernel's ratio pass: the same
    # iterations, truths and posteriors within 2e-5 of float64, precisions within 1e-5
    # relatively (they are ~10-100), objectives (measured: 4e-7, 2e-6 and 5e-6 at most)
    kw = dict(max_iter=40, tol=-1.0, layout="coo")
    a = BWA(native="on", **kw).fit(tensor, gold=gold)
    c = BWA(native="off", dtype="float64", **kw).fit(tensor, gold=gold)
    assert a.native_used_ and not c.native_used_ and a.n_iter_ == c.n_iter_
    np.testing.assert_allclose(a.truth_, c.truth_, atol=2e-5)
    np.testing.assert_allclose(a.probas_, c.probas_, atol=2e-5)
    np.testing.assert_allclose(a.precision_, c.precision_, rtol=1e-5)
    np.testing.assert_allclose(a.loss_history_, c.loss_history_, rtol=1e-5)
    assert (a.label_codes_ == truth).mean() > 0.7
    if T > 10_000:
        return
    # every restart, not only the kept one: two restarts that reach one optimum tie to float32
    # rounding (12 classes: -2.2340446 and -2.2340448), and which is kept is then a coin toss
    opts = dict(n_restarts=2, max_iter=30, tol=-1.0, layout="coo")
    restarts = []
    keep = mace.best_restart
    monkeypatch.setattr(mace, "best_restart", lambda res: restarts.append(res) or keep(res))
    ma = MACE(native="on", **opts).fit(tensor, gold=gold)
    mx = MACE(native="off", **opts).fit(tensor, gold=gold)
    assert ma.native_used_ and not mx.native_used_ and ma.n_iter_ == mx.n_iter_
    ra, rx = restarts
    np.testing.assert_allclose(ra.posteriors, rx.posteriors, atol=2e-5)
    np.testing.assert_allclose(ra.objective, rx.objective, rtol=1e-5)
    np.testing.assert_allclose(ma.objectives_, mx.objectives_, rtol=1e-5)


def _draw_glad_sparse(T, W, K, most, gold_frac, seed):
    """A sparse crowd drawn from GLAD's story: task t gets 1 to ``most`` distinct annotators, each
    right w.p. sigma(alpha_w beta_t), else another class uniformly (``(task, worker, label)``,
    gold codes per task, truth)."""
    rng = np.random.default_rng(seed)
    truth = rng.choice(K, T)
    alpha = rng.normal(1.5, 1.0, W)
    beta = np.exp(rng.normal(0.3, 0.5, T))
    n = rng.integers(1, most + 1, T)
    task = np.repeat(np.arange(T, dtype=np.int32), n)
    slot = np.arange(task.size) - np.repeat(np.cumsum(n) - n, n)
    worker = ((rng.integers(0, W, T)[task] + slot * 7919) % W).astype(np.int32)  # distinct
    right = rng.random(task.size) < 1 / (1 + np.exp(-alpha[worker] * beta[task]))
    label = np.where(right, truth[task], (truth[task] + rng.integers(1, K, task.size)) % K)
    gold = np.where(rng.random(T) < gold_frac, truth, -1).astype(np.int32)
    return task, worker, label.astype(np.int32), gold, truth


@needs_kernel
@pytest.mark.parametrize("T,W,K,most,learn_prior,init,m_step", [
    (3000, 200, 4, 6, False, "default", "native"),  # 1-6 answers a task: rows of 6 slots
    (2001, 150, 3, 3, True, "default", "native"),   # a partial last block of 8 rows
    (3000, 200, 4, 6, True, "default", "jax"),       # JAX's Adam around the passes
    (150_000, 3000, 5, 3, False, "default", "native"),  # chunks of more than 4,096 rows
])
def test_native_glad_on_a_sparse_crowd_equals_the_xla_fit(T, W, K, most, learn_prior, init,
                                                            m_step, monkeypatch):
    """On the COO layout GLAD's kernels take a sparse crowd's tasks as rows of answer slots, each
    answer's alpha gathered by its annotator and alpha's gradient summed per annotator: over 20
    iterations with gold, the fit equals the XLA fit in float64 to the dense kernels' bounds
    against XLA (measured: posteriors 1e-6, alphas 4e-6, betas 7e-6 relatively; the XLA float32
    fit is as far: 5e-6, 5e-6, 1e-5)."""
    task, worker, label, gold, truth = _draw_glad_sparse(T, W, K, most, 0.05, seed=T + W)
    tensor = _sparse_tensor(task, worker, label, T, W, K)
    gold = {t: g for t, g in enumerate(gold) if g >= 0}
    kw = dict(max_iter=20, tol=-1.0, layout="coo", learn_prior=learn_prior, init=init)
    if m_step == "jax":
        native_fit = _native.glad_fit
        monkeypatch.setattr(_native, "glad_fit",
                            lambda *a, **k: native_fit(*a, **{**k, "m_step": "jax"}))
    b = GLAD(native="on", **kw).fit(tensor, gold=gold)
    a = GLAD(native="off", dtype="float64", **kw).fit(tensor, gold=gold)
    assert b.native_used_ and not a.native_used_
    assert a.n_iter_ == b.n_iter_ == 20
    np.testing.assert_allclose(b.probas_, a.probas_, atol=1e-5)
    np.testing.assert_allclose(b.alphas_, a.alphas_, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(b.betas_, a.betas_, rtol=1e-4)
    np.testing.assert_allclose(b.priors_, a.priors_, atol=1e-6)
    np.testing.assert_allclose(b.loss_history_, a.loss_history_, rtol=1e-5)
    mv = np.zeros((T, K))
    np.add.at(mv, (task, label), 1)
    assert (b.label_codes_ == truth).mean() >= (mv.argmax(1) == truth).mean()


def _glad_with_busy_tasks(T, W, K, n_busy, busy_answers, seed):
    """:func:`_draw_glad_sparse`'s crowd of 1-3 answers a task, gold on 5 % of its tasks, with
    ``n_busy`` tasks more (control questions), each answered by ``busy_answers`` annotators from
    GLAD's story, all shuffled (the answers not sorted by task)."""
    task, worker, label, gold, truth = _draw_glad_sparse(T, W, K, 3, 0.05, seed=seed)
    rng = np.random.default_rng(seed + 1)
    b_truth = rng.choice(K, n_busy)
    b_task = np.repeat(np.arange(T, T + n_busy, dtype=np.int32), busy_answers)
    b_worker = np.concatenate([rng.choice(W, busy_answers, replace=False)
                               for _ in range(n_busy)]).astype(np.int32)
    right = rng.random(b_task.size) < 0.75
    b_label = np.where(right, b_truth[b_task - T], rng.choice(K, b_task.size))
    order = rng.permutation(task.size + b_task.size)
    task = np.concatenate([task, b_task])[order]
    worker = np.concatenate([worker, b_worker])[order]
    label = np.concatenate([label, b_label]).astype(np.int32)[order]
    gold = np.concatenate([gold, np.where(rng.random(n_busy) < 0.5, b_truth, -1)])
    return task, worker, label, gold.astype(np.int32), np.concatenate([truth, b_truth])


@needs_kernel
@pytest.mark.parametrize("n_busy", [0, 3])
def test_coo_rows_in_the_order_of_first_annotators_give_the_same_fits(n_busy):
    """The COO sweep's rows in :func:`_native.coo_rank`'s order (tasks sorted by their first
    annotator, so that a block's table rows stay in cache) hold task t's codes and gold flag at
    row ``rank[t]``, in tiers by width too (three busy tasks), and DS, IBCC and BWA fitted on
    them give the fits on rows in the tasks' own order, posteriors given back per task."""
    if n_busy:
        task, worker, label, gold, _ = _glad_with_busy_tasks(6000, 500, 4, n_busy, 300, seed=9)
    else:
        task, worker, label, gold, _ = _draw_glad_sparse(6000, 500, 4, 4, 0.05, seed=9)
    n = 6000 + n_busy
    tensor = _sparse_tensor(task, worker, label, n, 500, 4)
    data = _core.prepare(tensor, layout="coo", gold=gold, dtype=jnp.float32)
    width = _native.coo_layout(data, tensor)
    assert isinstance(width, tuple) == bool(n_busy)  # tiers where busy tasks are
    rank = _native.coo_rank(data, tensor)
    r = np.asarray(rank)
    assert sorted(r) == list(range(data.n_tasks)) and np.any(r[:n] != np.arange(n))
    first_w = np.minimum.reduceat(tensor.worker[np.argsort(tensor.task, kind="stable")],
                                  np.r_[0, np.flatnonzero(np.diff(np.sort(tensor.task))) + 1])
    assert np.all(np.diff(first_w[np.argsort(r[:n])]) >= 0)  # rows by first annotator
    a, b = _native.ebcc_coo_rows(data, width), _native.ebcc_coo_rows(data, width, rank)
    a_first, b_first = (x.first if n_busy else x for x in (a, b))
    np.testing.assert_array_equal(np.asarray(b_first.codes)[r], np.asarray(a_first.codes))
    np.testing.assert_array_equal(np.asarray(b_first.flags)[r], np.asarray(a_first.flags))
    if n_busy:
        np.testing.assert_array_equal(np.asarray(b.keep)[r], np.asarray(a.keep))
        for pa, pb, ia, ib in zip(a.parts, b.parts, a.index, b.index):
            ia, ib = np.asarray(ia), np.asarray(ib)
            np.testing.assert_array_equal(ib, np.sort(r[ia]))  # a tier's rows, ascending
            at = np.searchsorted(ib, r[ia])  # each of its tasks' place among them
            np.testing.assert_array_equal(np.asarray(pb.codes)[at], np.asarray(pa.codes))
            np.testing.assert_array_equal(np.asarray(pb.flags)[at], np.asarray(pa.flags))
    for fit, kw in ((_native.ds_fit, {}), (_native.ibcc_fit, {"atol": -1.0}),
                    (_native.bwa_fit, {})):
        x = fit(data, width=width, max_iter=15, tol=-1.0, **kw)
        y = fit(data, width=width, rank=rank, max_iter=15, tol=-1.0, **kw)
        assert int(x.n_iter) == int(y.n_iter) == 15
        # rows in another order are summed in another order (float32 within a chunk): after 15
        # iterations a few posteriors near 0.5 move by ~1e-5, the bound of the native fits
        # against the XLA fits above
        np.testing.assert_allclose(np.asarray(y.posteriors), np.asarray(x.posteriors),
                                   atol=2e-5)
        np.testing.assert_allclose(np.asarray(y.history), np.asarray(x.history), rtol=1e-6)


@needs_kernel
def test_glad_sparse_rows_are_ragged_blocks_that_hold_every_answer_once():
    """A sparse crowd's GLAD rows (``glad_coo_layout``, ``glad_coo_rows``): tasks sorted by their
    number of answers, each block of 8 rows as wide as its widest task, so three busy tasks of
    500 answers widen only their own block (not every row to 500 slots, which sent the crowd to
    XLA before); every answer is in its task's row once, empty slots are -1."""
    T, W, K = 3000, 800, 4
    task, worker, label, gold, _ = _glad_with_busy_tasks(T, W, K, 3, 500, seed=5)
    n = T + 3
    tensor = _sparse_tensor(task, worker, label, n, W, K)
    data = _core.prepare(tensor, layout="coo", dtype=jnp.float32)
    layout = _native.glad_coo_layout(data, tensor)
    off = layout.offsets.astype(np.int64)
    counts = np.bincount(tensor.task, minlength=n)
    rank = layout.rank[:n]
    assert sorted(rank) == list(range(n))  # a row each, the real tasks first
    assert np.all(np.diff(counts[np.argsort(rank)]) >= 0)  # by their number of answers
    assert np.all(np.diff(off) >= 0) and off[0] == 0
    widths = np.diff(off)
    assert np.all(widths[rank // 8] >= counts)
    assert widths.max() == 500 and (widths == 500).sum() == 1
    # a block's width is its widest task's: the slots are the answers, and the blocks where the
    # count changes
    per_block = np.zeros(len(widths), np.int64)
    np.maximum.at(per_block, rank // 8, counts)
    np.testing.assert_array_equal(widths, per_block)
    assert off[-1] <= tensor.n_answers + 7 * 4 and layout.slots >= off[-1]
    lab, widx, flags, wts, nn = (np.asarray(x) for x in _native.glad_coo_rows(
        data, jnp.asarray(layout.rank), jnp.asarray(layout.offsets), layout.slots))
    assert lab.shape == widx.shape == (layout.slots, 8) and int(nn[0]) == data.n_tasks
    seen = {}
    for t in range(n):
        r = rank[t]
        sl = slice(off[r // 8], off[r // 8 + 1])
        ys, ws = lab[sl, r % 8], widx[sl, r % 8]
        seen[t] = sorted(zip(ws[ys >= 0].tolist(), ys[ys >= 0].tolist()))
        assert np.all(ys[: counts[t]] >= 0) and np.all(ys[counts[t]:] == -1)
    want = {t: [] for t in range(n)}
    for t, w, y in zip(tensor.task, tensor.worker, tensor.label):
        want[int(t)].append((int(w), int(y)))
    assert seen == {t: sorted(v) for t, v in want.items()}
    assert (lab >= 0).sum() == tensor.n_answers  # nothing past the blocks
    np.testing.assert_array_equal(wts[rank], 1.0)
    assert wts.sum() == n
    # every task as many answers (3; 1,001 tasks: a last block of one): blocks of 3 slots up to
    # the last with a task, then empty ones
    task, worker = np.repeat(np.arange(1001, dtype=np.int32), 3), np.tile([0, 1, 2], 1001)
    tensor = _sparse_tensor(task, worker, np.tile([0, 1, 1], 1001), 1001, 50, 3)
    data = _core.prepare(tensor, layout="coo", dtype=jnp.float32)
    layout = _native.glad_coo_layout(data, tensor)
    widths = np.diff(layout.offsets)
    assert len(widths) == -(-data.n_tasks // 8) > 126
    np.testing.assert_array_equal(widths[:126], 3)
    np.testing.assert_array_equal(widths[126:], 0)
    np.testing.assert_array_equal(layout.rank[:1001], np.arange(1001))


@needs_kernel
@pytest.mark.parametrize("T,W,K,n_busy,busy,learn_prior,init", [
    (4000, 3000, 3, 2, 2000, False, "default"),  # a block of 2,000 slots next to rows of 1-3
    (3001, 600, 5, 11, 300, True, "gold"),       # busy tasks in two blocks, gold start
])
def test_native_glad_on_a_crowd_with_busy_tasks_equals_the_xla_fit(T, W, K, n_busy, busy,
                                                                     learn_prior, init):
    """Control questions that thousands answer widen only their own block of GLAD's rows, so
    such a crowd runs on the kernels (before ragged blocks it ran on XLA: rows of 2,048 slots).
    Over 20 iterations the native fit is as close to the float64 fit as the XLA float32 fit is
    (at most twice as far; measured, native and XLA: the first crowd's posteriors 4.8e-6 both,
    objectives 1.5e-5 and 3.7e-5; the gold start's posteriors 1.7e-4 and 1.4e-3): a busy task's
    row sums 2,000 float32 terms, so its objective is off by ~1e-5 relatively on either path."""
    task, worker, label, gold, truth = _glad_with_busy_tasks(T, W, K, n_busy, busy, seed=T)
    n = T + n_busy
    tensor = _sparse_tensor(task, worker, label, n, W, K)
    gold = {t: g for t, g in enumerate(gold) if g >= 0}
    kw = dict(max_iter=20, tol=-1.0, layout="coo", learn_prior=learn_prior, init=init)
    b = GLAD(native="on", **kw).fit(tensor, gold=gold)
    a = GLAD(native="off", **kw).fit(tensor, gold=gold)
    c = GLAD(native="off", dtype="float64", **kw).fit(tensor, gold=gold)
    assert b.native_used_ and not a.native_used_
    assert a.n_iter_ == b.n_iter_ == c.n_iter_ == 20
    for attr in ("probas_", "alphas_", "betas_", "priors_", "loss_history_"):
        x, y, z = (np.asarray(getattr(m, attr)) for m in (b, a, c))
        xla_err = np.abs(y - z).max()
        assert xla_err < 1e-2 * max(1.0, np.abs(z).max()), attr
        assert np.abs(x - z).max() <= 2 * xla_err + 1e-6, attr
    assert (b.label_codes_[T:] == truth[T:]).mean() >= 0.9  # many voices: right


@needs_kernel
def test_glad_sparse_passes_do_not_depend_on_the_number_of_threads(monkeypatch):
    """Ragged blocks of a sparse crowd (rows of 1-3 slots, and busy tasks' blocks of 700) are
    summed in the same fixed chunks on 1, 2 and 3 threads: the same floats."""
    task, worker, label, gold, _ = _glad_with_busy_tasks(20_000, 3000, 4, 5, 700, seed=8)
    n = 20_005
    tensor = _sparse_tensor(task, worker, label, n, 3000, 4)
    data = _core.prepare(tensor, layout="coo", gold=gold, dtype=jnp.float32)
    layout = _native.glad_coo_layout(data, tensor)

    def fit():
        res = _native.glad_fit(data, max_iter=6, tol=-1.0, layout=layout)
        return res.posteriors, res.alphas, res.betas, res.history

    _same_floats_on_1_2_3_threads(monkeypatch, fit)


@needs_kernel
def test_glad_sparse_crowds_the_kernels_do_not_take():
    """GLAD's kernels take at most 8 classes: a sparse crowd of 9 runs on XLA, and
    ``native='on'`` says why."""
    task, worker, label, _, _ = _draw_glad_sparse(500, 40, 9, 3, 0.0, seed=4)
    tensor = _sparse_tensor(task, worker, label, 500, 40, 9)
    assert not GLAD(layout="coo", max_iter=2).fit(tensor).native_used_
    with pytest.raises(ValueError, match="9 classes"):
        GLAD(layout="coo", max_iter=2, native="on").fit(tensor)
    task, worker, label, _, _ = _draw_glad_sparse(500, 40, 3, 3, 0.0, seed=4)
    assert GLAD(layout="coo", max_iter=2).fit(_sparse_tensor(task, worker, label, 500, 40,
                                                             3)).native_used_


@needs_kernel
@pytest.mark.filterwarnings("ignore::crowdllm.aggregation.base.ConvergenceWarning")
@pytest.mark.parametrize("T,W,K,most", [(2001, 150, 3, 3), (3000, 200, 4, 6)])
def test_native_glad_gold_start_on_a_sparse_crowd(T, W, K, most):
    """GLAD's gold start on a sparse crowd: each annotator's first alpha from their answers to
    gold tasks (summed per annotator over the answer slots) equals the XLA path's. After 20
    iterations the native fit is as close to the float64 fit as the XLA float32 fit is (at most
    twice as far; measured 2.6e-5 and 2.2e-4 against 1.3e-4 and 2.3e-4): from this start some
    first gradients are ~0, and Adam's first step is lr times their sign, float noise in both
    paths (they are 2e-4 apart, where the default start's fits are 3e-7 apart)."""
    task, worker, label, gold, truth = _draw_glad_sparse(T, W, K, most, 0.05, seed=T + W)
    tensor = _sparse_tensor(task, worker, label, T, W, K)
    gold = {t: g for t, g in enumerate(gold) if g >= 0}
    kw = dict(tol=-1.0, layout="coo", init="gold", learn_prior=True)
    b = GLAD(native="on", max_iter=0, **kw).fit(tensor, gold=gold)
    a = GLAD(native="off", max_iter=0, **kw).fit(tensor, gold=gold)
    assert b.native_used_ and np.ptp(a.alphas_) > 0.5
    np.testing.assert_allclose(b.alphas_, a.alphas_, rtol=1e-6)
    np.testing.assert_allclose(b.probas_, a.probas_, atol=1e-6)
    b = GLAD(native="on", max_iter=20, **kw).fit(tensor, gold=gold)
    a = GLAD(native="off", max_iter=20, **kw).fit(tensor, gold=gold)
    c = GLAD(native="off", dtype="float64", max_iter=20, **kw).fit(tensor, gold=gold)
    xla_err = np.abs(a.probas_ - c.probas_).max()
    assert xla_err < 1e-3
    assert np.abs(b.probas_ - c.probas_).max() <= 2 * xla_err
    for attr in ("alphas_", "loss_history_"):
        x, y, z = (np.asarray(getattr(m, attr)) for m in (b, a, c))
        assert np.abs(x - z).max() <= 2 * np.abs(y - z).max(), attr



@pytest.mark.parametrize("n,W,A,by_task", [(1000, 50, 3000, False), (1000, 50, 3000, True),
                                           (1000, 70_000, 2500, False), (5, 3, 0, False),
                                           (200, 10, 150, True)])
@pytest.mark.parametrize("native", [False, pytest.param(True, marks=needs_kernel)])
def test_coo_task_order_sorts_tasks_by_their_first_annotator(n, W, A, by_task, native):
    """The order of the COO sweeps' rows: tasks by their lowest numbered annotator, ties in
    their own order, tasks nobody answered last; the answers in any order, annotators past 16
    bits (another sort in NumPy), no answers at all; NumPy's sorts and the native counting sort
    alike."""
    rng = np.random.default_rng(n + A)
    task = rng.integers(0, n, A).astype(np.int32)
    worker = rng.integers(0, W, A).astype(np.int32)
    if by_task:
        task = np.sort(task)
    order = _native.coo_task_order(task, worker, n, native=native)
    first = np.full(n, np.iinfo(np.int64).max)
    for t, w in zip(task, worker):
        first[t] = min(first[t], w)
    keys = [(first[t], t) for t in order]
    assert sorted(order.tolist()) == list(range(n)) and keys == sorted(keys)


@pytest.mark.parametrize("width", [1, 2, 3, 4, 5, 7, 8, 12, 17, 32, 33])
def test_sort_rows_and_answer_slots(width):
    """The COO rows' helpers: ``sort_rows`` sorts each row as ``np.sort`` does (a sorting
    network up to 32 columns, with ties and duplicates), and ``answer_slots`` is each answer's
    place among its task's answers (tasks with none, padding answers on the last task)."""
    rng = np.random.default_rng(width)
    x = rng.integers(0, 6, (257, width)).astype(np.int32)
    np.testing.assert_array_equal(np.asarray(_native.sort_rows(jnp.asarray(x))),
                                  np.sort(x, axis=1))
    task = np.sort(rng.integers(0, 50, 300)).astype(np.int32)
    tensor = LabelTensor(task=task, worker=rng.integers(0, 9, 300).astype(np.int32),
                         label=rng.integers(0, 3, 300).astype(np.int32), task_ids=np.arange(60),
                         worker_ids=np.arange(9), classes=np.arange(3))
    data = _core.prepare(tensor, layout="coo")
    assert data.task.shape[0] > 300  # padding answers
    want = np.concatenate([np.arange(n) for n in np.bincount(np.asarray(data.task))])
    np.testing.assert_array_equal(np.asarray(_native.answer_slots(data)), want)

@needs_kernel
def test_native_fits_on_real_sparse_crowds():
    """On a real crowd (COO: 8,315 tasks, 176 annotators), Dawid-Skene and one-coin DS on the
    native sweep stop where the float64 XLA fits stop, within 5e-5 of their posteriors. The
    XLA float32 one-coin fit is 2.2e-3 from float64 there (its float32 segment sums round; the
    kernel carries its sums in double)."""
    tensor = LabelTensor.coerce(DATA / "zheng_d_product" / "answers.csv")
    for cls in (DawidSkene, OneCoinDawidSkene):
        a = cls(layout="coo").fit(tensor)
        c = cls(layout="coo", native="off", dtype="float64").fit(tensor)
        assert a.native_used_ and a.n_iter_ == c.n_iter_
        np.testing.assert_allclose(a.probas_, c.probas_, atol=5e-5, err_msg=cls.__name__)


@needs_kernel
def test_ebcc_kernel_sums_no_rows_to_zeros():
    """A panel's rows cut to none (an empty share of a dense table): zero sums, not a crash
    (the chunked shares once left no share at all, and the sums' reduction read past it)."""
    import dataclasses

    lab = np.random.default_rng(0).integers(0, 3, (16, 5)).astype(np.int8)
    data = _core.prepare(_tensor(lab, 3), layout="dense")
    rows = _native.ebcc_rows(data, None, 3 * 2)
    empty = dataclasses.replace(rows, codes=rows.codes[:0], flags=rows.flags[:0])
    counts, sums = _native.ebcc_counts(empty, jnp.ones((0,), jnp.float32),
                                       jnp.full((0, 3, 2), 1 / 6, jnp.float32), 3)
    assert counts.size and sums.size
    assert not np.asarray(counts).any() and not np.asarray(sums).any()


@needs_kernel
def test_ebcc_native_fit_does_not_depend_on_the_number_of_threads(monkeypatch):
    """On a dense panel (a small table) the kernel sums fixed chunks of rows, whichever thread
    takes a chunk: 1, 2 and 3 threads give the same floats (more than two chunks of rows)."""
    rng = np.random.default_rng(4)
    T, W, K = 40000, 9, 4
    truth = rng.integers(0, K, T)
    lab = np.where(rng.random((T, W)) < 0.7, truth[:, None],
                   rng.integers(0, K, (T, W))).astype(np.int8)
    lab[rng.random((T, W)) < 0.1] = -1
    tensor = _tensor(lab, K)
    opts = dict(n_subtypes=3, restarts=1, max_iter=6, tol=-1.0, atol=-1.0, seed=1,
                merge="off", layout="dense", native="on")

    def fit():
        m = EBCC(**opts).fit(tensor)
        assert m.native_used_
        return m.probas_, m.subtypes_, m.elbos_

    _same_floats_on_1_2_3_threads(monkeypatch, fit)


@pytest.mark.filterwarnings("ignore::crowdllm.aggregation.base.ConvergenceWarning")
def test_ebcc_native_option():
    """EBCC runs on the kernel where it applies and says so; ``native='on'`` where it cannot
    refuses with the reason; with more than 255 classes x subtypes it falls back."""
    lab, _, _ = _draw_ebcc(100, 4, 3, 2, 0.1, 0.0, seed=5)
    tensor = _tensor(lab, 3)
    opts = dict(restarts=1, max_iter=3)
    assert EBCC(n_subtypes=2, **opts).fit(tensor).native_used_ == (WHY is None)
    assert not EBCC(n_subtypes=2, native="off", **opts).fit(tensor).native_used_
    assert EBCC(n_subtypes=2, layout="coo", **opts).fit(tensor).native_used_ == (WHY is None)
    assert not EBCC(n_subtypes=2, dtype="float64", **opts).fit(tensor).native_used_
    with pytest.raises(ValueError, match="native='on'.*float64"):
        EBCC(n_subtypes=2, dtype="float64", native="on", **opts).fit(tensor)
    data = _core.prepare(tensor, layout="dense")
    assert "258 latent columns" in _native.applies(data, jnp.float32, columns=258)
    assert not _native.use("auto", data, columns=258)  # EBCC(n_subtypes=86) on 3 classes
    many = _core.Dense(labels=data.labels, task_mask=data.task_mask,
                       worker_mask=data.worker_mask, gold=data.gold, n_classes=128)
    assert "128 classes" in _native.applies(many, jnp.float32, columns=128)
    with pytest.raises(ValueError, match="native must be"):
        EBCC(native="yes")
    # COO: one task with 60 answers (the rest 1-2) makes every row 61 slots wide: few slots in
    # all, which the kernel takes (the same fit as XLA's)
    sparse = _with_a_busy_task(n_subtypes=2)
    a = EBCC(n_subtypes=2, layout="coo", **opts).fit(sparse)
    assert a.native_used_ == (WHY is None)
    np.testing.assert_allclose(
        a.probas_, EBCC(n_subtypes=2, layout="coo", native="off", **opts).fit(sparse).probas_,
        atol=1e-5)
    # COO codes are uint16: at most 65,534 annotators x labels
    big = _core.Coo(task=jnp.zeros(4, jnp.int32), worker=jnp.zeros(4, jnp.int32),
                    label=jnp.zeros(4, jnp.int32), weight=jnp.ones(4), task_mask=jnp.ones(8),
                    worker_mask=jnp.ones(16384), gold=jnp.full(8, -1), n_classes=4)
    assert "16384 annotators x 4 labels" in _native.applies(big, jnp.float32, columns=8)
    assert "dense layout" in _native.applies(big, jnp.float32)  # not for the class-only kernels


@pytest.mark.parametrize("layout", ["dense", "coo"])
def test_gold_in_fitting_and_zero_iterations(layout):
    tensor = LabelTensor.coerce(DATA / "zencrowd_in" / "answers.csv")
    gold = DATA / "zencrowd_in" / "gold.csv"
    for cls, kw in ((DawidSkene, {"init": "gold"}), (DawidSkene, {"max_iter": 0}),
                    (DawidSkene, {"max_iter": 1}), (OneCoinDawidSkene, {"max_iter": 0}),
                    (OneCoinDawidSkene, {}), (IBCC, {"max_iter": 0}), (IBCC, {"max_iter": 1})):
        fit_gold = gold if kw.get("init") or cls is not DawidSkene else None
        a = cls(layout=layout, **kw).fit(tensor, gold=fit_gold)
        b = cls(layout=layout, native="off", **kw).fit(tensor, gold=fit_gold)
        assert a.native_used_ == (WHY is None)
        np.testing.assert_allclose(a.probas_, b.probas_, atol=1e-5)


@pytest.mark.parametrize("counts", [
    "balanced",     # 3 answers a task: one width
    "control",      # and 20 control questions of 2,000 answers
    "long_tail",    # answers a task drawn from a Zipf law (1 to 5,000)
    "two_humps",    # half the tasks 1 answer, half 40 (and the padding)
])
def test_coo_tiers(counts):
    """A sparse crowd's rows: one width (rounded up to 1.5x steps) where rows of the busiest
    task's width are not mostly empty; else tiers by width whose rows hold every task (each in
    the first tier as wide as it needs), in fewer slots than one width and about twice the
    answers."""
    rng = np.random.default_rng(0)
    n = {"balanced": np.full(5000, 3), "control": np.r_[np.full(5000, 3), np.full(20, 2000)],
         "long_tail": np.minimum(rng.zipf(1.8, 5000), 5000),
         "two_humps": np.r_[np.ones(2500, int), np.full(2500, 40)]}[counts]
    T = n.size + 37  # padded tasks answer nothing
    task = np.repeat(np.arange(n.size), n)
    need = 1 + np.r_[n, np.zeros(37, int)]
    width = _native.coo_tiers(rng.permutation(task), T)
    one = int(need.max())
    if counts in ("balanced", "two_humps"):  # rows of 41 slots for 21.5 answers and biases
        assert width == _native._rounded(one) == {4: 4, 41: 48}[_native.coo_row_width(task, T)]
        return
    widths = np.array([w for w, _ in width])
    assert len(width) > 1 and (np.diff(widths) > 0).all() and one <= widths[-1] <= 1.5 * one
    tier = np.searchsorted(widths, need)  # each task's tier: the first as wide as it needs
    assert [n for _, n in width] == np.bincount(tier, minlength=len(width)).tolist()
    slots = _native.coo_slots(width, T)
    # each tier's rows are mostly full, but for the tiers joined because a call costs more
    assert slots <= 2 * (n.sum() + T) + _native.TIER_SLOTS * len(width)
    assert slots == widths[0] * T + sum(w * c for w, c in width[1:])
    assert slots < one * T and slots <= _native.MAX_SLOTS_PER_ANSWER * (n.sum() + T)
    if counts == "control":  # widths rounded up to 1.5x steps: nearby widths share a program
        assert width == ((4, T - 20), (2048, 20))


def _tied_panel(T, W, K, seed):
    """Answers of annotators of a few accuracies, many tasks with few answers (so that a vote
    of equal skills, ZBS's first, often ties), gold, a task nobody answered and padding rows."""
    rng = np.random.default_rng(seed)
    truth = rng.integers(0, K, T)
    acc = rng.choice([0.5, 0.7, 0.9], W)
    right = rng.random((T, W)) < acc
    lab = np.where(right, truth[:, None], rng.integers(0, K, (T, W))).astype(np.int8)
    lab[rng.random((T, W)) > 3 / W] = -1  # three answers a task, on average
    lab[0] = -1
    gold = np.where(rng.random(T) < 0.05, truth, -1).astype(np.int32)
    return _core.prepare(_tensor(lab, K), layout="dense", gold=gold, dtype=jnp.float32), truth


@needs_kernel
@pytest.mark.parametrize("T,W,K", [
    (3 * 4096 + 29, 12, 5),  # 3 groups of 4, rows over 3 threads
    (5000, 13, 3),           # groups of 5, 5 and 3
    (2000, 7, 8),            # 8 classes: groups of 3, 3 and 1
    (700, 30, 2),            # 5 groups of 6: the general (G != 3) path
    (300, 3, 1),             # one class: every vote its only class
])
def test_native_zbs_and_wawa_equal_the_xla_fits_on_1_2_3_threads(monkeypatch, T, W, K):
    """ZBS's native rounds (a hard vote pass: the skill-weighted vote, its random ties drawn as
    XLA draws them, then the agreement counts) give XLA's fit: the same skills to the bit each
    round (the history of the largest move), the same labels, posteriors to float rounding,
    whichever number of threads; Wawa's fit (one such vote, then the weighted vote) too. The
    start's vote of equal skills ties on many tasks."""
    data, truth = _tied_panel(T, W, K, seed=W + K)
    first = np.asarray(majority_vote.weighted_vote(
        data, data.worker_mask.astype(jnp.float32), jax.random.key(0), True).posteriors)
    if K > 1:  # many tasks tie at the start: the draws are exercised
        assert ((first >= first.max(1, keepdims=True) - 1e-6).sum(1) > 1).sum() > T // 20
    ref = zero_based_skill.fit(data, jax.random.key(3), ties=True, max_iter=12, tol=-1.0,
                               lr_steps_to_reduce=4)
    for threads in (1, 2, 3):
        _on_threads(monkeypatch, threads)
        res = _native.zbs_fit(data, jax.random.key(3), max_iter=12, tol=-1.0,
                              lr_steps_to_reduce=4)
        assert int(res.n_iter) == int(ref.n_iter) == 12
        np.testing.assert_array_equal(np.asarray(res.skills), np.asarray(ref.skills))
        np.testing.assert_array_equal(np.asarray(res.history), np.asarray(ref.history))
        np.testing.assert_array_equal(np.asarray(res.labels), np.asarray(ref.labels))
        np.testing.assert_allclose(np.asarray(res.posteriors), np.asarray(ref.posteriors),
                                   atol=1e-6)
        # Wawa: the majority vote's agreements (every tie drawn), then the weighted vote
        wa, wa_ref = _native.wawa_fit(data, jax.random.key(4)), wawa.fit(data, jax.random.key(4))
        for a, b in zip(wa, wa_ref):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
        np.testing.assert_array_equal(np.asarray(wa.labels), np.asarray(wa_ref.labels))
    if K > 1:  # and it is a ZBS fit: skills rank the annotators by their accuracy
        lab = np.asarray(data.labels)[:T]
        acc = np.array([(lab[:, w] == truth)[lab[:, w] >= 0].mean() for w in range(W)])
        assert np.corrcoef(acc, np.asarray(res.skills)[:W])[0, 1] > 0.8


@needs_kernel
def test_hard_vote_ties_are_votes_within_1e6_of_the_largest():
    """Votes 1 against 1 + 1e-6 (fractions half a millionth apart) tie, as in
    ``_core.argmax_ties``: the tasks split between the two classes by their draws, the same
    tasks as XLA's; 1 against 1 + 1e-5 do not tie."""
    T = 4000
    lab = np.tile(np.array([[0, 1, -1]], np.int8), (T, 1))
    data = _core.prepare(_tensor(lab, 2), layout="dense", dtype=jnp.float32)
    p = _native.plan(3, 2)
    rows = _native.every_row(_native.encode(data.labels, p),
                             _native.flags_of(data.task_mask, data.gold))
    for gap, tie in ((1e-6, True), (1e-5, False)):
        skills = jnp.asarray([1.0, 1.0 + gap, 0.5], jnp.float32)
        key = jax.random.key(5)
        C = _native.hard_vote_sums(rows, _native.vote_table(p, skills, 2), 2, key)
        counts, _ = _native.counts_from(p, C, 2)
        hits = np.asarray(jnp.trace(counts, axis1=1, axis2=2))
        labels = majority_vote.weighted_vote(data, skills, key, True).labels
        np.testing.assert_array_equal(hits, np.asarray(_core.worker_hits(data, labels)))
        if tie:
            assert 0.4 * T < hits[0] < 0.6 * T and hits[0] + hits[1] == T
        else:
            assert hits[0] == 0 and hits[1] == T


@needs_kernel
@pytest.mark.parametrize("name", ["zencrowd_in", "dog", "crowdscale_fact_eval"])
@pytest.mark.parametrize("cls", [ZeroBasedSkill, Wawa])
def test_vote_classes_native_equal_xla_on_real_data(cls, name):
    """On real crowds (2 classes on crowdscale_fact_eval: 42,624 tasks, over the threads) and
    three seeds of the random ties, ``ZeroBasedSkill`` and ``Wawa`` give the same skills,
    iterations and labels natively as on XLA. With ``ties="lowest"`` they run XLA (``on``:
    refused)."""
    tensor = LabelTensor.coerce(DATA / name / "answers.csv")
    for seed in range(3):
        nat = cls(layout="dense", seed=seed).fit(tensor)
        xla = cls(layout="dense", seed=seed, native="off").fit(tensor)
        assert nat.native_used_ and not xla.native_used_
        assert nat.n_iter_ == xla.n_iter_
        np.testing.assert_array_equal(nat.skills_, xla.skills_)
        np.testing.assert_array_equal(nat.labels_, xla.labels_)
        np.testing.assert_allclose(nat.probas_, xla.probas_, atol=1e-6)
    assert not cls(layout="dense", ties="lowest").fit(tensor).native_used_
    with pytest.raises(ValueError, match="break ties at random only"):
        cls(layout="dense", ties="lowest", native="on").fit(tensor)


def test_where_the_kernel_does_not_apply_the_xla_path_runs():
    lab, gold, _ = _draw(200, 5, 3, 0.2, 0.0, seed=1)
    tensor = _tensor(lab, 3)
    for layout in ("coo", "dense"):
        with jax.enable_x64(True):
            data = _core.prepare(tensor, layout=layout, dtype=jnp.float64)
            assert "float64" in _native.applies(data, data.task_mask.dtype, columns=3)
        for cls in (DawidSkene, OneCoinDawidSkene, IBCC, MACE):
            assert not cls(layout=layout, dtype="float64").fit(tensor).native_used_
            assert cls(layout=layout).fit(tensor).native_used_ == (WHY is None)
    # COO: a task with 2,000 answers (the rest 1-2) would make every row 2,001 slots wide, which
    # the kernel refuses (such rows go in tiers by width: coo_tiers). With 60 answers, the rows
    # are 61 slots wide: fewer slots than a tier costs
    sparse = _with_a_busy_task(n_subtypes=1)
    data = _core.prepare(sparse, layout="coo")
    slots = (2001, data.n_tasks, sparse.n_answers + 1940)
    if WHY is None:
        assert not _native.use("auto", data, row_slots=slots, columns=3)
        with pytest.raises(ValueError, match="native='on'.*rows of up to 2001 slots for "
                                             r"[0-9.]+ answers a task.*mostly empty"):
            _native.use("on", data, row_slots=slots, columns=3)
        assert _native.coo_tiers(sparse.task, data.n_tasks) == 64
        assert _native.use("on", data, columns=3, row_slots=(61,) + slots[1:])
    a = DawidSkene(layout="coo").fit(sparse)
    assert a.native_used_ == (WHY is None)
    b = DawidSkene(layout="coo", native="off").fit(sparse)
    np.testing.assert_allclose(a.probas_, b.probas_, atol=1e-5)
    # COO codes are uint16: at most 65,534 annotators x labels
    many = _sparse_tensor(np.arange(13_200, dtype=np.int32) // 2,
                          np.arange(13_200, dtype=np.int32), np.arange(13_200, dtype=np.int32) % 5,
                          6600, 13_200, 5)
    with pytest.raises(ValueError, match="native='on'.*annotators x 5 labels"):
        IBCC(layout="coo", native="on").fit(many)
    assert not IBCC(layout="coo").fit(many).native_used_
    nine = _core.prepare(_tensor(np.minimum(lab * 4, 8), 9), layout="dense")
    assert "9 classes" in _native.applies(nine, jnp.float32)
    assert _native.plan(200, 5) is not None and _native.plan(300, 5) is None  # uint16 codes
    wide, _, _ = _draw(50, 300, 5, 0.9, 0.0, seed=4)
    wide_data = _core.prepare(_tensor(wide, 5), layout="dense")
    assert "too many annotators" in _native.applies(wide_data, jnp.float32)
    assert not DawidSkene(layout="dense").fit(_tensor(wide, 5)).native_used_
    with pytest.raises(ValueError, match="native must be"):
        DawidSkene(native="yes")
    with pytest.raises(ValueError, match="native must be"):
        OneCoinDawidSkene(native=True)


@pytest.fixture
def fresh_native(monkeypatch, tmp_path):
    """A process state where the kernel has not been looked at, with an empty build cache."""
    monkeypatch.setenv("CROWDLLM_CACHE", str(tmp_path / "cache"))
    _native._reset()
    yield tmp_path / "cache" / "native"
    _native._reset()
    # the real kernel again for later tests (its targets stay registered with XLA)


def test_turned_off_falls_back_to_xla(monkeypatch, fresh_native):
    monkeypatch.setenv("CROWDLLM_NATIVE", "0")
    assert _native.why_unavailable() == "turned off by CROWDLLM_NATIVE"
    lab, _, _ = _draw(300, 6, 4, 0.2, 0.0, seed=2)
    tensor = _tensor(lab, 4)
    ds = DawidSkene(layout="dense").fit(tensor)
    assert not ds.native_used_
    ref = DawidSkene(layout="dense", native="off").fit(tensor)
    np.testing.assert_array_equal(ds.probas_, ref.probas_)
    with pytest.raises(ValueError, match="turned off by CROWDLLM_NATIVE"):
        DawidSkene(layout="dense", native="on").fit(tensor)
    assert not fresh_native.exists()  # nothing was built


@pytest.mark.skipif(_native._cpu_ok() is not None, reason="the CPU cannot run the kernel anyway")
def test_a_failed_build_warns_and_falls_back(monkeypatch, fresh_native, tmp_path):
    fake = tmp_path / "broken-c++"
    fake.write_text("#!/bin/sh\necho 'no compiler here' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("CXX", str(fake))
    with pytest.warns(RuntimeWarning, match="no compiler here"):
        why = _native.why_unavailable()
    assert "could not be built" in why
    lab, _, _ = _draw(300, 6, 4, 0.2, 0.0, seed=3)
    assert not DawidSkene(layout="dense").fit(_tensor(lab, 4)).native_used_
    assert list(fresh_native.glob("*")) == []  # no half-written library left behind


@needs_kernel
def test_the_build_is_cached_and_safe_under_concurrent_first_uses(monkeypatch, tmp_path):
    cache = tmp_path / "cache"
    paths, errors = [], []
    # the mechanism (cache key, temporary file, atomic rename) on a one-function source: the
    # real library is the one every other native test here builds and loads (compiling it twice
    # at once took ~45 s of the suite's two cores)
    probe = tmp_path / "probe.cc"
    probe.write_text('extern "C" int CrowdllmBuildProbe() { return 7; }\n')
    monkeypatch.setattr(_native, "SOURCES", (probe,))
    monkeypatch.setattr(_native, "HEADERS", ())

    def build():
        try:
            paths.append(_native.build(cache))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=build) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(paths)) == 1
    lib = paths[0]
    assert [p.name for p in cache.iterdir()] == [lib.name]  # no temporary files left
    import ctypes

    assert ctypes.cdll.LoadLibrary(str(lib)).CrowdllmBuildProbe() == 7
    # a second build finds it: the compiler is not run again
    calls = []
    monkeypatch.setattr(_native.subprocess, "run", lambda *a, **k: calls.append(a))
    assert _native.build(cache) == lib and calls == []


@needs_kernel
def test_dense_fill_is_numpys_scatter():
    """A dense panel filled natively (``_native.dense_fill``, used by ``_core.prepare`` from
    2^20 answers) equals NumPy's ``dense[task, worker] = label``: answers in any order, a
    repeated cell keeps its last answer. Codes out of range: a ValueError naming the answer,
    and fewer answers, other dtypes or layouts: not taken (False, the panel untouched)."""
    rng = np.random.default_rng(3)
    A, T, W = _native.DENSE_FILL_MIN + 1000, 300_000, 7
    task = rng.integers(0, T, A).astype(np.int32)  # ~4 answers a cell: many repeats
    worker = rng.integers(0, W, A).astype(np.int32)
    label = rng.integers(0, 9, A).astype(np.int32)
    ours, ref = np.full((T, W), -1, np.int8), np.full((T, W), -1, np.int8)
    assert _native.dense_fill(ours, task, worker, label)
    ref[task, worker] = label
    np.testing.assert_array_equal(ours, ref)
    last = np.full((T, W), -1, np.int64)  # the last answer's index of each cell
    last[task, worker] = np.arange(A)
    hit = last >= 0
    np.testing.assert_array_equal(ours[hit], label[last[hit]])
    for bad in (np.int32(T), np.int32(-1)):
        t2 = task.copy()
        t2[777] = bad
        with pytest.raises(ValueError, match="answer 777: task"):
            _native.dense_fill(np.full((T, W), -1, np.int8), t2, worker, label)
    untouched = np.full((T, W), -1, np.int8)
    assert not _native.dense_fill(untouched, task[:1000], worker[:1000], label[:1000])
    assert not _native.dense_fill(np.full((T, W), -1, np.int16), task, worker, label)
    assert not _native.dense_fill(untouched, task.astype(np.int64), worker, label)
    assert not _native.dense_fill(np.full((W, T), -1, np.int8).T, task, worker, label)
    assert (untouched == -1).all()
    # and prepare's panel, natively filled, is the one NumPy fills
    tensor = LabelTensor(task=task, worker=worker, label=label, task_ids=np.arange(T),
                         worker_ids=np.arange(W), classes=np.arange(9))
    data = _core.prepare(tensor, layout="dense", pad=False)
    np.testing.assert_array_equal(np.asarray(data.labels), ref)


@needs_kernel
def test_host_passes_refuse_codes_out_of_range():
    """The host passes index arrays by their codes: a code out of range is a ValueError naming
    the array, not a write past its end."""
    task = np.array([0, 1, 5], np.int32)
    worker = np.array([0, 1, 2], np.int32)
    with pytest.raises(ValueError, match="task codes must lie in"):
        _native.coo_task_order(task, worker, 3, native=True)
    with pytest.raises(ValueError, match="task codes must lie in"):
        _native.pair_statistics(task, worker, np.zeros(3, np.int32), 3, 3)
    with pytest.raises(ValueError, match="worker codes must lie in"):
        _native.pair_statistics(np.array([0, 1, 2]), np.array([0, -1, 2]), np.zeros(3, np.int32),
                                3, 3)
    assert list(_native.coo_task_order(np.array([2, 0, 2]), np.array([1, 4, 0]), 4,
                                       native=True)) == [2, 0, 1, 3]
