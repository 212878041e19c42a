"""The fast dense sums (``aggregation._fast``) equal the one-hot reference sums, and every
aggregator gives the same results on the fast and the reference path.

Small inputs with missing cells, several chunks and a ragged last chunk (``CHUNK`` is lowered
for these tests), gold tasks, float32 and float64.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from crowdllm.aggregation import METHODS, _core, _fast, dawid_skene
from crowdllm.labels import LabelTensor


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    """Chunks of 16 tasks, so a 100-task panel takes 7 chunks, the last one padded."""
    monkeypatch.setattr(_fast, "CHUNK", 16)
    jax.clear_caches()
    yield
    jax.clear_caches()


def _panel(n_tasks=100, n_workers=7, n_classes=4, missing=0.3, seed=0, with_gold=True):
    rng = np.random.default_rng(seed)
    truth = rng.integers(0, n_classes, n_tasks)
    acc = rng.uniform(0.4, 0.9, n_workers)
    t, w, l = [], [], []
    for i in range(n_tasks):
        for j in range(n_workers):
            if rng.random() < missing:
                continue
            lab = truth[i] if rng.random() < acc[j] else rng.integers(0, n_classes)
            t.append(f"t{i}"); w.append(f"w{j}"); l.append(f"c{lab}")
    tensor = LabelTensor.from_arrays(t, w, l) if hasattr(LabelTensor, "from_arrays") else None
    if tensor is None:
        import pandas as pd
        tensor = LabelTensor.coerce(pd.DataFrame({"task": t, "worker": w, "label": l}))
    gold = None
    if with_gold:
        gold = np.full(tensor.n_tasks, -1, np.int32)
        idx = rng.choice(tensor.n_tasks, 10, replace=False)
        codes = {c: k for k, c in enumerate(tensor.classes.tolist())}
        for i in idx:
            tid = tensor.task_ids[i]
            gold[i] = codes[f"c{truth[int(str(tid)[1:])]}"]
    return tensor, gold


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_sums_equal_reference(dtype):
    tensor, gold = _panel()
    with jax.enable_x64(dtype == "float64"):
        fdt = jnp.float64 if dtype == "float64" else jnp.float32
        tol = 1e-12 if dtype == "float64" else 2e-5
        data = _core.prepare(tensor, layout="dense", gold=gold, dtype=fdt, pad=False)
        assert data.n_tasks == 100 and data.n_tasks % 16 != 0  # ragged last chunk
        rng = np.random.default_rng(1)
        W, L = data.n_workers, data.n_classes
        table = jnp.asarray(rng.normal(size=(W, 3, L)), fdt)  # K != L on purpose
        post = jnp.asarray(rng.dirichlet(np.ones(3), data.n_tasks), fdt)
        post_l = jnp.asarray(rng.dirichlet(np.ones(L), data.n_tasks), fdt)
        ww = jnp.asarray(rng.uniform(0, 2, W), fdt)
        pairs = [
            (_core.task_class_sum(data, table), _core._reference_task_class_sum(data, table)),
            (_core.worker_confusion(data, post), _core._reference_worker_confusion(data, post)),
            (_core.task_vote(data, ww), _core._reference_task_vote(data, ww)),
            (_core.worker_agreement(data, post_l), _core._reference_worker_agreement(data, post_l)),
        ]
        for fast, ref in pairs:
            assert fast.shape == ref.shape and fast.dtype == ref.dtype
            np.testing.assert_allclose(np.asarray(fast), np.asarray(ref), rtol=tol, atol=tol)
        # and the dense sums equal the COO ones
        coo = _core.prepare(tensor, layout="coo", gold=gold, dtype=fdt, pad=False)
        # the hits of one-hot labels, counted in integers, on both layouts
        lab = jnp.asarray(rng.integers(0, L, data.n_tasks), jnp.int32)
        hits = _core._reference_worker_agreement(data, jax.nn.one_hot(lab, L, dtype=fdt))
        for layout in (data, coo):
            got = _core.worker_hits(layout, lab, fdt)
            assert got.dtype == fdt
            np.testing.assert_array_equal(np.asarray(got), np.asarray(hits))
        np.testing.assert_allclose(np.asarray(_core.worker_confusion(data, post)),
                                   np.asarray(_core.worker_confusion(coo, post)), rtol=tol, atol=tol)


@pytest.mark.parametrize("W", [12, 16, 37])
def test_task_count_equals_the_reference_vote_to_the_bit(W):
    """The majority vote's counts (the annotators' mask as weights): the fused pass (a scan over
    groups of 16 annotators past 16) gives the reference contraction's sums exactly, and the COO
    layout the same."""
    rng = np.random.default_rng(W)
    lab = rng.integers(-1, 5, (700, W))
    lab[:, 0] = rng.integers(0, 5, 700)
    tensor = LabelTensor.from_dense(lab)
    data = _core.prepare(tensor, layout="dense")
    ref = _core._reference_task_vote(data, data.worker_mask.astype(jnp.float32))
    got = _core.task_count(data)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(ref))
    coo = _core.prepare(tensor, layout="coo")
    np.testing.assert_array_equal(np.asarray(_core.task_count(coo))[:700], np.asarray(ref)[:700])
    with _core.use_fast(False):
        np.testing.assert_array_equal(np.asarray(_core.task_count(data)), np.asarray(ref))


def test_fused_ds_step_and_fit_equal_reference():
    tensor, gold = _panel(seed=3)
    data = _core.prepare(tensor, layout="dense", gold=gold, pad=False)
    with _core.use_fast(False):
        ref = jax.tree_util.tree_map(np.asarray, dawid_skene.fit(data, max_iter=20, tol=-1.0))
        state = dawid_skene.init(data, smoothing=0.01)
        post_r, ll_r = dawid_skene.e_step(data, state.log_prior, state.log_conf)
        counts_r = _core.worker_confusion(data, post_r * data.task_mask[:, None])
    post, ll, counts, psum = _fast.ds_em_step(data.labels, data.n_classes, data.task_mask,
                                              data.gold, state.log_prior, state.log_conf)
    np.testing.assert_allclose(post, post_r, atol=1e-6)
    np.testing.assert_allclose(ll, ll_r, rtol=1e-6)
    np.testing.assert_allclose(counts, counts_r, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(psum, np.asarray(post_r).sum(0), rtol=1e-5)
    assert np.all(np.asarray(post)[gold >= 0].max(1) == 1.0)  # gold clamped
    fused = jax.tree_util.tree_map(np.asarray, _fast.ds_fit_dense(data, max_iter=20, tol=-1.0))
    assert int(fused.n_iter) == int(ref.n_iter) == 20
    for a, b in zip(fused, ref):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


# every registered kernel, with short runs (one restart where there are restarts)
KWARGS = {
    "ds": {"max_iter": 15}, "onecoin-ds": {"max_iter": 15}, "zbs": {"max_iter": 15},
    "glad": {"max_iter": 5}, "mace": {"n_restarts": 1, "max_iter": 10},
    "mmsr": {"max_iter": 50}, "kos": {"n_iter": 10}, "ibcc": {"max_iter": 10},
    "ebcc": {"restarts": 1, "max_iter": 5}, "bwa": {"max_iter": 10},
}


# the kernels that call the dense sums or the fused DS pass (MACE: its E-step is a DS E-step
# with a structured confusion matrix; GLAD: its per-label scores are vote sums; KOS uses
# per-answer formulas through
# ``answers_of`` on either path, so the fast sums cannot change them)
USES_SUMS = ("ds", "onecoin-ds", "mv", "wawa", "zbs", "mmsr", "ibcc", "ebcc", "bwa", "mace", "glad")


def test_sum_users_listed():
    import inspect
    import re
    for name, cls in METHODS.items():
        src = inspect.getsource(inspect.getmodule(cls))
        calls = re.search(r"\b(task_class_sum|worker_confusion|task_vote|worker_agreement|"
                          r"majority_vote|weighted_vote)\b", src)
        if calls and name not in ("llm-judge", "ds-bayes"):
            assert name in USES_SUMS, name


@pytest.mark.parametrize("name", USES_SUMS)
def test_every_method_fast_equals_reference(name):
    cls = METHODS[name]
    accepted = cls.parameters()
    kw = {k: v for k, v in KWARGS.get(name, {}).items() if k in accepted}
    if "layout" in accepted:
        kw["layout"] = "dense"
    if "ties" in accepted:
        kw["ties"] = "lowest"
    # float64 where the kernel offers it: EM amplifies float32 rounding over iterations, and
    # the fast and reference paths add in different orders
    tol = 1e-4
    if "dtype" in accepted:
        kw["dtype"], tol = "float64", 1e-9
    tensor, _ = _panel(n_tasks=60, n_workers=5, n_classes=3, seed=7, with_gold=False)
    fast = cls(**kw).fit(tensor)
    with _core.use_fast(False):
        ref = cls(**kw).fit(tensor)
    np.testing.assert_allclose(fast.probas_, ref.probas_, rtol=tol, atol=tol)
    np.testing.assert_array_equal(fast.label_codes_, ref.label_codes_)


@pytest.mark.parametrize("name", ["ds", "onecoin-ds", "ibcc"])
def test_native_kernel_equals_the_reference_path_in_float32(name):
    """DawidSkene, OneCoinDawidSkene and IBCC run on the native kernel by default (dense,
    float32, AVX2 CPU); ``use_fast(False)`` gives the one-hot einsum reference instead."""
    from crowdllm.aggregation import _native

    if _native.why_unavailable() is not None:
        pytest.skip(f"native kernel unavailable: {_native.why_unavailable()}")
    tensor, _ = _panel(n_tasks=200, n_workers=9, n_classes=3, seed=11, with_gold=False)
    kw = {"layout": "dense", "max_iter": 30}
    fast = METHODS[name](**kw).fit(tensor)
    with _core.use_fast(False):
        ref = METHODS[name](**kw).fit(tensor)
    assert fast.native_used_ and not ref.native_used_
    assert fast.n_iter_ == ref.n_iter_
    np.testing.assert_allclose(fast.probas_, ref.probas_, atol=1e-5)
    np.testing.assert_array_equal(fast.label_codes_, ref.label_codes_)
