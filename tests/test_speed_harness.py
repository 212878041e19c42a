"""The speed harness (``crowdllm.eval.speed``): rows of the method table, crowd-kit beside ours.

Functional only (what each row holds), never timings: those belong to ``benchmarks/``.
"""

from __future__ import annotations

import numpy as np
import pytest

from conftest import DATA
from crowdllm.eval import speed


def test_workload_is_deterministic_and_sparse_crowd_shaped():
    a, truth_a = speed.workload("mv", 300, "coo")
    b, truth_b = speed.workload("mv", 300, "coo")
    np.testing.assert_array_equal(np.asarray(a.label), np.asarray(b.label))
    np.testing.assert_array_equal(truth_a, truth_b)
    assert a.n_tasks == 300 and a.n_answers == 900 and a.n_workers == 10_000
    k, _ = speed.workload("kos", 50, "dense")
    assert k.n_classes == 2 and k.n_answers == 50 * 12


@pytest.mark.parametrize("kind", ["dense", "coo"])
def test_workload_drawn_once_is_read_back_equal_from_the_shared_folder(kind, tmp_path,
                                                                       monkeypatch):
    """The table's subprocesses share one draw per size and class count (10,000,000 x 12 takes
    ~15 s to draw): what is read back is what a fresh draw gives, and nothing half-written
    stays behind."""
    fresh, truth = speed.workload("ds", 400, kind)
    first, _ = speed.workload("ds", 400, kind, str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{kind}-400-5.npz"]
    monkeypatch.setattr(speed, "dense_panel", None)  # a second draw would fail: it is read back
    monkeypatch.setattr(speed, "sparse_crowd", None)
    again, truth_again = speed.workload("ds", 400, kind, str(tmp_path))
    for t in (first, again):
        for field in ("task", "worker", "label"):
            np.testing.assert_array_equal(np.asarray(getattr(t, field)),
                                          np.asarray(getattr(fresh, field)))
        assert t.n_workers == fresh.n_workers and t.n_classes == fresh.n_classes
    np.testing.assert_array_equal(truth_again, truth)
    with pytest.raises(TypeError):  # KOS's binary panel is another draw, not the 5-class one
        speed.workload("kos", 400, kind, str(tmp_path))


def test_method_table_rows_name_the_device_peak_and_leave_no_shared_folder(capsys):
    import glob
    import tempfile

    import jax

    before = set(glob.glob(f"{tempfile.gettempdir()}/crowdllm-speed-*"))
    rows = speed.method_table(["mv", "ds"], [300], "dense", repeats=0)
    assert set(glob.glob(f"{tempfile.gettempdir()}/crowdllm-speed-*")) == before
    for r in rows:
        assert "error" not in r and r["accuracy"] > 0.9 and r["peak_rss_GiB"] > 0
        if jax.default_backend() == "cpu":  # the arrays are in the RSS; no device column
            assert r["device_peak_GiB"] is None
        else:
            assert r["device_peak_GiB"] > 0
    speed.print_header()
    speed._print_row(rows[0])
    header, row = capsys.readouterr().out.splitlines()[-2:]
    assert "dev GiB" in header and row.split()[:3] == ["mv", "dense", "300"]


def test_method_table_times_crowdkit_beside_ours_and_bounds_a_timeout():
    pytest.importorskip("crowdkit")
    rows = speed.method_table(["mv"], [200], "coo", repeats=0, crowdkit_max=200)
    (row,) = rows
    assert row["method"] == "mv" and row["n"] == 200 and "error" not in row
    assert row["accuracy"] > 0.5 and row["crowdkit_s"] > 0 and row["crowdkit_peak_rss_GiB"] > 0
    assert row["speedup"] == pytest.approx(row["crowdkit_s"] / max(row["run_s"], 1e-9))
    # crowd-kit stopped at its limit: the limit is recorded as a lower bound, ours still reported
    (slow,) = speed.method_table(["mv"], [200], "coo", repeats=0, crowdkit_max=200,
                                 crowdkit_timeout=0.01)
    assert slow["crowdkit_timed_out"] and slow["crowdkit_s"] == 0.01 and slow["run_s"] > 0
    # above crowdkit_max, and for methods crowd-kit lacks, no crowd-kit column
    (big,) = speed.method_table(["mv"], [200], "coo", repeats=0, crowdkit_max=100)
    (bwa,) = speed.method_table(["bwa"], [200], "coo", repeats=0, crowdkit_max=200)
    assert "crowdkit_s" not in big and "crowdkit_s" not in bwa and bwa["accuracy"] > 0.5


def _one_dataset(tmp_path, name: str):
    """A data folder holding only ``name`` (links to its answers and gold)."""
    folder = tmp_path / "data" / name
    folder.mkdir(parents=True)
    for f in ("answers.csv", "gold.csv"):
        (folder / f).symlink_to(DATA / name / f)
    return folder.parent


@pytest.mark.parametrize("script", ["classical_speed", "ebcc_speed", "merge_speed",
                                    "restarts_speed", "compile_time", "gpu_parity",
                                    "ds_step_variants", "ebcc_sweep_native", "ebcc_fit_iters",
                                    "ebcc_sparse", "glad_fit_iters",
                                    "glad_m_step", "glad_newton", "coo_native",
                                    "coo_row_width"])
def test_benchmark_scripts_run_at_a_tiny_size(script, monkeypatch, capsys, tmp_path):
    """The benchmark scripts call kernels by their internal signatures, so a change of those
    can break a script silently (``classical_speed`` did, session 3); run each end to end on a
    tiny panel and check the table it prints (no timing is asserted)."""
    import importlib
    import sys
    from pathlib import Path

    from crowdllm.aggregation import _native

    if script in ("merge_speed", "ebcc_sweep_native", "ebcc_fit_iters", "ebcc_sparse",
                  "glad_fit_iters", "glad_m_step", "coo_native", "coo_row_width") and not _native.available():
        pytest.skip(f"native kernels unavailable: {_native.why_unavailable()}")
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent / "benchmarks"))
    mod = importlib.import_module(script)
    argv = {"classical_speed": ["--items", "600", "--ck-items", "0", "--repeats", "1"],
            "ebcc_speed": ["--tasks", "300", "--restarts", "3", "--repeat", "1"],
            "merge_speed": ["--n", "3000", "--repeats", "1"],
            "restarts_speed": ["--n", "300", "--restarts", "2", "--repeats", "1"],
            "compile_time": ["--methods", "ds", "--datasets", "li_quiz_itmanage",
                             "--data", str(DATA)],
            "gpu_parity": ["--n", "300", "--methods", "ds,mv", "--layouts", "dense,coo"],
            "ds_step_variants": ["--n", "2000", "--iters", "3", "--repeats", "1"],
            # 3 classes, 2 subtypes: the annotator groups are uneven (5, 5, 2), as
            # _native.ebcc_plan makes them for 6 columns (a table row of 8 floats)
            "ebcc_sweep_native": ["--tasks", "3000", "--repeats", "1", "--classes", "3",
                                  "--subtypes", "2"],
            "ebcc_fit_iters": ["--tasks", "3000", "--sweeps", "3", "--repeats", "1"],
            "ebcc_sparse": ["--tasks", "2000", "--sweeps", "4", "--repeats", "1",
                            "--subtypes", "3"],
            "glad_fit_iters": ["--tasks", "3000", "--iters", "3", "--repeats", "1", "--passes",
                               "2"],
            "glad_m_step": ["--n", "3000", "--iters", "5", "--repeats", "2"],
            # one small dataset (a folder of links to it), Adam at two step counts and Newton
            "glad_newton": ["--data", str(_one_dataset(tmp_path, "li_quiz_itmanage")),
                            "--adam-steps", "5,1", "--caps", "none", "--max-iter", "30"],
            # 20 tasks of 300 answers among 2,000 of 3: the rows in tiers by width (301 slots
            # rounded up to 384); one method (each runs the same lines; the other classes on
            # tiers: test_native.py's sparse crowds with busy tasks)
            "coo_native": ["--tasks", "2000", "--iters", "2", "--repeats", "1", "--methods",
                           "ds", "--control", "20", "--control-answers", "300"],
            "coo_row_width": ["--tasks", "3000", "--widths", "4,6", "--calls", "2",
                              "--repeats", "1"]}[script]
    monkeypatch.setattr(sys, "argv", [script] + argv)
    mod.main()
    out = capsys.readouterr().out
    names = {"classical_speed": ["glad", "mace", "mmsr", "kos"], "ebcc_speed": ["acc_ebcc"],
             "merge_speed": ["synthetic", "agreeing"], "restarts_speed": ["| lax.map |", "| vmap |"],
             "compile_time": ["| ds | li_quiz_itmanage | 25 x 36 |"],
             "gpu_parity": ["ds           coo", "mv           dense", "all agree"],
             "ds_step_variants": ["onehot-matmul", "gather-reduce", "gather-scatter"],
             "ebcc_sweep_native": ["XLA (subtype_sweep)", "native (ebcc_sweep)", "log path",
                                   "DS's groups", "groups [5, 5, 2]", "same sweep"],
             "ebcc_fit_iters": ["EBCC, native, ", "3 sweeps: ", "ms a sweep"],
             "ebcc_sparse": ["native ", "XLA ", "faster a sweep", "sorted by first annotator"],
             "glad_fit_iters": ["GLAD, native, 3,000 x 12 x 5, 3 iterations: ",
                                "distinct rows, 1 thread: ", "distinct rows, 2 threads: "],
             "glad_m_step": ["| native |", "| jax |", "between the two fits", "| given |",
                             "| summed in a pass |"],
             "glad_newton": ["adam m_steps 5 |", "adam m_steps 1 |", "newton cap None",
                             "\nli_quiz_itmanage ", "iterations, all datasets"],
             "coo_native": ["rows: ((4, ", "(384, 20))", "\nds "],
             "coo_row_width": ["width   4:", "width   6:", "one call on 8 tasks"]}[script]
    for name in names:
        assert name in out, out
    assert "FAILED" not in out, out
    assert "machine: " in out and speed._cpu_model() in out, out


