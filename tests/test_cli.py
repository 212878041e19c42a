"""The `crowdllm aggregate` / `crowdllm methods` contract that scripts and docs rely on."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from crowdllm.cli import example_dir, main
from crowdllm.labels import read_table


@pytest.fixture()
def runner():
    return CliRunner()


@pytest.fixture()
def answers(tmp_path):
    p = tmp_path / "answers.csv"
    rows = ["task,worker,label"]
    for i in range(30):
        truth = "pos" if i % 3 else "neg"
        flip = "neg" if truth == "pos" else "pos"
        rows += [f"t{i},a,{truth}", f"t{i},b,{truth if i % 5 else flip}", f"t{i},c,{flip if i % 4 == 0 else truth}"]
    p.write_text("\n".join(rows) + "\n")
    g = tmp_path / "gold.csv"
    g.write_text("task,label\n" + "".join(f"t{i},{'pos' if i % 3 else 'neg'}\n" for i in range(0, 30, 2)))
    return p, g


def test_methods_lists_every_registered_aggregator(runner):
    from crowdllm.aggregation import METHODS

    res = runner.invoke(main, ["methods", "--json"])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.output)
    assert [r["method"] for r in rows] == list(METHODS)
    assert all(r["description"] for r in rows)
    plain = runner.invoke(main, ["methods"])
    assert "ds" in plain.output and "Dawid-Skene" in plain.output


@pytest.mark.parametrize("ext", ["csv", "parquet", "jsonl"])
def test_aggregate_writes_task_label_and_probabilities(runner, answers, tmp_path, ext):
    p, g = answers
    out = tmp_path / f"labels.{ext}"
    skills = tmp_path / "skills.csv"
    res = runner.invoke(main, ["aggregate", str(p), "--method", "ds", "--gold", str(g),
                               "--output", str(out), "--skills", str(skills)])
    assert res.exit_code == 0, res.output
    table = read_table(out)
    assert table.column_names == ["task", "label", "p_neg", "p_pos"]
    assert table.num_rows == 30
    rows = table.to_pylist()
    for r in rows:
        assert abs(float(r["p_neg"]) + float(r["p_pos"]) - 1) < 1e-5
        assert r["label"] == ("pos" if float(r["p_pos"]) > float(r["p_neg"]) else "neg")
    gold = dict(line.split(",") for line in g.read_text().split()[1:])
    acc = sum(r["label"] == gold[r["task"]] for r in rows if r["task"] in gold) / len(gold)
    assert f"accuracy on 15 gold tasks: {acc:.4f}" in res.output
    sk = read_table(skills)
    assert sk.column("worker").to_pylist() == ["a", "b", "c"]
    assert {"skill", "p_neg_neg", "p_neg_pos", "p_pos_neg", "p_pos_pos"} <= set(sk.column_names)


def test_aggregate_json_and_stdout_table(runner, answers):
    p, g = answers
    res = runner.invoke(main, ["aggregate", str(p), "-m", "mv", "--gold", str(g), "--json"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.output)
    assert summary["method"] == "mv" and summary["tasks"] == 30 and summary["workers"] == 3
    assert summary["classes"] == ["neg", "pos"] and summary["gold_tasks"] == 15
    assert len(summary["rows"]) == 30 and set(summary["rows"][0]) == {"task", "label", "p_neg", "p_pos"}
    table = runner.invoke(main, ["aggregate", str(p), "-m", "wawa"])
    assert table.exit_code == 0 and table.output.splitlines()[0].split() == ["task", "label", "p_neg", "p_pos"]


def test_a_large_input_says_what_it_does_as_each_stage_begins(runner, answers, tmp_path,
                                                                monkeypatch):
    """From ``LARGE_ANSWERS`` answers on, stderr names each stage as it begins (the read's
    figures, the fit, the write); stdout's JSON is untouched. Below it, nothing more is said."""
    import crowdllm.cli as cli

    p, _ = answers
    out = tmp_path / "labels.csv"
    quiet = runner.invoke(main, ["aggregate", str(p), "-m", "ds", "-o", str(out)])
    assert quiet.exit_code == 0, quiet.output
    assert "read " not in quiet.stderr and "writing" not in quiet.stderr
    monkeypatch.setattr(cli, "LARGE_ANSWERS", 90)
    res = runner.invoke(main, ["aggregate", str(p), "-m", "ds", "-o", str(out), "--json"])
    assert res.exit_code == 0, res.output
    lines = res.stderr.splitlines()
    assert lines[0].startswith("read 90 answers (30 tasks, 3 annotators) in ")
    assert lines[0].endswith(" s; fitting ds...")
    assert lines[1].startswith("fitted in ") and lines[2] == f"writing {out}..."
    assert json.loads(res.stdout)["answers"] == 90
    monkeypatch.setattr(cli, "LARGE_ANSWERS", 91)
    assert "read " not in runner.invoke(main, ["aggregate", str(p), "-m", "ds"]).stderr


