"""KOS: labels and reliabilities recovered on binary one-coin data, a clear error for more than two
classes, ties handled, jit == no-jit, no overflow however many iterations."""

from __future__ import annotations

import jax
import numpy as np
import pandas as pd
import pytest

from crowdllm.aggregation import KOS
from crowdllm.aggregation import kos as kos_mod
from crowdllm.aggregation._core import prepare, shared_shapes
from crowdllm.labels import LabelTensor


def sample_binary(p, n_tasks=1000, p_answer=0.6, seed=0):
    """KOS's setting: binary truth, annotator w right w.p. p_w (spammers p = 0.5)."""
    rng = np.random.default_rng(seed)
    z = rng.integers(0, 2, n_tasks)
    rows = [(t, f"w{w}", int(z[t] if rng.random() < pw else 1 - z[t]))
            for t in range(n_tasks) for w, pw in enumerate(p) if rng.random() < p_answer]
    return pd.DataFrame(rows, columns=["task", "worker", "label"]), z


def test_recovers_labels_and_reliability_order():
    p = np.array([0.95, 0.9, 0.85, 0.8, 0.75, 0.5, 0.5, 0.5, 0.5, 0.2])
    df, z = sample_binary(p)
    m = KOS(n_iter=50).fit(df)
    pred = np.asarray(m.labels_, dtype=int)
    truth = z[np.asarray(m.tasks_, dtype=int)]
    mv = df.groupby("task")["label"].mean().reindex(m.tasks_).to_numpy()
    mv_acc = ((mv > 0.5) == truth)[mv != 0.5].mean()
    # Stated tolerance: >= 90 % right (about 6 answers a task, 4 of 10 annotators spam), at least majority vote's accuracy (spammers and an
    # adversary are down-weighted), reliabilities ordered like 2 p - 1 (Spearman > 0.8),
    # the adversary's negative.
    assert (pred == truth).mean() >= max(0.9, mv_acc + 0.02)
    workers = [int(w[1:]) for w in m.workers_]
    rel = pd.Series(m.skills_)
    assert rel.corr(pd.Series(2 * p[workers] - 1), method="spearman") > 0.8
    assert m.skills_[workers.index(9)] < 0
    assert np.isfinite(m.probas_).all()


def test_more_than_two_classes_is_a_clear_error():
    df = pd.DataFrame({"task": [1, 1, 2], "worker": ["a", "b", "a"], "label": ["x", "y", "z"]})
    with pytest.raises(ValueError, match="binary tasks only.*3 classes"):
        KOS().fit(df)


def test_tie_gives_half_and_many_iterations_do_not_overflow():
    df = pd.DataFrame({"task": [1, 1, 2, 2, 3], "worker": ["a", "b", "a", "b", "a"],
                       "label": [0, 1, 0, 0, 1]})
    m = KOS(n_iter=2000).fit(df)
    assert np.isfinite(m.scores_).all() and np.isfinite(m.skills_).all()
    assert np.isfinite(m.probas_).all() and set(np.unique(m.probas_)) <= {0.0, 0.5, 1.0}


def test_jit_equals_no_jit_and_dense_equals_coo():
    df, _ = sample_binary(np.array([0.9, 0.8, 0.7, 0.6]), n_tasks=30, p_answer=0.8, seed=1)
    t = LabelTensor.coerce(df)
    key = jax.random.key(3)
    coo = prepare(t, layout="coo")
    jitted = kos_mod.fit(coo, key, n_iter=5)
    with jax.disable_jit():
        plain = kos_mod.fit(coo, key, n_iter=5)
    np.testing.assert_allclose(np.asarray(jitted.scores), np.asarray(plain.scores), rtol=1e-4, atol=1e-5)
    # the first messages hash each answer's (task, annotator): the two layouts draw the same
    # (after one round, where the scores still show the draws)
    dense = kos_mod.fit(prepare(t, layout="dense"), key, n_iter=1)
    sparse = kos_mod.fit(coo, key, n_iter=1)
    np.testing.assert_array_equal(np.asarray(dense.posteriors)[: t.n_tasks],
                                  np.asarray(sparse.posteriors)[: t.n_tasks])
    np.testing.assert_allclose(np.asarray(dense.scores)[: t.n_tasks],
                               np.asarray(sparse.scores)[: t.n_tasks], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(dense.reliability)[: t.n_workers],
                               np.asarray(sparse.reliability)[: t.n_workers], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("layout", ["dense", "coo"])
def test_padding_to_a_shared_shape_changes_nothing(layout):
    # shared_shapes pads a crowd to a larger one's shape (more tasks, annotators and answers):
    # the real answers' first messages, and so every score and skill, are the unpadded fit's
    small, _ = sample_binary(np.array([0.9, 0.8, 0.7, 0.6, 0.3]), n_tasks=120, p_answer=0.8, seed=2)
    large, _ = sample_binary(np.full(7, 0.7), n_tasks=150, p_answer=0.8, seed=3)
    small, large = LabelTensor.coerce(small), LabelTensor.coerce(large)
    own = KOS(n_iter=20, layout=layout).fit(small)
    with shared_shapes([small, large]):
        data = prepare(small, layout=layout)
        padded = KOS(n_iter=20, layout=layout).fit(small)
    if layout == "dense":
        assert data.labels.shape[0] > prepare(small, layout=layout).labels.shape[0]
        assert data.labels.shape[1] == 7
    else:
        assert data.task.shape[0] > prepare(small, layout=layout).task.shape[0]
    np.testing.assert_array_equal(padded.probas_, own.probas_)
    np.testing.assert_allclose(padded.scores_, own.scores_, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(padded.skills_, own.skills_, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("layout", ["coo", "dense"])
def test_node_sums_equal_the_edge_messages(layout):
    # fit (two matrix-vector products per iteration) is the edge form rewritten exactly:
    # same scores up to the positive scale each normalises by, same labels and reliabilities
    p = np.array([0.9, 0.8, 0.7, 0.55, 0.3, 0.85])
    df, _ = sample_binary(p, n_tasks=200, p_answer=0.7, seed=4)
    t = LabelTensor.coerce(df)
    with jax.enable_x64(True):
        import jax.numpy as jnp
        data = prepare(t, layout=layout, dtype=jnp.float64)
        key = jax.random.key(7)
        before = kos_mod.fit._cache_size()
        for n_iter in (1, 3, 40):
            a, b = kos_mod.fit(data, key, n_iter=n_iter), kos_mod.fit_edges(data, key, n_iter=n_iter)
            sa, sb = np.asarray(a.scores)[: t.n_tasks], np.asarray(b.scores)[: t.n_tasks]
            ra, rb = np.asarray(a.reliability)[: t.n_workers], np.asarray(b.reliability)[: t.n_workers]
            scale = np.linalg.norm(sb) / np.linalg.norm(sa)
            assert scale > 0
            np.testing.assert_allclose(sa * scale, sb, rtol=1e-9, atol=1e-9 * np.abs(sb).max())
            np.testing.assert_allclose(ra * scale, rb, rtol=1e-9, atol=1e-9 * np.abs(rb).max())
            np.testing.assert_array_equal(np.asarray(a.posteriors), np.asarray(b.posteriors))
        # the round count is traced: the three counts ran one compiled program
        assert kos_mod.fit._cache_size() - before <= 1
