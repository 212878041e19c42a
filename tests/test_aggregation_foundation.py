"""MV, Wawa, ZBS, Dawid-Skene and one-coin DS: known answers, recovery, monotone EM, jit, layouts, edges."""

from __future__ import annotations

import dataclasses
import warnings

import jax
import numpy as np
import pytest

from crowdllm.aggregation import (METHODS, ConvergenceWarning, DawidSkene, MajorityVote,
                                  OneCoinDawidSkene, Wawa, ZeroBasedSkill, dawid_skene, get_method)
from crowdllm.aggregation._core import bucket, prepare
from crowdllm.labels import LabelTensor

FOUNDATION = [MajorityVote, Wawa, ZeroBasedSkill, DawidSkene, OneCoinDawidSkene]


def sample_ds(n_tasks=1500, n_workers=8, n_classes=3, seed=0, p_answer=1.0):
    """Data drawn from the Dawid-Skene generative story; returns (tensor, truth, confusions, prior)."""
    rng = np.random.default_rng(seed)
    prior = rng.dirichlet(np.full(n_classes, 5.0))
    conf = np.empty((n_workers, n_classes, n_classes))
    for w in range(n_workers):
        for k in range(n_classes):
            alpha = np.full(n_classes, 1.0)
            alpha[k] = rng.uniform(4, 12)
            conf[w, k] = rng.dirichlet(alpha)
    z = rng.choice(n_classes, size=n_tasks, p=prior)
    dense = np.full((n_tasks, n_workers), -1)
    for w in range(n_workers):
        ans = (rng.random((n_tasks, 1)) > conf[w, z].cumsum(1)).sum(1)
        keep = rng.random(n_tasks) < p_answer
        dense[keep, w] = ans[keep]
    return LabelTensor.from_dense(dense, classes=list(range(n_classes))), z, conf, prior


# ------------------------------------------------------------------------- known answers

def test_majority_vote_known_answer_and_tie_policies():
    t = LabelTensor.from_arrays(
        ["a", "a", "a", "b", "b", "c"], ["1", "2", "3", "1", "2", "1"], ["x", "x", "y", "x", "y", "y"])
    lowest = MajorityVote(ties="lowest").fit(t)
    assert lowest.labels_.tolist() == ["x", "x", "y"]  # b ties x/y -> lowest code 'x'
    np.testing.assert_allclose(lowest.probas_, [[2 / 3, 1 / 3], [0.5, 0.5], [0, 1]])
    picks = {MajorityVote(ties="random", seed=s).fit(t).labels_[1] for s in range(20)}
    assert picks == {"x", "y"}  # a random tie-break really is random across seeds
    again = MajorityVote(ties="random", seed=3).fit(t).labels_
    assert MajorityVote(ties="random", seed=3).fit(t).labels_.tolist() == again.tolist()
    assert lowest.n_ties_ == 1


def test_tie_count_is_the_tasks_with_more_than_one_top_class():
    """``n_ties_`` against NumPy on the votes, on a crowd padded past its tasks (padding rows,
    all zeros, would each count as a tie)."""
    rng = np.random.default_rng(3)
    n = 1000
    task = np.repeat(np.arange(n), 4)
    t = LabelTensor.from_arrays(task, rng.integers(0, 9, task.size), rng.integers(0, 3, task.size))
    mv = MajorityVote().fit(t)
    assert bucket(n) > n
    votes = mv.votes_
    ref = int(((votes == votes.max(1, keepdims=True)).sum(1) > 1).sum())
    assert 100 < ref < n and mv.n_ties_ == ref


def test_random_ties_are_uniform_over_the_tied_classes_and_independent_between_keys():
    """The tie-break noise (a counter hash, ``hash_uniform``): over 200,000 tasks each with the
    same 2-, 3- or 4-way tie, every tied class wins its share within 4 sd, an untied one never;
    two keys' choices agree as often as independent draws do."""
    import jax.numpy as jnp

    from crowdllm.aggregation._core import argmax_ties

    n = 200_000
    for K, tied in [(5, 2), (5, 3), (4, 4)]:
        scores = jnp.zeros((n, K)).at[:, tied:].set(-1.0)
        a = np.asarray(argmax_ties(scores, True, jax.random.key(0)))
        b = np.asarray(argmax_ties(scores, True, jax.random.key(1)))
        share = np.bincount(a, minlength=K) / n
        sd = np.sqrt((1 / tied) * (1 - 1 / tied) / n)
        np.testing.assert_array_less(np.abs(share[:tied] - 1 / tied), 4 * sd)
        assert share[tied:].sum() == 0
        assert abs((a == b).mean() - 1 / tied) < 4 * np.sqrt((1 / tied) * (1 - 1 / tied) / n)


