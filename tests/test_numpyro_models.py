"""NumPyro Dawid-Skene and IBCC: parameter recovery on data sampled from the models themselves,
and IBCC's VB answers against NUTS on a small dataset.

Tolerances (stated once, used below):
* recovery, Dawid-Skene by SVI (400 tasks): every posterior mean accuracy and class proportion
  within 0.1 of the value the data were sampled with;
* recovery, IBCC by NUTS (80 tasks): the 95 % credible interval of each annotator's accuracy
  covers the true value for at least 5 of 6 annotators, posterior means within 0.15, split
  R-hat under 1.1;
* VB vs NUTS (IBCC, the same 80 tasks): class posteriors within 0.05 on average and 0.35 at most
  (mean-field VB ignores the uncertainty of the confusion matrices, so it is overconfident on the
  few ambiguous tasks), the same label on at least 95 % of tasks, expected confusion entries
  within 0.05 on average.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpyro import handlers

from crowdllm.aggregation import IBCC
from crowdllm.aggregation.numpyro_models import BayesianDawidSkene, crowd_model
from crowdllm.labels import LabelTensor


def sample_panel(seed: int, n_tasks: int, accuracy: list[float], n_classes: int, rho=None):
    """A full panel sampled from the model's own generative story (label=None), with known
    class proportions and confusion rows (accuracy on the diagonal, the rest shared evenly)."""
    K, W = n_classes, len(accuracy)
    acc = np.asarray(accuracy)[:, None, None]
    pi = np.where(np.eye(K)[None] > 0, acc, (1 - acc) / (K - 1))
    rho = np.full(K, 1.0 / K) if rho is None else np.asarray(rho)
    task = np.repeat(np.arange(n_tasks), W)
    worker = np.tile(np.arange(W), n_tasks)
    model = handlers.seed(handlers.condition(crowd_model, {"rho": jnp.asarray(rho), "pi": jnp.asarray(pi)}),
                          jax.random.key(seed))
    trace = handlers.trace(model).get_trace(task, worker, None, n_tasks=n_tasks, n_workers=W,
                                            n_classes=K)
    y = np.asarray(trace["y"]["value"])
    z = np.asarray(trace["z"]["value"])
    labels = np.full((n_tasks, W), -1)
    labels[task, worker] = y
    return LabelTensor.from_dense(labels, classes=list(range(K))), z, pi, rho


ACC = [0.9, 0.8, 0.75, 0.7, 0.6]
ACC6 = [0.85, 0.8, 0.75, 0.7, 0.65, 0.6]


def test_samples_follow_the_story():
    tensor, z, pi, _ = sample_panel(0, 2000, ACC, 2)
    observed = (tensor.dense() == z[:, None]).mean(axis=0)
    np.testing.assert_allclose(observed, ACC, atol=0.03)


def test_ds_svi_recovers_parameters():
    tensor, z, pi, rho = sample_panel(1, 400, ACC, 2, rho=[0.6, 0.4])
    model = BayesianDawidSkene(inference="svi", num_steps=1000, num_samples=300, seed=0,
                               progress_bar=False).fit(tensor)
    np.testing.assert_allclose(np.einsum("wkk->wk", model.errors_), np.einsum("wkk->wk", pi), atol=0.1)
    np.testing.assert_allclose(model.priors_, rho, atol=0.1)
    lo, hi = model.credible_[:, 0], model.credible_[:, 1]
    assert np.all(lo < model.skills_) and np.all(model.skills_ < hi)
    assert (model.label_codes_ == z).mean() > 0.9
    assert model.loss_history_[-1] > model.loss_history_[0]  # -loss: the ELBO estimate rose


@pytest.fixture(scope="module")
def small():
    """80 tasks x 6 annotators x 3 classes from IBCC's story; 5 gold tasks; VB and NUTS fits."""
    tensor, z, pi, rho = sample_panel(3, 80, ACC6, 3)
    gold = {i: int(z[i]) for i in range(5)}
    vb = IBCC(dtype="float64", tol=1e-10).fit(tensor, gold=gold)
    nuts = IBCC(inference="nuts", num_warmup=300, num_samples=300, seed=1,
                progress_bar=False).fit(tensor, gold=gold)
    return tensor, z, pi, rho, gold, vb, nuts


def test_ibcc_nuts_recovers_parameters(small):
    tensor, z, pi, rho, gold, vb, nuts = small
    assert nuts.r_hat_ < 1.1
    true_skill = np.einsum("k,wkk->w", rho, pi)
    lo, hi = nuts.credible_[:, 0], nuts.credible_[:, 1]
    covered = (lo <= true_skill) & (true_skill <= hi)
    assert covered.sum() >= 5, (lo, true_skill, hi)  # 95 % intervals: at most one miss of six
    np.testing.assert_allclose(nuts.skills_, true_skill, atol=0.15)
    assert (nuts.label_codes_ == z).mean() > 0.85


def test_ibcc_vb_agrees_with_nuts(small):
    tensor, z, pi, rho, gold, vb, nuts = small
    diff = np.abs(vb.probas_ - nuts.probas_)
    assert diff.mean() < 0.05, diff.mean()
    assert diff.max() < 0.35, diff.max()
    assert (vb.label_codes_ == nuts.label_codes_).mean() >= 0.95
    assert np.abs(vb.errors_ - nuts.errors_).mean() < 0.05


def test_gold_is_clamped(small):
    tensor, z, pi, rho, gold, vb, nuts = small
    for t, g in gold.items():
        assert nuts.probas_[t, g] == pytest.approx(1.0)
        assert vb.probas_[t, g] == pytest.approx(1.0)
    table = nuts.skills_table()
    assert {"skill", "skill_lo", "skill_hi"} <= set(table.column_names)
