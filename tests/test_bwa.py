"""BWA: the log joint never decreases, gold is clamped, posteriors are distributions."""

from __future__ import annotations

import numpy as np
import pytest

from crowdllm.aggregation import BWA
from test_ibcc import panel


@pytest.mark.parametrize("layout", ["coo", "dense"])
def test_objective_never_decreases(layout):
    tensor, z = panel(4, n_tasks=200, n_workers=9)
    model = BWA(dtype="float64", tol=1e-12, max_iter=100, layout=layout).fit(tensor)
    h = np.asarray(model.loss_history_)
    assert len(h) > 3
    assert np.all(np.diff(h) >= -1e-10), np.diff(h).min()
    assert (model.label_codes_ == z).mean() > 0.85
    np.testing.assert_allclose(model.probas_.sum(axis=1), 1.0, atol=1e-9)
    assert np.all(model.precision_ > 0)


def test_gold_is_clamped_and_layouts_agree():
    tensor, z = panel(5)
    gold = {i: int((z[i] + 1) % 3) for i in range(10)}
    a = BWA(layout="coo", dtype="float64").fit(tensor, gold=gold)
    b = BWA(layout="dense", dtype="float64").fit(tensor, gold=gold)
    np.testing.assert_allclose(a.probas_, b.probas_, atol=1e-8)
    for t, g in gold.items():
        assert a.probas_[t, g] == pytest.approx(1.0)