def test_tie_breaking_does_not_depend_on_row_order():
    rows = [("a", "1", "x"), ("a", "2", "y"), ("b", "1", "y"), ("b", "2", "x"), ("c", "1", "x")]
    t1 = LabelTensor.from_arrays(*zip(*rows))
    t2 = LabelTensor.from_arrays(*zip(*rows[::-1]))
    for seed in range(5):
        l1 = dict(zip(t1.task_ids, MajorityVote(seed=seed).fit(t1).labels_))
        l2 = dict(zip(t2.task_ids, MajorityVote(seed=seed).fit(t2).labels_))
        assert l1 == l2 or t1.task_ids.tolist() != t2.task_ids.tolist()
    # same task order, shuffled answers within tasks: identical results
    t3 = LabelTensor.from_arrays(*zip(*[rows[1], rows[0], rows[3], rows[2], rows[4]]))
    assert MajorityVote(seed=1).fit(t1).labels_.tolist() == MajorityVote(seed=1).fit(t3).labels_.tolist()


def test_wawa_weights_reliable_workers():
    # workers 1-2 agree with the majority on t0..t5; worker 3 disagrees there; on u, workers 3 and
    # 4 tie and 'lowest' makes the MV label 'n', so worker 3 agrees once (1/7), worker 4 never.
    rows = []
    for i in range(6):
        rows += [(f"t{i}", "1", "p"), (f"t{i}", "2", "p"), (f"t{i}", "3", "n")]
    rows += [("u", "3", "n"), ("u", "4", "p"), ("v", "1", "n"), ("v", "3", "p"), ("v", "4", "p")]
    t = LabelTensor.from_arrays(*zip(*rows))
    w = Wawa(ties="lowest").fit(t)
    skills = dict(zip(w.workers_, w.skills_))
    # v: MV says p (3 and 4 outvote 1), so worker 1 hits 6/7, worker 2 6/6, 3 hits u and v: 2/8,
    # worker 4 hits v only: 1/2
    np.testing.assert_allclose([skills[k] for k in "1234"], [6 / 7, 1.0, 2 / 8, 1 / 2], rtol=1e-6)
    # the weighted vote on v: worker 1 (6/7) says n, workers 3 + 4 (1/4 + 1/2) say p -> n
    assert dict(zip(w.tasks_, w.labels_))["v"] == "n"
    np.testing.assert_allclose(w.probas_[-1], [6 / 7, 0.75] / np.sum([6 / 7, 0.75]), rtol=1e-6)


def test_dawid_skene_tiny_known_answer():
    # two reliable workers and one who always says the opposite: DS learns to flip worker 3
    rows = []
    for i in range(40):
        truth = "p" if i % 3 else "n"
        other = "n" if truth == "p" else "p"
        rows += [(i, "good1", truth), (i, "good2", truth if i % 10 else other), (i, "liar", other)]
    t = LabelTensor.from_arrays(*zip(*rows))
    ds = DawidSkene().fit(t)
    truth = np.array(["p" if i % 3 else "n" for i in range(40)])
    assert (ds.labels_ == truth).all()
    liar = list(ds.workers_).index("liar")
    assert ds.errors_[liar, 0, 1] > 0.9 and ds.errors_[liar, 1, 0] > 0.9  # always flips
    np.testing.assert_allclose(ds.errors_.sum(axis=2), 1.0, atol=1e-5)


# ------------------------------------------------------------------------- model recovery

def test_dawid_skene_recovers_confusion_matrices():
    t, z, conf, prior = sample_ds(n_tasks=4000, n_workers=8, n_classes=3, seed=1)
    ds = DawidSkene(max_iter=200, tol=1e-7).fit(t)
    # tolerance: with 4000 tasks each confusion row is estimated from ~1300 answers, so the
    # sampling error of an entry is about sqrt(p(1-p)/1300) <= 0.014; allow 0.05.
    assert np.abs(ds.errors_ - conf).max() < 0.05
    assert np.abs(ds.priors_ - prior).max() < 0.03
    assert (ds.label_codes_ == z).mean() > 0.95