def test_the_machine_line_names_the_cpu_and_its_cache():
    """Figures are only comparable on one host: the line printed above every table names the
    CPU model and its last-level cache (the project's VM came on an AMD and an Intel host)."""
    from pathlib import Path

    line = speed.machine()
    assert "CPUs, jax" in line and "load average" in line
    info = Path("/proc/cpuinfo")
    models = [ln.split(":", 1)[1].strip() for ln in info.read_text().splitlines()
              if ln.startswith("model name")] if info.exists() else []
    if not models:
        pytest.skip("no CPU model name in /proc/cpuinfo here")
    assert models[0] in line
    levels = sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/level"))
    if levels:
        top = max(int(p.read_text()) for p in levels)
        assert f"L{top} " in line


def test_iteration_table_times_native_and_xla_side_by_side(capsys):
    from crowdllm.aggregation import _native

    methods = ("mace", "glad", "bwa", "zbs", "ebcc")
    out = speed.iteration_table(n=2000, n_iter=4, repeats=1, methods=methods)
    paths = [(r["method"], r["path"]) for r in out["rows"]]
    native = _native.why_unavailable() is None
    expect = [(m, path) for m in methods
              for path in (("native", "xla") if native else ("xla",))]
    assert paths == expect
    for r in out["rows"]:
        assert r["run_s"] > 0 and r["accuracy"] > 0.9
        assert r["ms_per_iter"] == pytest.approx(r["run_s"] / 4 * 1e3)
        assert r["x_floor"] == pytest.approx(r["ms_per_iter"] / out["floor_ms_per_iter"])
    acc = {(r["method"], r["path"]): r["accuracy"] for r in out["rows"]}
    if native:  # the same fits, so the same labels
        assert acc["mace", "native"] == pytest.approx(acc["mace", "xla"], abs=1e-3)
        assert acc["glad", "native"] == pytest.approx(acc["glad", "xla"], abs=1e-3)
        assert acc["bwa", "native"] == pytest.approx(acc["bwa", "xla"], abs=1e-3)
        assert acc["ebcc", "native"] == pytest.approx(acc["ebcc", "xla"], abs=1e-3)
        assert acc["zbs", "native"] == acc["zbs", "xla"]
    # EBCC on the distinct rows: fewer than the tasks, and its own floor is theirs
    e = out["ebcc"]
    assert 0 < e["rows"] <= 2000
    assert e["floor_ms_per_iter"] == pytest.approx(
        e["rows"] * 50 * 4 * 2 / (out["copy_GBps"] * 1e9) * 1e3)
    # ZBS's own floor: the labels (12 bytes a task) of the 52 bytes a task of the DS floor
    assert out["zbs"]["floor_ms_per_iter"] == pytest.approx(out["floor_ms_per_iter"] * 12 / 52)
    printed = capsys.readouterr().out
    assert "EM / VB kernels, exactly 4 iterations" in printed and "x floor" in printed
    assert "zbs: its own floor (the int8 labels read once a round)" in printed
    assert f"ebcc: one restart on the {e['rows']:,} distinct rows" in printed


