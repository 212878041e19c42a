"""The aggregator benchmark on a few small real datasets: whatever is registered runs, failures show."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from crowdllm.aggregation import METHODS, Aggregator, get_method
from crowdllm.cli import main
from crowdllm.eval.bench import average_ranks, parse_params, run_bench
from crowdllm.labels import read_answers

SMALL = ["li_quiz_itmanage", "li_quiz_pokemon"]


class Broken(Aggregator):
    name = "broken"
    description = "always fails (test only)"

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed

    def _fit(self, tensor, gold):
        raise RuntimeError("kernel exploded")


def test_average_ranks():
    acc = np.array([[0.9, 0.8, 0.8, np.nan], [0.5, 0.7, 0.6, 0.4]])
    np.testing.assert_array_equal(average_ranks(acc), [[1, 2.5, 2.5, 4], [3, 1, 2, 4]])


def test_parse_params():
    assert parse_params(["ds.max_iter=200", "mv.ties=lowest", "x.y=[1, 2]"]) == {
        "ds": {"max_iter": 200}, "mv": {"ties": "lowest"}, "x": {"y": [1, 2]}}
    with pytest.raises(ValueError, match="METHOD.NAME=VALUE"):
        parse_params(["max_iter=3"])


def test_bench_runs_whatever_is_registered(data_dir, monkeypatch, tmp_path):
    # the registry as other code may leave it: two real methods, one that always fails
    monkeypatch.setattr("crowdllm.aggregation.METHODS", {"mv": METHODS["mv"], "ds": METHODS["ds"],
                                                        "broken": Broken})
    (tmp_path / "empty").mkdir()
    folders = [data_dir / d for d in SMALL] + [data_dir / "coda19_test_subset", tmp_path / "empty"]
    res = run_bench(folders, params={"mv": {"ties": "lowest"}})
    assert res.methods == ["mv", "ds", "broken"]
    assert res.datasets == SMALL
    assert set(res.skipped) == {"coda19_test_subset", "empty"}
    assert res.params["mv"] == {"ties": "lowest"}
    for d in SMALL:
        assert res.errors[d] == {"broken": "RuntimeError: kernel exploded"}
        t = read_answers(data_dir / d / "answers.csv").with_gold(data_dir / d / "gold.csv")
        mask = t.gold >= 0
        for m, params in (("mv", {"ties": "lowest"}), ("ds", {})):
            fit = get_method(m, seed=0, **params).fit(t)
            assert res.accuracy[d][m] == pytest.approx(float((fit.label_codes_[mask] == t.gold[mask]).mean()))
    summary = {s["method"]: s for s in res.summary}
    for m in ("mv", "ds"):
        assert summary[m]["mean_accuracy"] == pytest.approx(np.mean([res.accuracy[d][m] for d in SMALL]))
        assert summary[m]["completed"] == 2
    assert summary["broken"]["completed"] == 0 and summary["broken"]["rank"] == 3
    assert summary["broken"]["mean_rank"] == 3.0
    assert res.suggested == min(("mv", "ds"), key=lambda m: (summary[m]["mean_rank"], -summary[m]["mean_accuracy"]))
    table = res.table()
    assert table[0]["broken"] == "FAIL" and table[-2]["dataset"] == "rank"


def test_bench_cli_outputs(data_dir, tmp_path):
    d = [str(data_dir / x) for x in SMALL[:2]]
    res = CliRunner().invoke(main, ["bench", *d, "-m", "mv,ds", "-q", "-o", str(tmp_path / "b.md")])
    assert res.exit_code == 0, res.output
    assert "mean accuracy" in res.output and "suggested default:" in res.output
    assert (tmp_path / "b.md").read_text().startswith("| dataset | mv | ds |")
    res = CliRunner().invoke(main, ["bench", *d, "-m", "mv", "-q", "--json", "-o", str(tmp_path / "b.csv")])
    out = json.loads(res.stdout)
    assert out["datasets"] == SMALL[:2] and out["suggested"] == "mv"
    assert (tmp_path / "b.csv").read_text().splitlines()[0] == "dataset,mv"
    res = CliRunner().invoke(main, ["bench", *d, "-m", "mv", "-p", "ds.max_iter=3"])
    assert res.exit_code != 0 and "not being run" in res.output
    res = CliRunner().invoke(main, ["bench", str(tmp_path)])
    assert res.exit_code != 0 and "no dataset folder" in res.output


def test_merge_results_recomputes_the_summary(tmp_path):
    from crowdllm.eval.bench import merge_results

    a = {"datasets": ["d1", "d2"], "methods": ["mv", "ds"],
         "accuracy": {"d1": {"mv": 0.8, "ds": 0.9}, "d2": {"mv": 0.7, "ds": None}},
         "errors": {"d1": {}, "d2": {"ds": "boom"}}, "seconds": {"d1": {"mv": 1, "ds": 2}, "d2": {"mv": 1, "ds": 2}},
         "info": {"d1": {}, "d2": {}}, "skipped": {}, "params": {}}
    b = {"datasets": ["d1", "d2"], "methods": ["ds", "new"],
         "accuracy": {"d1": {"ds": 0.9, "new": 0.95}, "d2": {"ds": 0.75, "new": 0.6}},
         "errors": {"d1": {}, "d2": {}}, "seconds": {"d1": {"ds": 2, "new": 3}, "d2": {"ds": 2, "new": 3}},
         "info": {"d1": {}, "d2": {}}, "skipped": {}, "params": {}}
    res = merge_results([a, b])
    assert res.methods == ["mv", "ds", "new"]
    assert res.accuracy["d2"]["ds"] == 0.75 and "ds" not in res.errors["d2"]  # the later run wins
    s = {x["method"]: x for x in res.summary}
    # ranks: d1 new 1, ds 2, mv 3; d2 ds 1, mv 2, new 3
    assert [s[m]["mean_rank"] for m in ("mv", "ds", "new")] == [2.5, 1.5, 2.0]
    assert res.suggested == "ds" and s["ds"]["mean_accuracy"] == pytest.approx(0.825)
    (tmp_path / "a.json").write_text(json.dumps(a))
    (tmp_path / "b.json").write_text(json.dumps(b))
    out = CliRunner().invoke(main, ["bench", "--merge", str(tmp_path / "a.json"),
                                    "--merge", str(tmp_path / "b.json"), "--json"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.stdout)["suggested"] == "ds"


def test_bench_shares_shapes_and_scores_as_with_own_shapes(data_dir, monkeypatch):
    """Shared shapes (the default) pad the binary datasets to one shape: the prepared shapes
    the methods see are one per class count, and the accuracies equal those of --own-shapes."""
    from crowdllm.aggregation import _core

    names = ["zencrowd_in", "snow_rte", "dog"]  # two binary datasets and a 4-class one
    folders = [data_dir / n for n in names]
    seen: dict[bool, set] = {True: set(), False: set()}
    prepare = _core.prepare

    def spy(tensor, **kw):
        data = prepare(tensor, **kw)
        seen[share].add((tensor.n_classes, data.task_mask.shape, data.worker_mask.shape))
        return data

    for mod in ("dawid_skene", "mace"):
        monkeypatch.setattr(f"crowdllm.aggregation.{mod}.prepare", spy)
    res = {}
    for share in (True, False):
        res[share] = run_bench(folders, methods=["ds", "mace"], share_shapes=share)
    assert res[True].accuracy == res[False].accuracy
    assert len({s for s in seen[True] if s[0] == 2}) == 1  # one shape for both binary crowds
    assert len({s for s in seen[False] if s[0] == 2}) == 2
    out = CliRunner().invoke(main, ["bench", *map(str, folders[:2]), "-m", "ds", "-q",
                                    "--own-shapes", "--json"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.stdout)["accuracy"] == {n: {"ds": res[False].accuracy[n]["ds"]}
                                                 for n in names[:2]}