def test_one_coin_recovers_skills():
    rng = np.random.default_rng(5)
    n_t, n_w, K = 3000, 6, 4
    skills = rng.uniform(0.45, 0.9, n_w)
    z = rng.integers(0, K, n_t)
    dense = np.empty((n_t, n_w), int)
    for w in range(n_w):
        right = rng.random(n_t) < skills[w]
        wrong = (z + rng.integers(1, K, n_t)) % K
        dense[:, w] = np.where(right, z, wrong)
    t = LabelTensor.from_dense(dense)
    oc = OneCoinDawidSkene(max_iter=200, tol=1e-8).fit(t)
    assert np.abs(oc.skills_ - skills).max() < 0.03  # ~sqrt(.25/3000)=0.009 sampling error


# ------------------------------------------------------------------------- EM properties

@pytest.mark.parametrize("cls", [DawidSkene, OneCoinDawidSkene])
@pytest.mark.parametrize("smoothing", [0.0, 0.01, 1.0])
def test_objective_never_decreases(cls, smoothing):
    t, z, *_ = sample_ds(n_tasks=300, n_workers=5, n_classes=3, seed=2, p_answer=0.6)
    gold = {t.task_ids[i]: int(z[i]) for i in range(0, 300, 10)}
    for g in (None, gold):
        m = cls(max_iter=60, tol=-1.0, smoothing=smoothing, dtype="float64")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            m.fit(t, gold=g)
        h = np.asarray(m.loss_history_)
        assert len(h) == 60 and np.isfinite(h).all()
        assert (np.diff(h) >= -1e-9 * np.abs(h[1:])).all(), np.diff(h).min()


@pytest.mark.parametrize("cls", FOUNDATION)
def test_jit_and_no_jit_agree(cls):
    t, *_ = sample_ds(n_tasks=60, n_workers=4, n_classes=3, seed=3, p_answer=0.8)
    kw = {"max_iter": 8} if cls.iterative else {}
    a = cls(**kw).fit(t)
    with jax.disable_jit():
        b = cls(**kw).fit(t)
    np.testing.assert_allclose(a.probas_, b.probas_, atol=1e-5)
    assert a.labels_.tolist() == b.labels_.tolist()


@pytest.mark.parametrize("cls", FOUNDATION)
def test_coo_and_dense_layouts_agree(cls):
    """The two layouts give the same fit, and so does the panel padded with a wider panel's
    annotators (shared_shapes: the padded workers are masked, and cut from the results)."""
    from crowdllm.aggregation import shared_shapes

    t, *_ = sample_ds(n_tasks=500, n_workers=7, n_classes=4, seed=4, p_answer=0.9)
    a = cls(layout="coo").fit(t)
    b = cls(layout="dense").fit(t)
    wider = sample_ds(n_tasks=300, n_workers=11, n_classes=4, seed=9)[0]
    with shared_shapes([t, wider]):
        assert prepare(t, layout="dense").labels.shape == (bucket(500), 11)
        c = cls(layout="dense").fit(t)
    for other in (b, c):
        np.testing.assert_allclose(a.probas_, other.probas_, atol=2e-5)
        assert (a.labels_ == other.labels_).mean() == 1.0
        if hasattr(a, "skills_"):
            np.testing.assert_allclose(a.skills_, other.skills_, atol=2e-5)


def test_second_call_with_same_bucket_does_not_recompile():
    t1, *_ = sample_ds(n_tasks=1000, n_workers=6, n_classes=3, seed=5, p_answer=0.5)
    t2, *_ = sample_ds(n_tasks=990, n_workers=6, n_classes=3, seed=6, p_answer=0.5)
    assert bucket(t1.n_answers) == bucket(t2.n_answers) and bucket(1000) == bucket(990)
    DawidSkene(max_iter=5, layout="coo").fit(t1)
    before = dawid_skene.fit._cache_size()
    DawidSkene(max_iter=5, layout="coo").fit(t2)
    assert dawid_skene.fit._cache_size() == before


