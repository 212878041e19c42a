"""GLAD: parameter recovery on data from its own generative story, monotone objective,
jit == no-jit, gold clamping, clipping keeps everything finite."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest

from crowdllm.aggregation import GLAD
from crowdllm.aggregation import glad as glad_mod
from crowdllm.aggregation._core import prepare
from crowdllm.labels import LabelTensor


def sample_glad(n_tasks=600, n_workers=12, K=3, p_answer=0.7, seed=0):
    """Answers drawn from GLAD's story: z ~ uniform, right w.p. sigmoid(alpha_w * beta_t),
    else uniform over the other K-1 classes."""
    rng = np.random.default_rng(seed)
    # alpha * beta is what the answers identify; the scale is the priors' (log-beta ~ N(1, 1)),
    # so log-beta is drawn around the prior mean.
    alpha = rng.normal(0.6, 0.35, n_workers)
    alpha[0] = -0.5  # one adversarial annotator
    log_beta = rng.normal(1.0, 0.3, n_tasks)
    z = rng.integers(0, K, n_tasks)
    rows = []
    for t in range(n_tasks):
        for w in range(n_workers):
            if rng.random() > p_answer:
                continue
            p = 1 / (1 + np.exp(-alpha[w] * np.exp(log_beta[t])))
            lab = z[t] if rng.random() < p else (z[t] + rng.integers(1, K)) % K
            rows.append((f"t{t}", f"w{w}", f"c{lab}"))
    df = pd.DataFrame(rows, columns=["task", "worker", "label"])
    return df, alpha, log_beta, z


@pytest.fixture(scope="module")
def sampled():
    return sample_glad()


def test_recovers_expertise_and_labels(sampled):
    df, alpha, log_beta, z = sampled
    m = GLAD(max_iter=200).fit(df)
    workers = [int(w[1:]) for w in m.workers_]
    est = m.alphas_
    true = alpha[workers]
    # Stated tolerance: expertise within 0.15 on average (each annotator has ~420 answers),
    # rank correlation > 0.9, the adversary's sign recovered; the probability of a right answer,
    # sigmoid(alpha * beta), averaged over each annotator's tasks, within 0.03 on average and
    # 0.08 at worst.
    assert np.abs(est - true).mean() < 0.15, np.abs(est - true)
    assert pd.Series(est).corr(pd.Series(true), method="spearman") > 0.9
    assert est[workers.index(0)] < 0
    tasks = [int(t[1:]) for t in m.tasks_]
    sig = lambda x: 1 / (1 + np.exp(-x))  # noqa: E731
    p_est = sig(np.outer(m.betas_, est)).mean(0)
    p_true = sig(np.outer(np.exp(log_beta[tasks]), true)).mean(0)
    assert np.abs(p_est - p_true).mean() < 0.03, np.abs(p_est - p_true)
    assert np.abs(p_est - p_true).max() < 0.08, np.abs(p_est - p_true)
    pred = np.array([int(c[1:]) for c in m.labels_])
    assert (pred == z[tasks]).mean() > 0.9
    # Difficulty: 8 answers per task say little about each beta, but the estimates still
    # correlate with the truth.
    assert np.corrcoef(np.log(m.betas_), log_beta[tasks])[0, 1] > 0.1
    assert np.isfinite(m.probas_).all() and np.allclose(m.probas_.sum(1), 1, atol=1e-5)


@pytest.mark.filterwarnings("ignore::crowdllm.aggregation.ConvergenceWarning")
def test_objective_never_decreases(sampled):
    df, *_ = sampled
    m = GLAD(max_iter=40, tol=-1.0, dtype="float64").fit(df.iloc[:3000])  # tol<0: run all
    h = np.asarray(m.loss_history_)
    assert len(h) == 40
    assert np.all(np.diff(h) >= -1e-9), np.diff(h).min()


def test_jit_equals_no_jit():
    df, *_ = sample_glad(n_tasks=12, n_workers=4, seed=3)
    t = LabelTensor.coerce(df)
    data = prepare(t, layout="coo")
    kw = dict(max_iter=2, m_steps=1)
    jitted = glad_mod.fit(data, **kw)
    with jax.disable_jit():
        plain = glad_mod.fit(data, **kw)
    np.testing.assert_allclose(np.asarray(jitted.posteriors), np.asarray(plain.posteriors), atol=1e-5)
    np.testing.assert_allclose(np.asarray(jitted.alphas), np.asarray(plain.alphas), atol=1e-4)


def test_dense_and_coo_agree():
    df, *_ = sample_glad(n_tasks=80, n_workers=6, p_answer=1.0, seed=5)
    a = GLAD(max_iter=30, layout="coo").fit(df)
    b = GLAD(max_iter=30, layout="dense").fit(df)
    np.testing.assert_allclose(a.probas_, b.probas_, atol=1e-4)


def test_gold_clamped_and_gold_init(sampled):
    df, alpha, log_beta, z = sampled
    gold = {f"t{t}": f"c{z[t]}" for t in range(0, 600, 10)}
    m = GLAD(max_iter=50, init="gold").fit(df, gold=gold)
    idx = {t: i for i, t in enumerate(m.tasks_)}
    for t, lab in gold.items():
        row = m.probas_[idx[t]]
        assert row.max() == 1.0 and m.classes_[row.argmax()] == lab


def test_clipping_keeps_everything_finite():
    # An annotator who is always right on 2000 tasks pushes alpha * beta far out; a task with
    # one answer has a barely identified beta. Nothing may overflow.
    rows = [(f"t{t}", "expert", "a" if t % 2 else "b") for t in range(2000)]
    rows += [(f"t{t}", "echo", "a" if t % 2 else "b") for t in range(2000)]
    rows += [("lonely", "w3", "a")]
    m = GLAD(max_iter=100, lr=1.0).fit(pd.DataFrame(rows, columns=["task", "worker", "label"]))
    assert np.isfinite(m.probas_).all() and np.isfinite(m.alphas_).all()
    assert np.isfinite(m.betas_).all() and (m.betas_ > 0).all()
    assert np.abs(m.alphas_).max() <= glad_mod.ALPHA_MAX
    assert np.isfinite(m.loss_history_).all()


def test_gradient_is_the_derivative_of_q():
    df, *_ = sample_glad(n_tasks=20, n_workers=4, seed=7)
    with jax.enable_x64(True):
        data = prepare(LabelTensor.coerce(df), layout="coo", dtype=jnp.float64)
        rng = np.random.default_rng(0)
        params = glad_mod.GladParams(jnp.asarray(rng.normal(1, 1, data.n_workers)),
                                     jnp.asarray(rng.normal(0, 0.5, data.n_tasks)))
        view = glad_mod.answer_view(data)
        p = jnp.asarray(rng.uniform(0, 1, view.label.shape))
        auto = jax.grad(lambda pr: glad_mod.q_value(data, pr, p, 1.0, 1.0))(params)
        mine = glad_mod.q_grad(data, params, p, 1.0, 1.0)
        np.testing.assert_allclose(np.asarray(mine.alpha) * np.asarray(data.worker_mask),
                                   np.asarray(auto.alpha) * np.asarray(data.worker_mask), rtol=1e-8)
        np.testing.assert_allclose(np.asarray(mine.log_beta) * np.asarray(data.task_mask),
                                   np.asarray(auto.log_beta) * np.asarray(data.task_mask), rtol=1e-8)
