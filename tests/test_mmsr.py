"""M-MSR: skills recovered on one-coin data (its model), adversaries get a negative skill, it
runs where crowd-kit's raises ("Skill value is missing" on zheng_d_product), jit == no-jit."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest

from crowdllm.aggregation import MMSR
from crowdllm.aggregation import mmsr as mmsr_mod
from crowdllm.aggregation._core import prepare
from crowdllm.labels import LabelTensor

from conftest import DATA


def sample_one_coin(p, n_tasks=1500, K=3, p_answer=1.0, seed=0):
    """One-coin story: right w.p. p_w, else uniform over the other K-1 classes."""
    rng = np.random.default_rng(seed)
    z = rng.integers(0, K, n_tasks)
    rows = []
    for t in range(n_tasks):
        for w, pw in enumerate(p):
            if rng.random() > p_answer:
                continue
            lab = z[t] if rng.random() < pw else (z[t] + rng.integers(1, K)) % K
            rows.append((t, f"w{w}", lab))
    return pd.DataFrame(rows, columns=["task", "worker", "label"]), z


def test_recovers_skills_and_signs():
    p = np.array([0.9, 0.85, 0.8, 0.75, 0.7, 0.6, 0.55, 0.5, 0.2, 0.1])  # last two: adversarial
    K = 3
    df, z = sample_one_coin(p, K=K)
    m = MMSR().fit(df)
    s_true = (K * p - 1) / (K - 1)
    workers = [int(w[1:]) for w in m.workers_]
    # Stated tolerance: s_w within 0.06 for every annotator (1500 tasks, 9 co-annotators).
    err = np.abs(m.skills_ - s_true[workers])
    assert err.max() < 0.06, err
    assert (m.skills_[[workers.index(8), workers.index(9)]] < 0).all()
    pred = np.asarray(m.labels_, dtype=int)
    assert (pred == z[np.asarray(m.tasks_, dtype=int)]).mean() > 0.95
    assert np.isfinite(m.probas_).all() and np.allclose(m.probas_.sum(1), 1, atol=1e-5)


@pytest.mark.parametrize("seed", range(4))
def test_refinement_removes_the_bias_for_near_random_annotators(seed):
    """M-MSR's |s| comes from |C|, biased upward where s ~ 0 (the noise does not cancel once
    made positive); the signed least-squares refinement (default with F = 0) removes most of it.
    Measured: error on the random annotators .19-.20 unrefined, .06-.09 refined."""
    K = 4
    p = np.array([0.85] * 6 + [0.6] * 6 + [0.25] * 8)  # the last 8 guess at random (s = 0)
    s_true = (K * p - 1) / (K - 1)
    df, z = sample_one_coin(p, n_tasks=40, K=K, seed=seed)
    err = {}
    for refine in (False, True):
        m = MMSR(refine=refine).fit(df)
        workers = np.array([int(w[1:]) for w in m.workers_])
        e = np.abs(m.skills_ - s_true[workers])
        err[refine] = (e[workers >= 12].mean(), e.mean())
        assert (np.asarray(m.labels_, dtype=int) == z[np.asarray(m.tasks_, dtype=int)]).mean() > 0.95
    assert err[True][0] < 0.1 and err[True][0] < 0.5 * err[False][0], err
    assert err[True][1] < err[False][1], err


def test_no_refinement_when_trimming():
    """With F > 0 the refinement (which does not trim) is skipped: same skills either way."""
    df, _ = sample_one_coin(np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.2]), n_tasks=200, seed=3)
    a = MMSR(n_adversaries=2).fit(df)
    b = MMSR(n_adversaries=2, refine=False).fit(df)
    np.testing.assert_array_equal(a.skills_, b.skills_)
    assert a.n_iter_ == b.n_iter_
    assert not np.array_equal(MMSR().fit(df).skills_, MMSR(refine=False).fit(df).skills_)


def test_sparse_data_and_isolated_annotator():
    p = np.array([0.9, 0.8, 0.8, 0.7, 0.7, 0.6])
    df, _ = sample_one_coin(p, n_tasks=800, p_answer=0.5, seed=1)
    df = pd.concat([df, pd.DataFrame([(10_000, "loner", 1)], columns=df.columns)])
    m = MMSR().fit(df)
    assert np.isfinite(m.skills_).all() and np.isfinite(m.weights_).all()
    others = m.skills_[list(m.workers_) != np.array("loner")]
    assert m.skills_[list(m.workers_).index("loner")] == np.median(others) or \
        np.isclose(m.skills_[list(m.workers_).index("loner")], np.median(others), atol=1e-6)


def test_runs_where_crowdkit_fails():
    # crowd-kit 1.4.2's MMSR raises "Skill value is missing" on this dataset.
    m = MMSR().fit(DATA / "zheng_d_product" / "answers.csv")
    assert np.isfinite(m.skills_).all() and np.isfinite(m.probas_).all()
    t = LabelTensor.coerce(DATA / "zheng_d_product" / "answers.csv").with_gold(
        DATA / "zheng_d_product" / "gold.csv")
    mask = t.gold >= 0
    assert (m.label_codes_[mask] == t.gold[mask]).mean() > 0.85


def test_jit_equals_no_jit_and_dense_equals_coo():
    df, _ = sample_one_coin(np.array([0.9, 0.7, 0.6, 0.3]), n_tasks=40, seed=2)
    t = LabelTensor.coerce(df)
    out = []
    for layout in ("coo", "dense"):
        data = prepare(t, layout=layout)
        agree, common = mmsr_mod.pair_statistics(t, data)
        Wp = data.n_workers
        pad = lambda m: jnp.asarray(np.pad(m, ((0, Wp - m.shape[0]), (0, Wp - m.shape[0]))))  # noqa: E731
        args = (data, pad(agree), pad(common), jax.random.key(0))
        if layout == "coo":  # a few iterations: the loop runs in Python without jit
            short = mmsr_mod.fit(*args, n_tasks=t.n_tasks, max_iter=5)
            with jax.disable_jit():
                plain = mmsr_mod.fit(*args, n_tasks=t.n_tasks, max_iter=5)
            np.testing.assert_allclose(np.asarray(short.skills), np.asarray(plain.skills), atol=1e-5)
        jitted = mmsr_mod.fit(*args, n_tasks=t.n_tasks, max_iter=200)  # converged
        out.append(np.asarray(jitted.skills)[: t.n_workers])
    np.testing.assert_allclose(out[0], out[1], atol=1e-5)


@pytest.mark.parametrize("n_adversaries", [0, -1, 2])
def test_pair_list_path_equals_matrix_path(monkeypatch, n_adversaries):
    """A large crowd fits on the list of observed annotator pairs (no [W, W] matrices, signs by
    power iteration): forced on a real sparse crowd (zencrowd_in, 25 annotators, most pairs
    unobserved), it gives the matrix path's skills and labels, trimming included."""
    t = LabelTensor.coerce(DATA / "zencrowd_in" / "answers.csv")
    agree, common = mmsr_mod.pair_statistics(t, prepare(t, layout="coo"))
    row, col, a, c = mmsr_mod.sparse_pair_statistics(t)
    assert (common > 0).sum() == len(row) < t.n_workers ** 2 - t.n_workers
    np.testing.assert_array_equal(a, agree[row, col])
    np.testing.assert_array_equal(c, common[row, col])
    opts = dict(n_adversaries=n_adversaries, layout="coo", dtype="float64")
    matrix = MMSR(**opts).fit(t)
    monkeypatch.setattr(mmsr_mod, "DENSE_PAIRS_MAX_WORKERS", 0)
    pairs = MMSR(**opts).fit(t)
    assert pairs.n_iter_ == matrix.n_iter_
    np.testing.assert_allclose(pairs.skills_, matrix.skills_, atol=1e-8)
    np.testing.assert_array_equal(pairs.label_codes_, matrix.label_codes_)