def test_float64_on_request():
    t, *_ = sample_ds(n_tasks=100, n_workers=4, n_classes=2, seed=7)
    a = DawidSkene(dtype="float64").fit(t)
    b = DawidSkene(dtype="float32").fit(t)
    np.testing.assert_allclose(a.probas_, b.probas_, atol=1e-4)


# ------------------------------------------------------------------------- gold

def test_gold_is_clamped_and_initialises_quality():
    t, z, conf, _ = sample_ds(n_tasks=400, n_workers=6, n_classes=3, seed=8, p_answer=0.7)
    gold_idx = np.arange(0, 400, 4)
    gold = {t.task_ids[i]: int(z[i]) for i in gold_idx}
    ds = DawidSkene(init="gold").fit(t, gold=gold)
    np.testing.assert_array_equal(ds.label_codes_[gold_idx], z[gold_idx])
    np.testing.assert_allclose(ds.probas_[gold_idx].max(axis=1), 1.0)
    plain = DawidSkene().fit(t)
    rest = np.setdiff1d(np.arange(400), gold_idx)
    assert (ds.label_codes_[rest] == z[rest]).mean() >= (plain.label_codes_[rest] == z[rest]).mean() - 0.01
    # init from gold alone (first iteration): the confusion matrices start near the truth
    data = prepare(t.with_gold(gold), gold=t.with_gold(gold).gold)
    state = dawid_skene.init(data, smoothing=0.01, init_from_gold=True)
    start = np.exp(np.asarray(state.log_conf))[: t.n_workers]
    assert np.abs(start - conf).mean() < 0.1
    with pytest.raises(ValueError, match="init='gold' needs gold"):
        DawidSkene(init="gold").fit(t)
    with pytest.raises(ValueError, match="does not use gold"):
        MajorityVote().fit(t, gold=gold)


# ------------------------------------------------------------------------- edge cases

@pytest.mark.parametrize("cls", FOUNDATION)
def test_one_task(cls):
    t = LabelTensor.from_arrays(["only"] * 3, ["a", "b", "c"], ["x", "x", "y"])
    m = cls().fit(t)
    assert m.labels_.tolist() == ["x"] and np.isfinite(m.probas_).all()
    np.testing.assert_allclose(m.probas_.sum(1), 1, atol=1e-6)


@pytest.mark.parametrize("cls", FOUNDATION)
def test_annotator_without_answers_and_class_nobody_chose(cls):
    t, *_ = sample_ds(n_tasks=50, n_workers=3, n_classes=2, seed=9)
    t = dataclasses.replace(t, worker_ids=np.array([0, 1, 2, "ghost"], dtype=object),
                            classes=np.array([0, 1, "never"], dtype=object))
    m = cls().fit(t)
    assert m.probas_.shape == (50, 3) and np.isfinite(m.probas_).all()
    assert (m.label_codes_ != 2).all()
    if hasattr(m, "skills_"):
        assert len(m.skills_) == 4 and np.isfinite(m.skills_).all()


@pytest.mark.parametrize("cls", FOUNDATION)
def test_duplicated_answers_count(cls):
    base = [("a", "1", "x"), ("a", "2", "y"), ("b", "1", "y"), ("b", "2", "y")]
    t = LabelTensor.from_arrays(*zip(*(base + [("a", "2", "y"), ("a", "2", "y")])))
    assert t.n_duplicates == 2
    m = cls().fit(t)  # worker 2's repeated 'y' outvotes worker 1's single 'x'
    assert m.labels_.tolist()[0] == "y"


def test_unknown_gold_label_adds_a_class_and_still_fits():
    t = LabelTensor.from_arrays(["a", "a", "b"], ["1", "2", "1"], ["x", "x", "y"])
    with pytest.warns(UserWarning, match="nobody chose"):
        ds = DawidSkene().fit(t, gold={"b": "z"})
    assert ds.classes_.tolist() == ["x", "y", "z"]
    assert ds.labels_.tolist() == ["x", "z"]
    assert np.isfinite(ds.probas_).all()


def test_empty_input_is_an_error():
    import pyarrow as pa

    from crowdllm.labels import CrowdDataError
    with pytest.raises(CrowdDataError, match="no answers"):
        DawidSkene().fit(pa.table({"task": pa.array([], pa.string()), "worker": pa.array([], pa.string()),
                                   "label": pa.array([], pa.string())}))


