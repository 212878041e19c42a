"""MACE: parameter recovery on data from its generative story (EM and VB), monotone objective /
ELBO, restarts from different keys, jit == no-jit, the strategy table not scrambled by the order
of the file (a crowd-kit defect)."""

from __future__ import annotations

import jax
import numpy as np
import pandas as pd
import pytest

from crowdllm.aggregation import MACE
from crowdllm.aggregation import mace as mace_mod
from crowdllm.aggregation._core import prepare
from crowdllm.labels import LabelTensor


def sample_mace(n_tasks=500, n_workers=10, K=3, seed=0, rho=None):
    """MACE's story: z uniform (or ~ rho); annotator w knows w.p. theta_w (answers z), else draws
    from xi_w."""
    rng = np.random.default_rng(seed)
    theta = rng.uniform(0.35, 0.95, n_workers)
    xi = rng.dirichlet(np.full(K, 0.7), n_workers)
    z = rng.choice(K, n_tasks, p=rho)
    rows = []
    for t in range(n_tasks):
        for w in range(n_workers):
            lab = z[t] if rng.random() < theta[w] else rng.choice(K, p=xi[w])
            rows.append((f"t{t}", f"w{w}", f"c{lab}"))
    return pd.DataFrame(rows, columns=["task", "worker", "label"]), theta, xi, z


@pytest.fixture(scope="module")
def sampled():
    return sample_mace()


@pytest.mark.parametrize("method", ["em", "vb"])
def test_recovers_competence_strategies_and_labels(sampled, method):
    df, theta, xi, z = sampled
    m = MACE(method=method, n_restarts=4, max_iter=100).fit(df)
    workers = [int(w[1:]) for w in m.workers_]
    # Stated tolerance (500 answers per annotator): knowing probability within 0.05 on
    # average and 0.1 at worst; strategies (which matter only when spamming) within 0.1 on
    # average per entry; > 93 % of true labels.
    err = np.abs(m.skills_ - theta[workers])
    assert err.mean() < 0.05 and err.max() < 0.1, err
    classes = [int(c[1:]) for c in m.classes_]
    est_xi = m.thetas_[:, np.argsort(classes)]
    assert np.abs(est_xi - xi[workers]).mean() < 0.1
    tasks = [int(t[1:]) for t in m.tasks_]
    pred = np.array([int(c[1:]) for c in m.labels_])
    assert (pred == z[tasks]).mean() > 0.93
    assert np.isfinite(m.probas_).all()


@pytest.mark.parametrize("method", ["em", "vb"])
def test_learned_class_prior_recovers_skewed_proportions(method):
    # the extension (default): class proportions estimated; the paper's uniform prior kept as
    # prior="uniform". On skewed data the learned prior is recovered and labels no worse.
    rho = np.array([0.7, 0.2, 0.1])
    df, theta, xi, z = sample_mace(n_tasks=800, n_workers=6, seed=3, rho=rho)
    learned = MACE(method=method, n_restarts=4, max_iter=100).fit(df)
    uniform = MACE(method=method, n_restarts=4, max_iter=100, prior="uniform").fit(df)
    order = np.argsort([int(c[1:]) for c in learned.classes_])
    # Stated tolerance (800 tasks): each proportion within 0.04
    np.testing.assert_allclose(learned.priors_[order], rho, atol=0.04)
    np.testing.assert_allclose(uniform.priors_, 1 / 3)
    tasks = [int(t[1:]) for t in learned.tasks_]
    acc = [(np.array([int(c[1:]) for c in m.labels_]) == z[tasks]).mean() for m in (learned, uniform)]
    assert acc[0] >= acc[1] - 0.005, acc


