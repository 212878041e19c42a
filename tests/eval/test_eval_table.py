"""The evaluation table, the `evaluate` command, hybrid subsets and per-method failure handling."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from sklearn.metrics import precision_recall_fscore_support

from crowdllm.aggregation import METHODS, Aggregator, MajorityVote, get_method
from crowdllm.cli import main
from crowdllm.eval.evaluate import CROWD_ROW, evaluate, group_table
from crowdllm.eval.hybrid import combine, split_by_patterns, subset_table
from crowdllm.eval.synthetic import write_synthetic_run
from crowdllm.labels import LabelTensor

# tasks x annotators a, b, c over classes x (0), y (1); t5 has no gold
DENSE = np.array([[0, 0, 1], [1, 0, 1], [0, 0, 0], [1, 1, 0], [1, 0, 0], [0, 1, -1]])
GOLD = {0: "x", 1: "y", 2: "x", 3: "y", 4: "x"}


def hand_tensor() -> LabelTensor:
    t = LabelTensor.from_dense(DENSE, classes=["x", "y"], worker_ids=["a", "b", "c"])
    return t.with_gold(GOLD)


class Broken(Aggregator):
    name = "broken"
    description = "always fails (test only)"

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed

    def _fit(self, tensor, gold):
        raise RuntimeError("kernel exploded")


def test_table_on_hand_example():
    t = hand_tensor()
    ev = evaluate(t, methods=["mv"], reference="c", predictions={"all-x": np.zeros(6, np.int32)},
                  groups=np.array(["even", "odd"] * 3, dtype=object), group_column="parity")
    rows = {r["system"]: r for r in ev.rows}
    assert ev.gold_tasks == 5 and ev.notes[0].startswith("gold covers 5 of 6")
    assert rows["a"]["accuracy"] == pytest.approx(0.8) and rows["b"]["accuracy"] == pytest.approx(0.8)
    assert rows["c"]["accuracy"] == pytest.approx(0.6) and rows["c"]["n"] == 5
    assert ev.best_annotator in ("a", "b")
    assert rows[CROWD_ROW]["accuracy"] == pytest.approx(11 / 15) and rows[CROWD_ROW]["n"] == 15
    assert rows["mv"]["accuracy"] == 1.0
    assert rows["mv"]["beats_best"] == "yes" and rows["mv"]["beats_reference"] == "yes"
    assert rows["all-x"]["accuracy"] == pytest.approx(0.6)
    assert rows["all-x"]["beats_best"] == "no" and rows["all-x"]["beats_reference"] == "no"
    # per-class figures equal scikit-learn's on the annotator's gold tasks
    gold = np.array([0, 1, 0, 1, 0])
    p, r, f, _ = precision_recall_fscore_support(gold, DENSE[:5, 2], labels=[0, 1], zero_division=0)
    assert [rows["c"]["P_x"], rows["c"]["R_x"], rows["c"]["F1_y"]] == pytest.approx([p[0], r[0], f[1]])
    # per-group breakdown: even tasks 0, 2, 4 and odd tasks 1, 3 (t5 has no gold)
    g = {(x["group"], x["system"]): x for x in ev.groups}
    assert g[("even", "c")]["accuracy"] == pytest.approx(2 / 3)
    assert g[("odd", "c")]["n"] == 2 and g[("odd", "c")]["accuracy"] == pytest.approx(0.5)
    wide = {x["group"]: x for x in group_table(ev)}
    assert wide["even"]["mv"] == 1.0 and wide["even"]["n"] == 3
    # agreement on the 5 gold tasks
    assert ev.agreement["tasks"] == 5 and len(ev.agreement["pairs"]) == 3
    assert ev.agreement["fleiss_kappa"] is not None


def test_min_coverage_and_unknown_reference():
    t = LabelTensor.from_dense(np.array([[0, -1], [1, -1], [0, 1], [1, 1]]), classes=["x", "y"],
                               worker_ids=["full", "half"]).with_gold({0: "x", 1: "y", 2: "x", 3: "y"})
    ev = evaluate(t, min_coverage=0.75)
    assert ev.best_annotator == "full"
    assert evaluate(t, min_coverage=0.5).best_annotator == "full"  # half is wrong on task 2
    with pytest.raises(ValueError, match="not among the annotators"):
        evaluate(t, reference="nobody")
    with pytest.raises(ValueError, match="no gold"):
        evaluate(LabelTensor.from_dense(np.array([[0, 1]])))


def test_a_failing_method_is_a_row_not_a_crash(monkeypatch):
    monkeypatch.setitem(METHODS, "broken", Broken)
    ev = evaluate(hand_tensor(), methods=["broken", "mv"])
    rows = {r["system"]: r for r in ev.rows}
    assert rows["broken"]["accuracy"] is None
    assert rows["broken"]["error"] == "RuntimeError: kernel exploded"
    assert rows["mv"]["accuracy"] == 1.0


def test_evaluate_cli_on_a_run(tmp_path):
    run = write_synthetic_run(tmp_path / "run", n_items=40, seed=1)
    res = CliRunner().invoke(main, ["evaluate", str(run), "--gold", str(run / "gold.csv"),
                                    "--by", "domain", "-m", "mv,ds", "--reference", "sim-small-a",
                                    "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    rows = {r["system"]: r for r in out["rows"]}
    tensor = LabelTensor.coerce(str(run / "answers.parquet")).with_gold(run / "gold.csv")
    mask = tensor.gold >= 0
    for name in ("mv", "ds"):
        m = get_method(name, seed=0).fit(tensor)
        assert rows[name]["accuracy"] == pytest.approx(float((m.label_codes_[mask] == tensor.gold[mask]).mean()))
    singles = {w: rows[w]["accuracy"] for w in ("sim-small-a", "sim-small-b", "sim-small-c", "sim-api-large")}
    assert out["best_annotator"] == max(singles, key=singles.get)
    assert {g["group"] for g in out["groups"]} == {"bio", "cs"}
    res = CliRunner().invoke(main, ["evaluate", str(run), "--gold", str(run / "gold.csv"), "-m", "mv"])
    assert res.exit_code == 0 and "best single annotator" in res.output and "Fleiss" in res.output
    # a predictions file (task,label) is scored as one system
    pred = tmp_path / "pred.csv"
    res = CliRunner().invoke(main, ["aggregate", str(run / "answers.parquet"), "-m", "mv", "-o", str(pred)])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(main, ["evaluate", str(pred), "--gold", str(run / "gold.csv"), "--json"])
    assert res.exit_code == 0, res.output
    only = json.loads(res.stdout)["rows"]
    assert [r["system"] for r in only if r["kind"] == "prediction"] == ["pred"]
    assert only[-1]["accuracy"] == pytest.approx(rows["mv"]["accuracy"])
    # errors are one line, naming what is wrong
    res = CliRunner().invoke(main, ["evaluate", str(run), "--gold", str(run / "gold.csv"), "--by", "nope", "-m", "none"])
    assert res.exit_code != 0 and "no item column 'nope'" in res.output
    res = CliRunner().invoke(main, ["evaluate", str(run), "--gold", str(run / "gold.csv"), "-m", "zzz"])
    assert res.exit_code != 0 and "unknown method" in res.output


def test_hybrid_llm_plus_human(tmp_path):
    run = write_synthetic_run(tmp_path / "run", n_items=40, seed=2, n_humans=6)
    tensor, groups = combine({"llm": run, "human": run / "humans.csv"})
    assert set(groups["llm"]) == {"sim-small-a", "sim-small-b", "sim-small-c", "sim-api-large"}
    assert all(w.startswith("human") for w in groups["human"])
    tensor = tensor.with_gold(run / "gold.csv")
    rows = subset_table(tensor, groups, ["mv"])
    by = {r["subset"]: r for r in rows}
    assert set(by) == {"llm", "human", "llm+human"}
    both = MajorityVote(seed=0).fit(tensor)
    mask = tensor.gold >= 0
    assert by["llm+human"]["accuracy"] == pytest.approx(float((both.label_codes_[mask] == tensor.gold[mask]).mean()))
    expect = "yes" if by["llm+human"]["accuracy"] > max(by["llm"]["accuracy"], by["human"]["accuracy"]) else "no"
    assert by["llm+human"]["beats_parts"] == expect
    # the same question as one command
    res = CliRunner().invoke(main, ["hybrid", f"llm={run}", f"human={run / 'humans.csv'}",
                                    "--gold", str(run / "gold.csv"), "-m", "mv", "--json"])
    assert res.exit_code == 0, res.output
    cli_rows = {r["subset"]: r for r in json.loads(res.stdout)["rows"]}
    assert cli_rows["llm+human"]["accuracy"] == pytest.approx(by["llm+human"]["accuracy"])
    # groups by pattern over one tensor
    g = split_by_patterns(tensor, {"small": ["sim-small-*"]}, rest="rest")
    assert len(g["small"]) == 3 and "sim-api-large" in g["rest"]
    with pytest.raises(Exception, match="match no annotator"):
        split_by_patterns(tensor, {"none": ["zzz*"]})


def test_default_methods_skip_those_that_call_models(monkeypatch):
    from crowdllm.eval.evaluate import default_methods

    class Calls(Broken):
        name = "calls"
        calls_models = True

    monkeypatch.setattr("crowdllm.aggregation.METHODS",
                        {"mv": METHODS["mv"], "broken": Broken, "calls": Calls,
                         "llm-judge": Broken})
    assert default_methods() == ["mv", "broken"]
    res = CliRunner().invoke(main, ["evaluate", "example", "--gold", "example", "--json"])
    assert res.exit_code == 0, res.output
    kinds = {r["system"]: r for r in json.loads(res.stdout)["rows"] if r["kind"] == "method"}
    assert set(kinds) == {"mv", "broken"} and kinds["broken"]["error"].startswith("RuntimeError")