def test_non_convergence_warns():
    t, *_ = sample_ds(n_tasks=200, n_workers=4, n_classes=3, seed=10, p_answer=0.7)
    with pytest.warns(ConvergenceWarning, match="did not converge in 2 iterations"):
        m = DawidSkene(max_iter=2, tol=1e-12).fit(t)
    assert m.n_iter_ == 2 and not m.converged_


def test_pandas_in_pandas_out():
    import pandas as pd
    df = pd.DataFrame({"task": [1, 1, 2], "worker": ["a", "b", "a"], "label": [0, 0, 1]})
    s = DawidSkene().fit_predict(df)
    assert isinstance(s, pd.Series) and s.loc[1] == 0 and s.loc[2] == 1
    p = DawidSkene().fit_predict_proba(df)
    assert list(p.columns) == [0, 1] and p.shape == (2, 2)


@pytest.mark.parametrize("task_ids, classes", [([10, 3, 7], ["no", "yes"]), (["b", "a", "c"], [2, 5])])
def test_result_table_holds_each_task_its_label_and_probabilities(task_ids, classes):
    """The table `crowdllm aggregate` writes: one row a task in the tensor's order, the
    predicted class value, and a probability column per class, with the ids' and classes' types."""
    import pyarrow as pa

    rows = [(0, 0, 1), (0, 1, 1), (1, 0, 0), (1, 1, 0), (2, 0, 1), (2, 1, 0), (2, 2, 1)]
    t = LabelTensor(task=np.array([r[0] for r in rows], np.int32),
                    worker=np.array([r[1] for r in rows], np.int32),
                    label=np.array([r[2] for r in rows], np.int32),
                    task_ids=np.array(task_ids, dtype=object), worker_ids=np.array([0, 1, 2], dtype=object),
                    classes=np.array(classes, dtype=object))
    m = MajorityVote().fit(t)
    tab = m.result_table()
    assert tab.column_names == ["task", "label"] + [f"p_{c}" for c in classes]
    assert tab.column("task").to_pylist() == task_ids
    assert tab.column("label").to_pylist() == [classes[1], classes[0], classes[1]]
    assert tab.column("label").type == (pa.string() if isinstance(classes[0], str) else pa.int64())
    np.testing.assert_allclose(np.stack([tab.column(f"p_{c}").to_numpy() for c in classes], 1),
                               m.probas_)
    assert tab.column("p_" + str(classes[1])).to_pylist() == [1.0, 0.0, pytest.approx(2 / 3)]


def test_registry_and_get_method():
    assert {"mv", "wawa", "zbs", "ds", "onecoin-ds"} <= set(METHODS)
    m = get_method("ds", seed=1, max_iter=7, tol=None)
    assert isinstance(m, DawidSkene) and m.max_iter == 7
    with pytest.raises(ValueError, match="unknown method"):
        get_method("nope")