def test_iteration_table_xla_rows_make_no_native_call():
    """The XLA rows time XLA alone (as native="off" runs): no crowdllm FFI call in their
    programs, digamma and gammaln included; the native rows of the VB methods do call the
    native digamma, ZBS's its hard vote pass (GLAD's and BWA's native fits count rows on the
    host: not traced here)."""
    import re

    import jax

    from crowdllm.aggregation import _native

    labels, _ = speed.dense_panel(400)
    data, merged = speed.dense_data(labels), speed._merged(labels)
    native_call = {"ibcc": "crowdllm_digamma_gammaln", "mace": "crowdllm_digamma_gammaln",
                   "ebcc": "crowdllm_digamma_gammaln", "zbs": "crowdllm_ds_grouped_hard"}
    for method, (native_fn, xla_fn) in speed._iteration_fits().items():
        arg = merged if method == "ebcc" else data
        for path, fn in (("native", native_fn), ("xla", xla_fn)):
            if fn is None or (path == "native" and (_native.why_unavailable() is not None
                                                    or method not in native_call)):
                continue
            calls = set(re.findall(r"crowdllm_\w+", str(jax.make_jaxpr(lambda a: fn(a, 2))(arg))))
            if path == "xla":
                assert not calls, (method, calls)
            else:
                assert native_call[method] in calls, method


