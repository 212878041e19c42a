"""EBCC: the ELBO never decreases, restarts are independent, the best ELBO is kept, panel rows
merge exactly, gold is clamped."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from crowdllm.aggregation import EBCC
from crowdllm.aggregation import ebcc as kernel
from crowdllm.aggregation._core import prepare
from test_ibcc import panel


def test_elbo_never_decreases():
    tensor, z = panel(6, n_tasks=120, n_workers=6)
    model = EBCC(restarts=1, n_subtypes=3, dtype="float64", tol=1e-12, atol=0.0, max_iter=60,
                 merge="off").fit(tensor)
    h = np.asarray(model.loss_history_)
    assert len(h) > 5
    assert np.all(np.diff(h) >= -1e-10), np.diff(h).min()
    assert (model.label_codes_ == z).mean() > 0.8


def test_restarts_are_independent_and_best_is_kept():
    tensor, _ = panel(7, n_tasks=80, n_workers=5)
    data = prepare(tensor, layout="coo")
    key = jax.random.key(11)
    opts = dict(n_subtypes=3, max_iter=40, tol=1e-6, atol=1e-3)
    # 5 restarts in chunks of 2 (the last chunk padded): vmap, scan over chunks, padding
    together = kernel.fit(data, key, restarts=5, restart_batch=2, **opts)
    # each restart alone, from its own key, gives the same final ELBO as inside the batch
    w = data.task_mask
    priors = kernel._priors(data, w, 3, 1.0, 0.1, 4.0, 1.0, True)
    keys = jax.random.split(key, 5)
    one = jax.jit(lambda k: kernel.fit_one(data, k, w, priors, **opts)[1].objective)
    alone = [float(one(k)) for k in keys]
    np.testing.assert_allclose(together.elbos, alone, rtol=1e-5)
    starts = [np.asarray(kernel.start(data, k, 3)) for k in keys[:2]]
    assert np.abs(starts[0] - starts[1]).max() > 0.1  # the starts differ
    assert int(together.best) == int(np.argmax(alone))
    assert float(together.objective) == pytest.approx(max(alone), rel=1e-5)


@pytest.mark.parametrize("layout", ["coo", "dense"])
def test_screened_restarts_continue_exactly(layout):
    """Screening: every restart runs ``screen_iter`` sweeps, the ``keep`` best by ELBO run on. A
    kept restart ends exactly where it would have unscreened (its state carries over: no
    posteriors are stored between the stages, they are rebuilt from the counts); a dropped one
    reports its ELBO after ``screen_iter`` sweeps."""
    tensor, _ = panel(12, n_tasks=90, n_workers=5)
    key = jax.random.key(3)
    opts = dict(n_subtypes=3, max_iter=40, tol=1e-12, atol=1e-4, restarts=6, restart_batch=4)
    with jax.enable_x64(True):
        data = prepare(tensor, layout=layout, dtype=jnp.float64)
        full = kernel.fit(data, key, **opts)
        early = kernel.fit(data, key, **{**opts, "max_iter": 4})
        screened = kernel.fit(data, key, screen_iter=4, keep=2, **opts)
    assert np.all(np.asarray(full.sweeps) > 4)
    top = np.argsort(-np.asarray(early.elbos))[:2]
    dropped = np.setdiff1d(np.arange(6), top)
    np.testing.assert_allclose(np.asarray(screened.elbos)[top], np.asarray(full.elbos)[top], rtol=1e-10)
    np.testing.assert_allclose(np.asarray(screened.elbos)[dropped], np.asarray(early.elbos)[dropped],
                               rtol=1e-10)
    np.testing.assert_array_equal(np.asarray(screened.sweeps)[dropped], 4)
    b = int(screened.best)
    assert b == top[np.argmax(np.asarray(full.elbos)[top])]
    # its posteriors are those of its last sweep (rebuilt from the counts kept between stages)
    with jax.enable_x64(True):
        w = data.task_mask
        priors = kernel._priors(data, w, 3, 1.0, 0.1, 4.0, 1.0, True)
        alone, loop = kernel.fit_one(data, jax.random.split(key, 6)[b], w, priors, n_subtypes=3,
                                     max_iter=40, tol=1e-12, atol=1e-4)
    np.testing.assert_allclose(screened.posteriors[:tensor.n_tasks], alone.z[:tensor.n_tasks], atol=1e-10)
    np.testing.assert_allclose(screened.history, loop.history, rtol=1e-10)


def test_merge_patterns_round_trip():
    tensor, _ = panel(8, n_tasks=300, n_workers=3, n_classes=2, p_missing=0.0)
    gold = np.full(tensor.n_tasks, -1, np.int32)
    gold[:5] = 1
    rows, counts, inverse, pgold = kernel.merge_patterns(tensor, gold)
    assert rows.n_tasks < tensor.n_tasks
    assert counts.sum() == tensor.n_tasks
    np.testing.assert_array_equal(rows.dense()[inverse], tensor.dense())
    np.testing.assert_array_equal(pgold[inverse], gold)


def test_merged_panel_matches_unmerged_fixed_point():
    """Merging identical rows changes only the random start: from a start shared by identical
    rows (one restart, no subtype noise: M = 1, i.e. IBCC), both give the same posteriors."""
    tensor, _ = panel(9, n_tasks=200, n_workers=4, n_classes=2, p_missing=0.0)
    a = EBCC(restarts=1, n_subtypes=1, merge="on", dtype="float64", tol=1e-12, atol=0).fit(tensor)
    b = EBCC(restarts=1, n_subtypes=1, merge="off", dtype="float64", tol=1e-12, atol=0).fit(tensor)
    np.testing.assert_allclose(a.probas_, b.probas_, atol=1e-4)  # both stop near the fixed point


def test_gold_is_clamped():
    tensor, z = panel(10, n_tasks=60, n_workers=5)
    gold = {i: int((z[i] + 1) % 3) for i in range(6)}
    model = EBCC(restarts=2, n_subtypes=2).fit(tensor, gold=gold)
    for t, g in gold.items():
        assert model.probas_[t, g] == pytest.approx(1.0)
    assert model.elbos_.shape == (2,)
    np.testing.assert_allclose(model.subtypes_.sum(axis=2), model.probas_, atol=1e-5)


def test_screening_defaults_and_bad_arguments():
    """``auto`` screens only past AUTO_SCREEN_ANSWERS answers; a kept count or sweep count below
    one is refused by name."""
    model = EBCC()
    assert model._screening(kernel.AUTO_SCREEN_ANSWERS) == (None, 1)
    assert model._screening(kernel.AUTO_SCREEN_ANSWERS + 1) == (kernel.AUTO_SCREEN_ITER, kernel.AUTO_KEEP)
    assert EBCC(screen_iter=3, keep=2)._screening(10) == (3, 2)
    assert EBCC(screen_iter=None)._screening(10 ** 9) == (None, 1)
    with pytest.raises(ValueError, match="screen_iter"):
        EBCC(screen_iter=0)
    with pytest.raises(ValueError, match="keep"):
        EBCC(keep=0)
