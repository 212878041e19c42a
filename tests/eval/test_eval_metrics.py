"""Metrics and agreement: equal to scikit-learn on random inputs, Krippendorff's alpha equal to the
published worked example and to the `krippendorff` package, Fleiss' kappa on Fleiss' example."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import (cohen_kappa_score, confusion_matrix as sk_confusion, f1_score,
                             precision_recall_fscore_support)

from crowdllm.eval import agreement, metrics
from crowdllm.labels import LabelTensor


@st.composite
def label_pairs(draw):
    k = draw(st.integers(1, 6))
    n = draw(st.integers(1, 60))
    t = draw(st.lists(st.integers(0, k - 1), min_size=n, max_size=n))
    p = draw(st.lists(st.integers(0, k - 1), min_size=n, max_size=n))
    return np.array(t), np.array(p), k


@pytest.mark.filterwarnings("ignore:A single label was found")
@settings(max_examples=150, deadline=None)
@given(label_pairs())
def test_prf_equals_sklearn(data):
    t, p, k = data
    labels = list(range(k))
    ours = metrics.precision_recall_f1(t, p, k)
    sp, sr, sf, ss = precision_recall_fscore_support(t, p, labels=labels, zero_division=0)
    np.testing.assert_allclose(ours.precision, sp, atol=1e-12)
    np.testing.assert_allclose(ours.recall, sr, atol=1e-12)
    np.testing.assert_allclose(ours.f1, sf, atol=1e-12)
    np.testing.assert_array_equal(ours.support, ss)
    assert metrics.macro_f1(t, p, k) == pytest.approx(
        f1_score(t, p, labels=labels, average="macro", zero_division=0), abs=1e-12)
    assert metrics.weighted_f1(t, p, k) == pytest.approx(
        f1_score(t, p, labels=labels, average="weighted", zero_division=0), abs=1e-12)
    np.testing.assert_array_equal(metrics.confusion_matrix(t, p, k), sk_confusion(t, p, labels=labels))
    assert metrics.accuracy(t, p) == pytest.approx(float((t == p).mean()))
    s = metrics.classification_summary(t, p, [f"c{i}" for i in range(k)])
    assert s["macro_f1"] == pytest.approx(metrics.macro_f1(t, p, k))
    assert s["f1"] == {f"c{i}": pytest.approx(v) for i, v in enumerate(sf)}


@settings(max_examples=150, deadline=None)
@given(label_pairs())
def test_cohen_kappa_equals_sklearn(data):
    a, b, k = data
    with np.errstate(all="ignore"):
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref = cohen_kappa_score(a, b, labels=list(range(k)))
    ours = agreement.cohen_kappa(a, b, k)
    if np.isnan(ref):
        assert ours is None  # undefined: never NaN
    else:
        assert ours == pytest.approx(ref, abs=1e-10)


def test_negative_codes_are_dropped_and_empty_is_safe():
    t = np.array([0, 1, -1, 2])
    p = np.array([0, -1, 1, 2])
    assert metrics.accuracy(t, p) == 1.0
    assert metrics.confusion_matrix(t, p, 3).sum() == 2
    assert metrics.accuracy([], []) == 0.0
    assert agreement.cohen_kappa([], []) is None
    with pytest.raises(ValueError, match="out of range"):
        metrics.confusion_matrix([0, 3], [0, 1], 2)


def test_pairwise_kappa_matches_sklearn_on_shared_tasks():
    rng = np.random.default_rng(1)
    dense = rng.integers(-1, 3, size=(40, 4))
    t = LabelTensor.from_dense(dense, classes=["a", "b", "c"])
    pairs = agreement.pairwise_kappa(t)
    assert len(pairs) == 6
    for r in pairs:
        i, j = int(r["a"]), int(r["b"])
        both = (dense[:, i] >= 0) & (dense[:, j] >= 0)
        assert r["n"] == both.sum()
        assert r["kappa"] == pytest.approx(cohen_kappa_score(dense[both, i], dense[both, j]))
    m = agreement.kappa_matrix(pairs, [0, 1, 2, 3])
    assert m[0, 0] == 1.0 and m[1, 2] == pytest.approx(m[2, 1])
    # restricted to some tasks
    mask = np.arange(40) < 20
    sub = agreement.pairwise_kappa(t, tasks=mask, workers=[0, 1])
    both = mask & (dense[:, 0] >= 0) & (dense[:, 1] >= 0)
    assert sub[0]["kappa"] == pytest.approx(cohen_kappa_score(dense[both, 0], dense[both, 1]))


def test_fleiss_kappa_on_fleiss_worked_example():
    # the 10 subjects x 5 categories, 14 raters example (Fleiss 1971 as reproduced widely): 0.210
    counts = np.array([[0, 0, 0, 0, 14], [0, 2, 6, 4, 2], [0, 0, 3, 5, 6], [0, 3, 9, 2, 0],
                       [2, 2, 8, 1, 1], [7, 7, 0, 0, 0], [3, 2, 6, 3, 0], [2, 5, 3, 2, 2],
                       [6, 5, 2, 1, 0], [0, 2, 2, 3, 7]])
    assert agreement.fleiss_kappa(counts) == pytest.approx(0.20993, abs=5e-5)
    assert agreement.fleiss_kappa(np.array([[3, 0], [3, 0]])) is None  # no variation: undefined


@settings(max_examples=60, deadline=None)
@given(st.integers(2, 4), st.integers(2, 30), st.integers(0, 10_000))
def test_fleiss_two_raters_is_scotts_pi(k, n, seed):
    rng = np.random.default_rng(seed)
    a, b = rng.integers(0, k, n), rng.integers(0, k, n)
    counts = np.zeros((n, k))
    np.add.at(counts, (np.arange(n), a), 1)
    np.add.at(counts, (np.arange(n), b), 1)
    po = (a == b).mean()
    pk = counts.sum(0) / (2 * n)
    pe = (pk ** 2).sum()
    ours = agreement.fleiss_kappa(counts)
    if pe >= 1 - 1e-15:
        assert ours is None
    else:
        assert ours == pytest.approx((po - pe) / (1 - pe), abs=1e-10)


# Krippendorff (2011), "Computing Krippendorff's alpha-reliability", the worked example with
# 4 observers, 12 units and missing values (also the `krippendorff` package's documented example).
NAN = np.nan
K_DATA = np.array([
    [1, 2, 3, 3, 2, 1, 4, 1, 2, NAN, NAN, NAN],
    [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, NAN, 3],
    [NAN, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, NAN],
    [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, NAN],
])
K_PUBLISHED = {"nominal": 0.743, "ordinal": 0.815, "interval": 0.849, "ratio": 0.797}


def _counts(data: np.ndarray, values: list[float]) -> np.ndarray:
    return np.array([[np.sum(data[:, u] == v) for v in values] for u in range(data.shape[1])])


@pytest.mark.parametrize("metric", list(K_PUBLISHED))
def test_krippendorff_published_example(metric):
    import krippendorff

    values = [1.0, 2.0, 3.0, 4.0, 5.0]
    ours = agreement.krippendorff_alpha(_counts(K_DATA, values), metric, values=values)
    assert round(ours, 3) == K_PUBLISHED[metric]
    assert ours == pytest.approx(krippendorff.alpha(reliability_data=K_DATA,
                                                    level_of_measurement=metric), abs=1e-10)


@settings(max_examples=80, deadline=None)
@given(st.integers(2, 5), st.integers(2, 6), st.integers(2, 25), st.integers(0, 10_000),
       st.sampled_from(["nominal", "ordinal", "interval"]))
def test_krippendorff_equals_reference_package_on_random_data(k, coders, units, seed, metric):
    import krippendorff

    rng = np.random.default_rng(seed)
    data = rng.integers(0, k, size=(coders, units)).astype(float)
    data[rng.random(data.shape) < 0.3] = np.nan
    values = [float(v) for v in range(k)]
    counts = _counts(data, values)
    ours = agreement.krippendorff_alpha(counts, metric, values=values)
    pairable = (counts.sum(1) >= 2)
    present = counts[pairable].sum(0) > 0
    if ours is None:
        # undefined: fewer than two pairable values or a single value overall
        assert pairable.sum() == 0 or present.sum() <= 1
        return
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = krippendorff.alpha(reliability_data=data, level_of_measurement=metric,
                                 value_domain=values)
    assert ours == pytest.approx(ref, abs=1e-9)


def test_alpha_from_tensor_counts_every_answer():
    t = LabelTensor.from_dense(np.array([[0, 0, 1], [1, 1, 1], [0, 1, -1], [2, 2, 2]]),
                               classes=["x", "y", "z"])
    counts = agreement.label_counts(t)
    np.testing.assert_array_equal(counts, [[2, 1, 0], [0, 3, 0], [1, 1, 0], [0, 0, 3]])
    assert agreement.krippendorff_alpha(t) == agreement.krippendorff_alpha(counts)
    with pytest.raises(ValueError, match="numeric classes"):
        agreement.krippendorff_alpha(t, "interval")