def test_ds_check_rows_name_the_native_kernel_and_crowdkit_ratio(capsys):
    pytest.importorskip("crowdkit")
    from crowdllm.aggregation import _native

    out = speed.ds_check(n=3000, n_iter=5, repeats=1, crowdkit_n=1000)
    names = [v["name"] for v in out["variants"]]
    if _native.why_unavailable() is None:
        assert names[:2] == ["native kernel, rows merged (default)", "native kernel, every row"]
        assert 0 < out["distinct_rows"] <= 3000 and out["native"] == "used"
    else:
        assert not any(n.startswith("native") for n in names) and out["native"] != "used"
    assert "fused E+M (_fast.ds_fit_dense)" in names and out["accuracy"] > 0.9
    for v in out["variants"]:
        assert v["run_s"] > 0 and v["x_crowdkit"] == pytest.approx(out["crowdkit_s_scaled"] / v["run_s"])
        assert v["x_floor"] == pytest.approx(v["run_s"] / 5 / (out["floor_ms_per_iter"] / 1e3))
    assert out["speedup"] == pytest.approx(max(v["x_crowdkit"] for v in out["variants"]))
    assert "native kernel:" in capsys.readouterr().out


def test_compile_log_plugin_records_each_compile_and_summarises(tmp_path, capsys):
    """benchmarks/compile_log.py, the plugin behind the suite's compile tables: a child pytest
    run with it logs one row per XLA compile, naming the test, function, shapes and seconds."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    bench = Path(__file__).resolve().parents[1] / "benchmarks"
    (tmp_path / "test_tiny.py").write_text(
        "import jax, jax.numpy as jnp\n"
        "def test_two_shapes():\n"
        "    f = jax.jit(lambda x: jnp.sin(x) * 2)\n"
        "    f(jnp.ones(3)); f(jnp.ones(5)); f(jnp.ones(3))\n")
    log = tmp_path / "compiles.jsonl"
    env = dict(os.environ, CROWDLLM_COMPILE_LOG=str(log), PYTHONPATH=str(bench),
               JAX_COMPILATION_CACHE_DIR="")
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "compile_log",
                          "-p", "no:cacheprovider", str(tmp_path / "test_tiny.py")],
                         env=env, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    lam = [r for r in rows if r["kind"] == "compile" and r["fun"] == "jit(<lambda>)"]
    assert len(lam) == 2  # one per shape: the third call reuses the first program
    assert all(r["test"].endswith("test_tiny.py::test_two_shapes") and r["s"] > 0 for r in lam)
    assert sorted("[3]" in r["shapes"] for r in lam) == [False, True]
    sys.path.insert(0, str(bench))
    try:
        import compile_log
        compile_log.summarise(str(log))
    finally:
        sys.path.remove(str(bench))
    out = capsys.readouterr().out
    assert f"{sum(r['kind'] == 'compile' for r in rows)} compiles" in out
    assert "test_tiny.py" in out and "jit(<lambda>)" in out