def test_shared_shapes_compile_once_for_a_collection_with_the_same_results():
    """Inside shared_shapes, crowds with one class count are padded to one shape: Dawid-Skene
    (COO, XLA) compiles once for three binary datasets of different sizes, and every fit equals
    the fit outside the block (labels exactly, posteriors to float rounding); MACE's random
    starts give the same labels too, and where its sweeps run native, their rows share one
    width: one program for the three."""
    from conftest import DATA
    from crowdllm.aggregation import MACE, _native, shared_shapes
    from crowdllm.aggregation import dawid_skene as ds_kernel
    from crowdllm.labels import read_answers

    names = ["zencrowd_in", "sentiment_polarity_sp_amt", "snow_rte"]
    tensors = [read_answers(DATA / n / "answers.csv") for n in names]
    assert len({(t.n_tasks, t.n_workers, t.n_answers) for t in tensors}) == 3
    assert {t.n_classes for t in tensors} == {2}

    def fits():
        ds = [DawidSkene(layout="coo", native="off", tol=-1.0, max_iter=7).fit(t) for t in tensors]
        mace = [MACE(n_restarts=2, max_iter=10).fit(t) for t in tensors]
        return ds, mace

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        plain_ds, plain_mace = fits()
        with shared_shapes(tensors) as floors:
            shapes = {(d.task.shape, d.task_mask.shape, d.worker_mask.shape)
                      for d in (prepare(t, layout="coo") for t in tensors)}
            before = ds_kernel.fit._cache_size(), _native.mace_fit_restarts._cache_size()
            shared_ds, shared_mace = fits()
            compiled = ds_kernel.fit._cache_size() - before[0]
            compiled_mace = _native.mace_fit_restarts._cache_size() - before[1]
    assert len(shapes) == 1 and floors[(2, "coo")] == [(
        max(bucket(t.n_tasks) for t in tensors), max(bucket(t.n_workers) for t in tensors),
        max(bucket(t.n_answers) for t in tensors), 24)]  # rows of 11, 21, 21 slots: 24
    assert compiled <= 1  # one program for the three (none if an earlier test compiled it)
    assert compiled_mace <= 1 and shared_mace[0].native_used_ == _native.available()
    for a, b in zip(plain_ds, shared_ds):
        np.testing.assert_array_equal(a.label_codes_, b.label_codes_)
        np.testing.assert_allclose(a.probas_, b.probas_, atol=1e-5)
        np.testing.assert_allclose(a.errors_, b.errors_, atol=1e-5)
    for a, b in zip(plain_mace, shared_mace):
        np.testing.assert_array_equal(a.label_codes_, b.label_codes_)
    # outside the block, prepare pads to the crowd's own bucket again
    t = tensors[0]
    assert prepare(t, layout="coo").task.shape == (bucket(t.n_answers),)


def test_shared_shapes_pads_panels_within_the_limit_and_never_shrinks():
    """Dense panels share the task axis and the worker axis (a panel's own worker axis is
    exact); a crowd larger than the collection's shapes keeps its own bucket; other class counts
    are untouched; no crowd is padded past max_pad times its own size (cells on a panel, answers
    on COO: sizes 44x apart make two groups by default)."""
    from crowdllm.aggregation import shared_shapes

    small = sample_ds(n_tasks=100, n_workers=4, n_classes=3, seed=1)[0]
    big = sample_ds(n_tasks=3000, n_workers=6, n_classes=3, seed=2)[0]
    other = sample_ds(n_tasks=50, n_workers=4, n_classes=4, seed=3)[0]
    with shared_shapes([small]):
        assert prepare(big, layout="dense").labels.shape == (bucket(3000), 6)
    with shared_shapes([small, big]) as floors:  # 3072 x 6 / 104 x 4 cells: over the default 4x
        assert len(floors[(3, "dense")]) == 2
        assert prepare(small, layout="dense").labels.shape == (bucket(100), 4)
    with shared_shapes([small, big], max_pad=64):
        d = prepare(small, layout="dense")
        assert d.labels.shape == (bucket(3000), 6)
        assert float(d.task_mask.sum()) == 100 and d.worker_mask.tolist() == [1] * 4 + [0] * 2
        assert (np.asarray(d.labels)[:, 4:] == -1).all()
        c = prepare(small, layout="coo")
        assert c.task.shape == (bucket(big.n_answers),) and float(c.weight.sum()) == small.n_answers
        assert c.worker_mask.shape == (bucket(6),) and float(c.worker_mask.sum()) == 4
        assert prepare(other, layout="coo").task.shape == (bucket(other.n_answers),)
        assert prepare(small, layout="coo", pad=False).task.shape == (small.n_answers,)
    # a group's shape is within max_pad of each of its crowds: 100 x 12 and 25 x 48 panels have
    # 1,200 cells each, but one shape for both would have 4,800
    tall = sample_ds(n_tasks=100, n_workers=12, n_classes=3, seed=4)[0]
    wide = sample_ds(n_tasks=25, n_workers=48, n_classes=3, seed=5)[0]
    with shared_shapes([tall, wide], max_pad=3.9) as floors:
        assert sorted(floors[(3, "dense")]) == [(bucket(25), 48, 0, 0), (bucket(100), 12, 0, 0)]
    with shared_shapes([tall, wide], max_pad=4) as floors:
        assert floors[(3, "dense")] == [(bucket(100), 48, 0, 0)]
    with pytest.raises(ValueError, match="max_pad"):
        with shared_shapes([small], max_pad=0.5):
            pass
