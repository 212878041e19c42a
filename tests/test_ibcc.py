"""IBCC by VB: the ELBO never decreases, layouts agree, gold is clamped, known answers."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from crowdllm.aggregation import IBCC, get_method
from crowdllm.aggregation import _native
from crowdllm.aggregation import ibcc as kernel
from crowdllm.aggregation._core import prepare
from crowdllm.labels import LabelTensor


def panel(seed=0, n_tasks=150, n_workers=7, n_classes=3, p_missing=0.3):
    """Dawid-Skene data with missing answers: accuracies 0.5-0.9, errors uniform."""
    rng = np.random.default_rng(seed)
    z = rng.integers(0, n_classes, n_tasks)
    acc = rng.uniform(0.5, 0.9, n_workers)
    wrong = (z[:, None] + rng.integers(1, n_classes, (n_tasks, n_workers))) % n_classes
    y = np.where(rng.random((n_tasks, n_workers)) < acc, z[:, None], wrong)
    y[rng.random((n_tasks, n_workers)) < p_missing] = -1
    y[np.arange(n_tasks), rng.integers(0, n_workers, n_tasks)] = z  # every task has an answer
    return LabelTensor.from_dense(y, classes=list(range(n_classes))), z


@pytest.mark.parametrize("layout", ["coo", "dense"])
def test_elbo_never_decreases(layout):
    tensor, _ = panel()
    model = IBCC(dtype="float64", tol=1e-12, atol=0.0, max_iter=200, layout=layout).fit(tensor)
    h = np.asarray(model.loss_history_)
    assert len(h) > 3
    assert np.all(np.diff(h) >= -1e-10), np.diff(h).min()
    assert np.isfinite(model.elbo_)


def test_layouts_agree_and_beat_chance():
    tensor, z = panel(1)
    a = IBCC(layout="coo", dtype="float64").fit(tensor)
    b = IBCC(layout="dense", dtype="float64").fit(tensor)
    np.testing.assert_allclose(a.probas_, b.probas_, atol=1e-8)
    assert (a.label_codes_ == z).mean() > 0.85
    np.testing.assert_allclose(a.probas_.sum(axis=1), 1.0, atol=1e-9)
    np.testing.assert_allclose(a.errors_.sum(axis=2), 1.0, atol=1e-9)


def test_elbo_matches_direct_formula():
    """The kernel's ELBO equals E_q[log p(y, z, rho, pi)] + H[q] computed term by term."""
    from scipy.special import digamma, gammaln

    tensor, _ = panel(2, n_tasks=40, n_workers=4, n_classes=2)
    with jax.enable_x64(True):
        data = prepare(tensor, layout="coo", pad=False, dtype=np.float64)
        res = jax.tree_util.tree_map(np.asarray, kernel.fit(data, max_iter=7, tol=-1.0))
    q, nu, mu = res.posteriors, res.nu, res.mu
    alpha = np.ones(2)
    beta = np.array([[4.0, 1.0], [1.0, 4.0]])
    e_rho = digamma(nu) - digamma(nu.sum())
    e_pi = digamma(mu) - digamma(mu.sum(-1, keepdims=True))

    def log_dir(a, elog, a0):  # E_q[log Dir(x; a0)] - E_q[log Dir(x; a)]
        lb = lambda v: gammaln(v).sum(-1) - gammaln(v.sum(-1))
        return (-lb(a0) + ((a0 - 1) * elog).sum(-1)) - (-lb(a) + ((a - 1) * elog).sum(-1))

    ll = (q * e_rho).sum() + sum(q[t] @ e_pi[w, :, l] for t, w, l in zip(tensor.task, tensor.worker, tensor.label))
    ent = -(q * np.log(np.clip(q, 1e-300, None))).sum()
    direct = ll + ent + log_dir(nu, e_rho, alpha) + log_dir(mu, e_pi, beta[None]).sum()
    assert res.objective * tensor.n_answers == pytest.approx(direct, rel=1e-9)


def test_gold_is_clamped():
    tensor, z = panel(3)
    gold = {i: int((z[i] + 1) % 3) for i in range(10)}  # deliberately wrong
    model = IBCC().fit(tensor, gold=gold)
    for t, g in gold.items():
        assert model.probas_[t, g] == pytest.approx(1.0)


def test_unanimous_answers():
    tensor = LabelTensor.from_arrays(["a", "a", "b", "b", "c"], ["u", "v", "u", "v", "u"],
                                     ["x", "x", "y", "y", "y"])
    model = IBCC().fit(tensor)
    assert model.labels_.tolist() == ["x", "y", "y"]
    assert np.isfinite(model.probas_).all()


def test_get_method_passes_inference():
    assert get_method("ibcc", inference="svi", seed=3).inference == "svi"
    with pytest.raises(ValueError, match="inference"):
        IBCC(inference="mcmc")