def test_shard_on_one_device_says_so_and_changes_nothing(runner, answers):
    # (on several devices: tests/test_sharding.py)
    p, _ = answers
    one = runner.invoke(main, ["aggregate", str(p), "-m", "ds", "--json"])
    res = runner.invoke(main, ["aggregate", str(p), "-m", "ds", "--json", "--shard"])
    assert one.exit_code == 0 and res.exit_code == 0, res.output
    assert "note: --shard: one device here, nothing to split" in res.stderr
    a, b = json.loads(one.stdout), json.loads(res.stdout)
    assert a["devices"] == b["devices"] == 1 and a["rows"] == b["rows"]


def test_seed_max_iter_tol_are_passed(runner, answers):
    p, _ = answers
    res = runner.invoke(main, ["aggregate", str(p), "-m", "ds", "--max-iter", "2", "--tol", "1e-12", "--json"])
    assert res.exit_code == 0, res.output
    s = json.loads(res.output[res.output.index("{"):])
    assert s["n_iter"] == 2 and s["converged"] is False
    assert "did not converge" in res.output  # warning is shown (stderr is mixed in by CliRunner)


def test_use_gold_clamps_and_says_so(runner, answers, tmp_path):
    p, g = answers
    res = runner.invoke(main, ["aggregate", str(p), "--gold", str(g), "--use-gold", "init", "--json"])
    assert res.exit_code == 0, res.output
    s = json.loads(res.output[res.output.index("{"):])
    assert s["accuracy"] == 1.0 and "by construction" in s["note"]
    bad = runner.invoke(main, ["aggregate", str(p), "--use-gold", "clamp"])
    assert bad.exit_code != 0 and "--use-gold needs --gold" in bad.output
    mv = runner.invoke(main, ["aggregate", str(p), "-m", "mv", "--gold", str(g), "--use-gold", "clamp"])
    assert mv.exit_code != 0 and "does not use gold" in mv.output


