"""Parity with crowd-kit 1.4.2 (the test oracle) on every real dataset in ../shared/data.

* Dawid-Skene and one-coin DS with ``smoothing=0`` run to the same number of EM iterations as
  crowd-kit give the same posteriors (to 1e-4; crowd-kit floors probabilities at 1e-10) and the
  same labels on >= 99.5 % of tasks. crowd-kit runs live here (DS on all datasets, one-coin on a
  few: its pandas row-wise M-step takes minutes on the large ones).
* Majority vote: our expected accuracy under uniformly random tie-breaking equals the figure each
  dataset's SOURCE.md reports (crowd-kit's own MV breaks ties by pandas column order).
* Wawa, ZBS and one-coin DS: accuracy on gold tasks against crowd-kit's figures recorded by
  ``benchmarks/record_crowdkit_foundation.py`` (crowd-kit's ZBS takes ~40 s on one dataset).
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from crowdllm import DawidSkene, MajorityVote, OneCoinDawidSkene, Wawa, ZeroBasedSkill, read_answers

from conftest import DATA, datasets_with_answers

# every real dataset padded to one shape per class count: a method compiles once per class
# count, not once per dataset (conftest.py)
pytestmark = pytest.mark.usefixtures("one_shape_per_class_count")

REFERENCE = json.loads((Path(__file__).parent / "reference" / "crowdkit_foundation.json").read_text())
DATASETS = datasets_with_answers()


def test_all_datasets_are_present_and_recorded():
    assert len(DATASETS) >= 21
    assert set(DATASETS) == set(REFERENCE["accuracy"])


def _load(name):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return read_answers(DATA / name / "answers.csv", gold=DATA / name / "gold.csv")


def _crowdkit_probas(ck, tensor):
    return ck.probas_.loc[list(tensor.task_ids), list(tensor.classes)].to_numpy()


@pytest.mark.parametrize("name", DATASETS)
def test_dawid_skene_matches_crowdkit(name):
    from crowdkit.aggregation import DawidSkene as CK

    t = _load(name)
    df = pd.read_csv(DATA / name / "answers.csv", dtype=str)
    n_iter = 20
    ck = CK(n_iter=n_iter, tol=-1.0).fit(df)  # tol < 0: run all n_iter iterations
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = DawidSkene(max_iter=n_iter, tol=-1.0, smoothing=0.0, dtype="float64").fit(t)
    assert len(ck.loss_history_) == ours.n_iter_ == n_iter
    p = _crowdkit_probas(ck, t)
    assert np.abs(p - ours.probas_).max() < 1e-4
    assert (p.argmax(1) == ours.probas_.argmax(1)).mean() >= 0.995


@pytest.mark.parametrize("name", ["bluebird", "dog", "ws_cf", "zencrowd_all"])
def test_one_coin_matches_crowdkit(name):
    from crowdkit.aggregation import OneCoinDawidSkene as CK

    t = _load(name)
    df = pd.read_csv(DATA / name / "answers.csv", dtype=str)
    ck = CK(n_iter=10, tol=-1.0).fit(df)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = OneCoinDawidSkene(max_iter=10, tol=-1.0, smoothing=0.0, dtype="float64").fit(t)
    p = _crowdkit_probas(ck, t)
    assert np.abs(p - ours.probas_).max() < 1e-4
    assert (p.argmax(1) == ours.probas_.argmax(1)).mean() >= 0.995


def _source_mv(name):
    text = (DATA / name / "SOURCE.md").read_text()
    m = re.search(r"Majority vote accuracy on the [\d,]+ gold tasks: \*\*([\d.]+)\*\*", text)
    assert m, f"{name}/SOURCE.md has no MV figure"
    return float(m.group(1))


@pytest.mark.parametrize("name", DATASETS)
def test_majority_vote_expected_accuracy_equals_source(name):
    t = _load(name)
    mv = MajorityVote().fit(t)
    gold = t.gold >= 0
    votes = mv.votes_[gold]
    is_max = votes == votes.max(axis=1, keepdims=True)
    expected = (is_max[np.arange(len(votes)), t.gold[gold]] / is_max.sum(axis=1)).mean()
    assert expected == pytest.approx(_source_mv(name), abs=5e-5)
    # the realised accuracy under 'random' ties is one draw around that expectation
    realised = (mv.label_codes_[gold] == t.gold[gold]).mean()
    assert abs(realised - expected) <= mv.n_ties_ / gold.sum() + 1e-12


def _accuracy(model, t):
    g = t.gold >= 0
    return float((model.label_codes_[g] == t.gold[g]).mean())


#: seeds of the random tie-breaks whose mean accuracy estimates the expected one: one seed's mean
#: over the datasets moves by ~0.001 (sd), as much as the margins to crowd-kit (Wawa: expected
#: .7936-.7946 against .7932), so 3 seeds could not tell; 20 give an sd of ~0.00024
SEEDS = tuple(range(20))


@pytest.mark.parametrize("cls,method", [(Wawa, "wawa"), (ZeroBasedSkill, "zbs")])
def test_vote_methods_no_lower_than_crowdkit(cls, method):
    """Wawa and ZBS against crowd-kit's recorded accuracy.

    crowd-kit breaks majority-vote ties by pandas column order, which on these datasets is the
    lowest label: with ``ties="lowest"`` ours is no lower on each dataset (within 0.1 point: on
    zheng_s_relevance, whose repeated (task, worker) answers crowd-kit's skill estimate counts
    once, we are 2 of 4,460 gold tasks behind) and no lower on the mean. With the default
    ``random`` ties, the expected accuracy (the mean over 20 seeds) is no lower on the mean.
    """
    lowest, rand, theirs = [], [], []
    for name in DATASETS:
        t = _load(name)
        ck = REFERENCE["accuracy"][name][method]
        acc_lowest = _accuracy(cls(ties="lowest").fit(t), t)
        assert acc_lowest >= ck - 0.001, (name, acc_lowest, ck)
        lowest.append(acc_lowest)
        rand.append(np.mean([_accuracy(cls(seed=s).fit(t), t) for s in SEEDS]))
        theirs.append(ck)
    assert np.mean(lowest) >= np.mean(theirs), (np.mean(lowest), np.mean(theirs))
    assert np.mean(rand) >= np.mean(theirs), (np.mean(rand), np.mean(theirs))


def test_one_coin_accuracy_against_crowdkit():
    ours, theirs, lower = [], [], {}
    for name in DATASETS:
        t = _load(name)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            acc = _accuracy(OneCoinDawidSkene().fit(t), t)
        ck = REFERENCE["accuracy"][name]["onecoin-ds"]
        ours.append(acc)
        theirs.append(ck)
        if acc < ck - 1e-9:
            lower[name] = (acc, ck)
    assert np.mean(ours) >= np.mean(theirs)
    # where we are lower, it is by a stopping-rule difference (crowd-kit stops as soon as its
    # ELBO, which is not monotone for one-coin, dips: after 2 iterations on zencrowd_all); at the
    # same iteration count the posteriors are identical (test_one_coin_matches_crowdkit).
    assert set(lower) <= {"zencrowd_all", "ws_cf", "zencrowd_in"}, lower
    assert all(ck - acc <= 0.02 for acc, ck in lower.values()), lower