def test_cli_inference_option(tmp_path):
    from click.testing import CliRunner

    from crowdllm.cli import main

    path = tmp_path / "answers.csv"
    path.write_text("task,worker,label\n" + "".join(
        f"t{t},w{w},{'a' if (t + (w == 2)) % 2 else 'b'}\n" for t in range(6) for w in range(3)))
    res = CliRunner().invoke(main, ["aggregate", str(path), "--method", "ibcc", "--inference", "vb",
                                    "--json"])
    assert res.exit_code == 0, res.output
    bad = CliRunner().invoke(main, ["aggregate", str(path), "--method", "ibcc", "--inference", "hmc"])
    assert bad.exit_code != 0 and "hmc" in bad.output


def test_digamma_gammaln_match_scipy_in_float64():
    """The float32 digamma and gammaln of the Dirichlet statistics (asymptotic series after a
    shift) agree with float64 SciPy from 1e-3 to 1e8 as closely as XLA's float32 functions do
    (relative error, absolute where the value is below 1); float64 arguments take
    ``jax.scipy.special``'s functions, exact to float64 rounding."""
    import jax.numpy as jnp
    import scipy.special as sp

    x = np.exp(np.random.default_rng(0).uniform(np.log(1e-3), np.log(1e8), 200_000))
    x = np.concatenate([x, [1e-3, 0.01, 0.5, 1.0, 1.4616321, 2.0, 5.999, 6.0, 1e8]])
    x32 = x.astype(np.float32)
    ref = x32.astype(np.float64)
    fns = [kernel._digamma_gammaln_xla]
    if _native.available():
        fns.append(_native.digamma_gammaln)
    for fn in fns:  # the XLA formulas and the native kernel's
        dg, gl = (np.asarray(v, np.float64) for v in jax.jit(fn)(jnp.asarray(x32)))
        for got, want, tol in ((dg, sp.digamma(ref), 1e-6), (gl, sp.gammaln(ref), 5e-6)):
            err = np.abs(got - want) / np.maximum(np.abs(want), 1.0)
            assert err.max() < tol, (fn, x32[err.argmax()], got[err.argmax()], want[err.argmax()])
        # under vmap (restarts batched), elementwise all the same
        dgv, _ = jax.vmap(fn)(jnp.asarray(x32[:1000].reshape(10, 100)))
        np.testing.assert_allclose(np.asarray(dgv).reshape(-1), dg[:1000], rtol=1e-6)
    with jax.enable_x64(True):
        dg64, gl64 = kernel.digamma_gammaln(jnp.asarray(ref))
        np.testing.assert_allclose(np.asarray(dg64), sp.digamma(ref), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(np.asarray(gl64), sp.gammaln(ref), rtol=1e-12, atol=1e-12)


@pytest.mark.skipif(not _native.available(), reason="no native kernels here")
def test_native_off_keeps_digamma_and_gammaln_out_of_native_code(monkeypatch):
    """``native="off"`` means no native code: IBCC's, MACE's (VB) and EBCC's XLA fits then
    trace ``digamma_gammaln`` without the native call (which, on first use, builds the
    library), while ``auto`` uses it where the sweeps stay in XLA (here: a sparse crowd whose
    annotators' codes the sweep kernel does not take)."""
    from crowdllm.aggregation import EBCC, MACE
    from crowdllm.aggregation import ebcc, mace

    calls = []

    def counted(x):
        calls.append(x.shape)
        return kernel._digamma_gammaln_xla(x)

    monkeypatch.setattr(_native, "digamma_gammaln", counted)
    for fn in (kernel.fit, mace.fit_restarts, ebcc.fit):  # trace anew: no cached program
        fn.clear_cache()
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 3, 211)
    lab = np.where(rng.random((211, 7)) < 0.7, truth[:, None], rng.integers(0, 3, (211, 7)))
    base = LabelTensor.from_dense(lab.astype(np.int8), classes=["a", "b", "c"])
    # the 7 annotators among 22,000 who answer nothing: 22,000 x 3 labels do not fit the COO
    # sweep's uint16 codes, so the sweeps stay in XLA under ``auto``
    tensor = LabelTensor(task=base.task, worker=base.worker * 3000, label=base.label,
                         task_ids=np.arange(211), worker_ids=np.arange(22_000),
                         classes=np.array(["a", "b", "c"]))
    fits = [IBCC(native="off", layout="coo"), MACE(native="off", method="vb", n_restarts=2,
                                                   layout="coo"),
            EBCC(native="off", layout="coo", restarts=2, max_iter=100)]
    for m in fits:
        m.fit(tensor)
        assert not m.native_used_
    assert calls == []
    auto = IBCC(layout="coo").fit(tensor)  # the XLA sweeps (see above)
    assert not auto.native_used_ and calls
    np.testing.assert_allclose(auto.probas_, fits[0].probas_, atol=1e-5)