@pytest.mark.parametrize("prior", ["learned", "uniform"])
@pytest.mark.parametrize("method", ["em", "vb"])
def test_objective_never_decreases(sampled, method, prior):
    df, *_ = sampled
    m = MACE(method=method, n_restarts=2, max_iter=30, tol=-1.0, dtype="float64", prior=prior)
    with pytest.warns(Warning):  # it runs all 30 iterations (tol < 0), so it "did not converge"
        m.fit(df.iloc[:2000])
    h = np.asarray(m.loss_history_)
    assert len(h) == 30 and np.isfinite(h).all()
    assert np.all(np.diff(h) >= -1e-9), np.diff(h).min()
    if method == "vb":
        assert h[-1] < 0  # an ELBO of discrete data is a log-probability bound: negative


def test_restarts_start_apart_and_best_is_kept(sampled):
    df, *_ = sampled
    data = prepare(LabelTensor.coerce(df.iloc[:600]))
    keys = jax.random.split(jax.random.key(0), 3)
    res = mace_mod.fit_restarts(data, keys, max_iter=5, method="em", smoothing=0.01)
    starts = np.asarray(res.start_knowing)
    assert not np.allclose(starts[0], starts[1]) and not np.allclose(starts[1], starts[2])
    best = mace_mod.best_restart(res)
    assert float(best.objective) == float(np.max(np.asarray(res.objective)))
    assert len(set(np.round(np.asarray(res.objective), 7))) > 1


def test_jit_equals_no_jit():
    df, *_ = sample_mace(n_tasks=10, n_workers=3, seed=2)
    data = prepare(LabelTensor.coerce(df), layout="coo")
    kw = dict(max_iter=2, tol=1e-5, method="vb", smoothing=0.01, a=0.5, b=0.5, gamma=10.0,
              default_noise=0.5, init_from_gold=False)
    key = jax.random.key(1)
    one = lambda d, k: mace_mod.fit_one(d, k, **kw)  # noqa: E731  (one restart: vmap is JAX's)
    jitted = jax.jit(one)(data, key)
    with jax.disable_jit():
        plain = one(data, key)
    np.testing.assert_allclose(np.asarray(jitted.posteriors), np.asarray(plain.posteriors), atol=1e-5)
    np.testing.assert_allclose(np.asarray(jitted.knowing), np.asarray(plain.knowing), atol=1e-5)


def test_strategy_follows_the_annotator_whatever_the_row_order():
    # crowd-kit 1.4.2 indexes the strategy table in sorted (worker, label) order and reads it in
    # order of first appearance. Here the spammer "a_spam" always answers "zeta": its strategy
    # must put its mass on "zeta" however the file is ordered.
    rng = np.random.default_rng(0)
    rows = []
    for t in range(300):
        z = ["alpha", "beta", "zeta"][t % 3]
        rows += [(t, "z_good", z), (t, "m_good", z), (t, "b_good", z if rng.random() < 0.9 else "beta"),
                 (t, "a_spam", "zeta")]
    df = pd.DataFrame(rows, columns=["task", "worker", "label"])
    for order in (df, df.iloc[::-1], df.sample(frac=1, random_state=1)):
        m = MACE(n_restarts=2, max_iter=50).fit(order)
        w = list(m.workers_).index("a_spam")
        assert m.classes_[m.thetas_[w].argmax()] == "zeta"
        assert m.skills_[w] < 0.5 < m.skills_[list(m.workers_).index("z_good")]


def test_gold_is_clamped(sampled):
    df, theta, xi, z = sampled
    gold = {f"t{t}": f"c{z[t]}" for t in range(0, 500, 25)}
    m = MACE(n_restarts=2, max_iter=20, init="gold").fit(df, gold=gold)
    idx = {t: i for i, t in enumerate(m.tasks_)}
    for t, lab in gold.items():
        assert m.probas_[idx[t]].max() == 1.0 and m.labels_[idx[t]] == lab
    # The class shell records every restart's objective and keeps the best one's result.
    assert m.objectives_.shape == (2,) and m.loss_history_[-1] == pytest.approx(m.objectives_.max())