def test_bad_input_is_one_clear_line_and_no_output_written(runner, tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("task,worker,label\nt1,w1,a\nt2,w2,\n")
    out = tmp_path / "out.csv"
    res = runner.invoke(main, ["aggregate", str(bad), "--output", str(out)])
    assert res.exit_code == 1
    assert "Error: " in res.output and "bad.csv: row 2 (line 3), column 'label': empty value" in res.output
    assert "Traceback" not in res.output
    assert not out.exists()
    res = runner.invoke(main, ["aggregate", str(tmp_path / "nope.csv")])
    assert res.exit_code == 1 and "no such file" in res.output
    res = runner.invoke(main, ["aggregate", str(bad), "-m", "nosuch"])
    assert res.exit_code == 1 and "unknown method 'nosuch'" in res.output


def test_duplicates_policy_from_cli(runner, tmp_path):
    p = tmp_path / "d.csv"
    p.write_text("task,worker,label\nt1,w1,a\nt1,w1,b\nt2,w1,a\n")
    res = runner.invoke(main, ["aggregate", str(p), "-m", "mv"])
    assert res.exit_code == 0 and "1 repeated (task, worker) answers kept" in res.output
    res = runner.invoke(main, ["aggregate", str(p), "--duplicates", "error"])
    assert res.exit_code == 1 and "already answered task 't1'" in res.output


def test_bundled_example_runs(runner, tmp_path):
    assert (example_dir() / "answers.csv").exists() and (example_dir() / "SOURCE.md").exists()
    out = tmp_path / "ex.parquet"
    res = runner.invoke(main, ["aggregate", "example", "--gold", "example", "--output", str(out)])
    assert res.exit_code == 0, res.output
    assert pq.read_table(out).num_rows == 807
    acc = float(res.output.split("accuracy on 807 gold tasks: ")[1].split()[0])
    assert acc > 0.82  # MV's expected accuracy on this dataset is 0.8222 (SOURCE.md); DS beats it


def test_param_reaches_the_method_and_a_wrong_name_is_refused(runner, answers):
    """``-p NAME=VALUE``: JSON values (numbers, true/false, null) reach the method's constructor;
    a name the method does not take, or a spec without ``=``, is one clear error."""
    p, _ = answers
    res = runner.invoke(main, ["aggregate", str(p), "-m", "ds", "-p", "max_iter=1", "-p", "tol=1e-12", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output[res.output.index("{"):])["n_iter"] == 1
    # null reaches the constructor too (EBCC: screen_iter=None means every restart runs to the end)
    from crowdllm.aggregation import get_method

    assert get_method("ebcc", {"screen_iter": None}, seed=1).screen_iter is None
    assert get_method("ebcc", seed=1, tol=None).screen_iter == "auto"
    res = runner.invoke(main, ["aggregate", str(p), "-m", "ebcc", "-p", "restarts=2", "-p", "n_subtypes=2",
                               "-p", "screen_iter=null", "-p", "accelerate=true", "--json"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(main, ["aggregate", str(p), "-m", "ebcc", "-p", "restarts=0"])
    assert res.exit_code != 0 and "restarts" in res.output
    res = runner.invoke(main, ["aggregate", str(p), "-m", "ebcc", "-p", "restart=3"])
    assert res.exit_code != 0
    assert "no parameter 'restart'" in res.output and "restarts" in res.output
    res = runner.invoke(main, ["aggregate", str(p), "-m", "ds", "-p", "max_iter"])
    assert res.exit_code != 0 and "NAME=VALUE" in res.output
    # native=on where the kernel cannot run: one clear error, no traceback
    res = runner.invoke(main, ["aggregate", str(p), "-m", "ds", "-p", "native=on", "-p",
                               "dtype=float64"])
    assert res.exit_code == 1 and "native kernel cannot run" in res.output
    assert "float64 was asked for" in res.output and "Traceback" not in res.output


def test_bench_param_with_a_wrong_name_is_refused(runner, answers):
    p, _ = answers
    res = runner.invoke(main, ["bench", str(p.parent), "-m", "ds", "-p", "ds.maxiter=3"])
    assert res.exit_code != 0 and "no parameter 'maxiter'" in res.output


def test_the_command_keeps_compiled_programs_between_runs(tmp_path):
    """The ``crowdllm`` executable (cli.entry) turns on JAX's persistent compilation cache in
    ``$CROWDLLM_CACHE/jax``: a second run finds its programs there and gives the same output;
    ``CROWDLLM_COMPILE_CACHE=0`` leaves it off."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("JAX_COMPILATION_CACHE", "JAX_PERSISTENT_CACHE"))}
    env.update(CROWDLLM_NATIVE="0")  # the example is sparse anyway: no kernel build here

    def run(cache, out, **extra):
        code = "import sys; from crowdllm.cli import entry; sys.argv[0] = 'crowdllm'; entry()"
        res = subprocess.run([sys.executable, "-c", code, "aggregate", "example", "--method", "ds",
                              "--output", str(out)], env={**env, "CROWDLLM_CACHE": str(cache),
                                                          **extra},
                             capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr[-2000:]
        return res.stderr

    cache = tmp_path / "cache"
    first = run(cache, tmp_path / "a.csv", JAX_LOG_COMPILES="1")  # JAX logs cache hits then
    assert "Persistent compilation cache hit" not in first
    assert "Error reading persistent compilation cache" not in first
    entries = sorted(p.name for p in (cache / "jax").iterdir() if p.name.endswith("-cache"))
    assert entries  # DawidSkene's fit compiles for longer than the 0.2 s threshold
    assert "Persistent compilation cache hit" in run(cache, tmp_path / "b.csv",
                                                     JAX_LOG_COMPILES="1")
    assert sorted(p.name for p in (cache / "jax").iterdir() if p.name.endswith("-cache")) == entries
    assert (tmp_path / "a.csv").read_bytes() == (tmp_path / "b.csv").read_bytes()
    run(tmp_path / "off", tmp_path / "c.csv", CROWDLLM_COMPILE_CACHE="0")
    assert not (tmp_path / "off" / "jax").exists()
    assert (tmp_path / "c.csv").read_bytes() == (tmp_path / "a.csv").read_bytes()


def test_the_compile_cache_works_without_filelock(tmp_path):
    """JAX needs ``filelock`` to keep the cache under its size limit and, lacking it, fails every
    cache read with a warning (a fresh install without it did so on every command): without the
    package the cache is used unbounded, with no warning."""
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "filelock.py").write_text("raise ImportError('filelock hidden by the test')\n")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("JAX_COMPILATION_CACHE", "JAX_PERSISTENT_CACHE"))}
    env.update(CROWDLLM_NATIVE="0", CROWDLLM_CACHE=str(tmp_path / "cache"), JAX_LOG_COMPILES="1",
               PYTHONPATH=os.pathsep.join([str(hide), env.get("PYTHONPATH", "")]))
    code = ("import importlib.util, sys; assert importlib.util.find_spec('filelock') is not None; "
            "from crowdllm.cli import entry; sys.argv[0] = 'crowdllm'; entry()")
    errs = []
    for out in ("a.csv", "b.csv"):
        res = subprocess.run([sys.executable, "-c", code, "aggregate", "example", "--method",
                              "ds", "--output", str(tmp_path / out)], env=env,
                             capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr[-2000:]
        errs.append(res.stderr)
    assert all("filelock" not in e and "Error reading" not in e for e in errs), errs[1][-2000:]
    assert "Persistent compilation cache hit" in errs[1]