def test_dense_pair_counts_equal_the_coo_counts():
    """The dense panel's chunked pair counts (indicator products) equal the sparse products."""
    t = LabelTensor.coerce(DATA / "zheng_d_product" / "answers.csv")
    dense = mmsr_mod.pair_statistics(t, prepare(t, layout="dense"))
    coo = mmsr_mod.pair_statistics(t, prepare(t, layout="coo"))
    for a, b in zip(dense, coo):
        np.testing.assert_array_equal(a, b)
    assert dense[1].sum() > 0 and (dense[0] <= dense[1]).all()


def _crowd(rng, T, W, A, K=4, busy=0):
    """Random answers in random order, with repeats (an annotator answering a task again, with
    the same label or another), annotators with no answer, and ``busy`` tasks of 60 answers."""
    task = rng.integers(0, T, A)
    worker = rng.integers(0, max(W - 2, 1), A)  # the last two annotators never answer
    label = rng.integers(0, K, A)
    rep = rng.choice(A, A // 5)  # repeats: same task and annotator, label kept or redrawn
    redraw = rng.random(len(rep)) < 0.5
    task = np.concatenate([task, task[rep]])
    worker = np.concatenate([worker, worker[rep]])
    label = np.concatenate([label, np.where(redraw, rng.integers(0, K, len(rep)), label[rep])])
    for t in range(busy):
        task = np.concatenate([task, np.full(60, t)])
        worker = np.concatenate([worker, rng.integers(0, W - 2, 60)])
        label = np.concatenate([label, rng.integers(0, K, 60)])
    perm = rng.permutation(len(task))
    return LabelTensor(task=task[perm], worker=worker[perm], label=label[perm],
                       task_ids=np.arange(T), worker_ids=np.arange(W), classes=np.arange(K))


@pytest.mark.skipif(not mmsr_mod._native.available(), reason="native kernels unavailable")
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_native_pair_walk_equals_the_sparse_products(monkeypatch, threads):
    """The native walk over each annotator's tasks counts the same pairs, agreements and common
    tasks as scipy's sparse products (one a class), whatever the thread count: on random crowds
    with repeated answers (counted once), busy tasks (the walk's sort past 32 answers), answers
    in no order and idle annotators, annotators with many partners (listed by a scan) and with
    few (by a sort); and on a real sparse crowd."""
    monkeypatch.setattr(mmsr_mod._native, "_threads", lambda: threads)
    rng = np.random.default_rng(threads)
    crowds = [_crowd(rng, 400, 30, 3000), _crowd(rng, 3000, 500, 9000, busy=5),
              _crowd(rng, 50, 6, 1000, K=2), _crowd(rng, 3000, 4000, 9000),
              LabelTensor.coerce(DATA / "zencrowd_in" / "answers.csv")]
    for t in crowds:
        ref = mmsr_mod.sparse_pair_statistics(t, native=False)
        got = mmsr_mod.sparse_pair_statistics(t, native=True)
        # pairs that agree on some tasks and not on others (the third crowd's pairs gave both
        # labels on every task they share: their summed agreements are cut to common)
        assert len(ref[0]) > 0 and (ref[2] > 0).any()
        assert (ref[2] < ref[3]).any() or t.n_classes == 2
        for a, b in zip(got, ref):
            np.testing.assert_array_equal(a, b)
            assert a.dtype == b.dtype
