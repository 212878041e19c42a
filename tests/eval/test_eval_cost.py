"""Cost from a hand-written ledger: every figure checked against a hand computation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from crowdllm.cli import main
from crowdllm.eval.cost import (PriceTable, cost_accuracy_frontier, ledger_cost, load_prices,
                                pareto_front, prices_toml, worker_costs)
from crowdllm.eval.run import load_run, read_ledger
from crowdllm.labels import CrowdDataError

RECORDS = [
    {"task": "a", "model": "api-m", "prompt_version": "v1", "raw": "x", "label": "x",
     "abstained": False, "probs": None, "prompt_tokens": 1000, "completion_tokens": 50,
     "attempts": 1, "attempt_tokens": [[1000, 50]], "latency_s": 0.2, "finish_reason": "stop",
     "backend": "openai", "endpoint_model": "api-m"},
    {"task": "b", "model": "api-m", "prompt_version": "v1", "raw": "y", "label": "y",
     "abstained": False, "probs": None, "prompt_tokens": 2200, "completion_tokens": 70,
     "attempts": 2, "attempt_tokens": [[1000, 40], [1200, 30]], "latency_s": 0.4,
     "finish_reason": "stop", "backend": "openai", "endpoint_model": "api-m"},
    {"task": "a", "model": "local-m", "prompt_version": "v1", "raw": "x", "label": "x",
     "abstained": False, "probs": None, "prompt_tokens": 500, "completion_tokens": 10,
     "attempts": 1, "attempt_tokens": [[500, 10]], "latency_s": 0.5, "finish_reason": "stop",
     "backend": "vllm", "endpoint_model": "local-m"},
    {"task": "b", "model": "local-m", "prompt_version": "v1", "raw": "??", "label": None,
     "abstained": True, "probs": None, "prompt_tokens": 1100, "completion_tokens": 25,
     "attempts": 2, "attempt_tokens": [[500, 20], [600, 5]], "latency_s": 1.0,
     "finish_reason": "stop", "backend": "vllm", "endpoint_model": "local-m"},
]

PRICES = """
currency = "EUR"
[models."api-m"]
prompt_per_m = 2.0
completion_per_m = 10.0
[models."local-*"]
gpu_hour = 3.6
prompt_tokens_per_s = 1000
completion_tokens_per_s = 10
"""


def write_run(tmp_path: Path, records=RECORDS) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    (run / "ledger.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return run


def test_hand_computed_costs(tmp_path):
    (tmp_path / "p.toml").write_text(PRICES)
    prices = load_prices(tmp_path / "p.toml")
    assert prices.currency == "EUR"
    rows = {r["model"]: r for r in ledger_cost(read_ledger(write_run(tmp_path) / "ledger.jsonl"), prices)}
    api, local, panel = rows["api-m"], rows["local-m"], rows["panel"]
    # api: (1000*2 + 50*10)/1e6 + (2200*2 + 70*10)/1e6; retry (1200*2 + 30*10)/1e6
    assert api["cost"] == pytest.approx(0.0025 + 0.0051)
    assert api["retry_cost"] == pytest.approx(0.0027)
    assert (api["prompt_tokens"], api["completion_tokens"]) == (3200, 120)
    assert (api["retry_prompt_tokens"], api["retry_completion_tokens"]) == (1200, 30)
    assert (api["attempts"], api["retried_items"], api["abstained"]) == (3, 1, 0)
    # local: 3.6 $/h * (500/1000 + 10/10 s) / 3600 + 3.6 * (1100/1000 + 25/10) / 3600
    assert local["cost"] == pytest.approx(0.0015 + 0.0036)
    assert local["retry_cost"] == pytest.approx(3.6 * (600 / 1000 + 5 / 10) / 3600)
    assert (local["answered"], local["abstained"]) == (1, 1)
    assert panel["cost"] == pytest.approx(0.0127)
    assert panel["retry_cost"] == pytest.approx(0.0038)
    assert panel["items"] == 2 and panel["cost_per_item"] == pytest.approx(0.00635)
    assert panel["prompt_tokens"] == 3200 + 1600 and panel["attempts"] == 6


def test_measured_latency_and_missing_prices():
    table = PriceTable.from_dict({"default": {"gpu_hour": 3.6, "gpus": 2}})
    rows = {r["model"]: r for r in ledger_cost(RECORDS, table)}
    # 2 GPUs x 3.6 $/h x (0.5 s + 1.0 s); the re-ask's share of the 1.0 s record by tokens
    assert rows["local-m"]["cost"] == pytest.approx(2 * 3.6 * 1.5 / 3600)
    assert rows["local-m"]["retry_cost"] == pytest.approx(2 * 3.6 * 1.0 / 3600 * 605 / 1125)
    assert "measured latency" in rows["local-m"]["pricing"]
    none = {r["model"]: r for r in ledger_cost(RECORDS, PriceTable.from_dict({}))}
    assert none["api-m"]["cost"] is None and none["panel"]["cost"] is None
    assert none["api-m"]["prompt_tokens"] == 3200  # tokens still counted


def test_defaults_and_toml_override(tmp_path):
    base = load_prices()
    assert base.price_of("gpt-4o").prompt_per_m == 2.5
    assert base.price_of("claude-3-5-haiku-20241022").completion_per_m == 4.0  # glob
    assert base.price_of("my/local-model").gpu_hour == 2.0  # the default entry
    (tmp_path / "p.toml").write_text('[models."gpt-4o"]\nprompt_per_m = 1.0\ncompletion_per_m = 2.0\n')
    over = load_prices(tmp_path / "p.toml")
    assert over.price_of("gpt-4o").prompt_per_m == 1.0
    assert over.price_of("gpt-4o-mini").prompt_per_m == 0.15  # untouched defaults stay
    # the written template reads back to the same table
    (tmp_path / "d.toml").write_text(prices_toml())
    again = load_prices(tmp_path / "d.toml")
    assert again.models == base.models and again.default == base.default


@pytest.mark.parametrize("text, msg", [
    ('[models."x"]\nprompt_per_m = -1\n', "non-negative"),
    ('[models."x"]\nprice = 1\n', "unknown field"),
    ('[models."x"]\ntokens_per_s = 0\n', "must be > 0"),
    ('currency = "USD"\n[modles]\n', "unknown top-level"),
    ("[models\n", "not valid TOML"),
])
def test_bad_price_files(tmp_path, text, msg):
    (tmp_path / "p.toml").write_text(text)
    with pytest.raises(CrowdDataError, match=msg):
        load_prices(tmp_path / "p.toml")


@pytest.mark.parametrize("line, msg", [
    ("not json", "line 2: not valid JSON"),
    ('{"task": "c", "model": "m", "prompt_tokens": 1}', "line 2: missing field 'completion_tokens'"),
    ('{"task": "c", "model": "m", "prompt_tokens": -3, "completion_tokens": 1}',
     "line 2, field 'prompt_tokens'"),
    ('{"task": "c", "model": "m", "prompt_tokens": 1, "completion_tokens": 1, "attempt_tokens": [1]}',
     "line 2, field 'attempt_tokens'"),
])
def test_bad_ledger_lines_name_the_line(tmp_path, line, msg):
    p = tmp_path / "ledger.jsonl"
    p.write_text(json.dumps(RECORDS[0]) + "\n" + line + "\n")
    with pytest.raises(CrowdDataError, match=msg):
        read_ledger(p)


def test_cost_cli(tmp_path):
    run = write_run(tmp_path)
    (tmp_path / "p.toml").write_text(PRICES)
    res = CliRunner().invoke(main, ["cost", str(run), "--prices", str(tmp_path / "p.toml"), "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["currency"] == "EUR"
    assert out["panel"]["cost"] == pytest.approx(0.0127)
    assert out["panel"]["retry_cost"] == pytest.approx(0.0038)
    res = CliRunner().invoke(main, ["cost", str(run), "--prices", str(tmp_path / "p.toml")])
    assert res.exit_code == 0 and "panel" in res.output and "0.012700" in res.output
    res = CliRunner().invoke(main, ["cost", str(run), "--write-prices", str(tmp_path / "w.toml")])
    assert res.exit_code == 0 and "gpt-4o" in (tmp_path / "w.toml").read_text()
    res = CliRunner().invoke(main, ["cost", str(tmp_path)])
    assert res.exit_code != 0 and "no answers file and no ledger" in res.output


def test_pareto_front():
    costs = [1.0, 2.0, 2.0, 3.0, 0.5]
    accs = [0.7, 0.8, 0.75, 0.8, 0.6]
    assert pareto_front(costs, accs).tolist() == [True, True, False, False, True]


def test_frontier_on_synthetic_panel(tmp_path):
    from crowdllm.aggregation import MajorityVote
    from crowdllm.eval.synthetic import SYNTHETIC_MODELS, write_synthetic_run

    models = {m: SYNTHETIC_MODELS[m] for m in ("sim-small-a", "sim-small-b", "sim-api-large")}
    run_dir = write_synthetic_run(tmp_path / "s", n_items=30, seed=3, models=models)
    run = load_run(run_dir)
    rows = ledger_cost(run.ledger, load_prices())
    wc = worker_costs(rows, run.models_of_workers())
    assert set(wc) == set(models)
    tensor = run.tensor.with_gold(run_dir / "gold.csv")
    front = cost_accuracy_frontier(tensor, wc, ["mv"])
    assert len(front) == 7  # every non-empty subset of 3 models
    full = next(r for r in front if r["size"] == 3)
    assert full["cost"] == pytest.approx(rows[-1]["cost"])
    mv = MajorityVote(seed=0).fit(tensor)
    mask = tensor.gold >= 0
    assert full["accuracy"] == pytest.approx(float((mv.label_codes_[mask] == tensor.gold[mask]).mean()))
    single = next(r for r in front if r["subset"] == "sim-api-large")
    codes = np.array([tensor.classes.tolist().index(x) for x in
                      run.tensor.select_workers(["sim-api-large"]).classes[
                          run.tensor.select_workers(["sim-api-large"]).label]])
    assert single["accuracy"] == pytest.approx(float((codes == tensor.gold).mean()))
    # frontier flags: no frontier point is dominated, every other point is
    for r in front:
        dominated = any(o["cost"] <= r["cost"] and o["accuracy"] >= r["accuracy"]
                        and (o["cost"] < r["cost"] or o["accuracy"] > r["accuracy"]) for o in front)
        assert r["frontier"] == (not dominated)


def test_torn_last_line_and_repeats_follow_the_ledger_contract(tmp_path):
    p = tmp_path / "ledger.jsonl"
    again = dict(RECORDS[0], prompt_tokens=9999)
    p.write_text("".join(json.dumps(r) + "\n" for r in [RECORDS[0], again]) + '{"task": "c", "mod')
    with pytest.warns(UserWarning) as rec:
        recs = read_ledger(p)
    msgs = " ".join(str(w.message) for w in rec)
    assert "incomplete last line" in msgs and "first of each was kept" in msgs
    assert len(recs) == 1 and recs[0]["prompt_tokens"] == 1000


def test_old_prompt_versions_cost_but_workers_map_to_the_current_one(tmp_path):
    import pyarrow as pa

    from crowdllm.labels import write_table

    old = [dict(r, prompt_version="v0") for r in RECORDS]
    run = write_run(tmp_path, RECORDS + old)
    write_table(pa.table({"task": ["a", "b", "a"], "worker": ["api-m", "api-m", "local-m"],
                          "label": ["x", "y", "x"]}), run / "answers.parquet")
    (run / "run.json").write_text(json.dumps({"prompt_versions": {"api-m": "v1", "local-m": "v1"}}))
    r = load_run(run)
    assert r.models_of_workers() == {"api-m": ("api-m", "v1"), "local-m": ("local-m", "v1")}
    (tmp_path / "p.toml").write_text(PRICES)
    rows = ledger_cost(r.ledger, load_prices(tmp_path / "p.toml"))
    assert [(x["model"], x["prompt_version"]) for x in rows[:-1]] == [
        ("api-m", "v0"), ("api-m", "v1"), ("local-m", "v0"), ("local-m", "v1")]
    assert rows[-1]["cost"] == pytest.approx(2 * 0.0127)  # every version's tokens were paid for
    wc = worker_costs(rows, r.models_of_workers())
    assert wc == {"api-m": pytest.approx(0.0076), "local-m": pytest.approx(0.0051)}


def test_spent_attempts_add_tokens_and_cost_but_no_items(tmp_path):
    # tokens billed for attempts that got no final answer (spent.jsonl): retry overhead
    (tmp_path / "p.toml").write_text(PRICES)
    prices = load_prices(tmp_path / "p.toml")
    run = write_run(tmp_path)
    spent = [{"task": "c", "model": "api-m", "prompt_version": "v1", "prompt_tokens": 500,
              "completion_tokens": 20, "attempts": 1, "attempt_tokens": [[500, 20]],
              "latency_s": 0.1, "error": "gave up", "backend": "openai", "endpoint_model": "api-m"},
             {"task": "z", "model": "other-m", "prompt_version": "v1", "prompt_tokens": 7,
              "completion_tokens": 1, "attempts": 1, "attempt_tokens": [[7, 1]],
              "latency_s": 0.1, "error": "gave up", "backend": "openai", "endpoint_model": "other-m"}]
    (run / "spent.jsonl").write_text("".join(json.dumps(r) + "\n" for r in spent))
    r = load_run(run)
    assert [s["task"] for s in r.spent] == ["c", "z"]
    base = {x["model"]: x for x in ledger_cost(r.ledger, prices)}
    rows = {x["model"]: x for x in ledger_cost(r.ledger, prices, spent=r.spent)}
    api, b = rows["api-m"], base["api-m"]
    assert api["items"] == b["items"] == 2 and api["attempts"] == b["attempts"] + 1
    assert api["prompt_tokens"] == b["prompt_tokens"] + 500
    assert api["retry_prompt_tokens"] == b["retry_prompt_tokens"] + 500
    assert api["retry_completion_tokens"] == b["retry_completion_tokens"] + 20
    extra = (500 * 2.0 + 20 * 10.0) / 1e6
    assert api["cost"] == pytest.approx(b["cost"] + extra)
    assert api["retry_cost"] == pytest.approx(b["retry_cost"] + extra)
    # a model with spent attempts only: a row with no items and no per-item cost
    other = rows["other-m"]
    assert other["items"] == 0 and other["prompt_tokens"] == 7 and other["cost_per_item"] is None
    assert rows["panel"]["prompt_tokens"] == base["panel"]["prompt_tokens"] + 507
    assert rows["panel"]["items"] == base["panel"]["items"]
