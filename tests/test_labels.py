"""The label tensor and its I/O: formats, vocabularies, duplicates, gold, and every bad-input error."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from crowdllm.labels import CrowdDataError, LabelTensor, read_answers, read_gold, write_table

ROWS = [("t1", "w1", "b"), ("t1", "w2", "a"), ("t2", "w1", "a"), ("t3", "w3", "c"), ("t2", "w2", "a")]


def write_csv(path, rows, header=("task", "worker", "label")):
    path.write_text(",".join(header) + "\n" + "".join(",".join(r) + "\n" for r in rows))
    return path


def test_csv_parquet_jsonl_dataframe_and_arrow_agree(tmp_path):
    csv = write_csv(tmp_path / "a.csv", ROWS)
    table = pa.table({k: [r[i] for r in ROWS] for i, k in enumerate(("task", "worker", "label"))})
    pq.write_table(table, tmp_path / "a.parquet")
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(dict(zip(("task", "worker", "label"), r))) + "\n" for r in ROWS))
    tensors = [read_answers(csv), read_answers(tmp_path / "a.parquet"), read_answers(tmp_path / "a.jsonl"),
               LabelTensor.from_arrow(table), LabelTensor.from_frame(table.to_pandas()),
               LabelTensor.coerce(str(csv))]
    for t in tensors:
        assert t.task_ids.tolist() == ["t1", "t2", "t3"]  # first-seen order
        assert t.worker_ids.tolist() == ["w1", "w2", "w3"]
        assert t.classes.tolist() == ["a", "b", "c"]  # sorted
        assert t.task.tolist() == [0, 0, 1, 2, 1]
        assert t.label.tolist() == [1, 0, 0, 2, 0]
        assert t.task.dtype == np.int32 and t.label.dtype == np.int32
    back = tensors[0].to_arrow()
    assert back.to_pylist()[0] == {"task": "t1", "worker": "w1", "label": "b"}


def test_a_file_read_in_many_chunks_encodes_as_one_chunk(tmp_path):
    """Parquet's row groups arrive as chunks, with ids repeating across them: the codes follow
    first appearance over the whole file, as for one chunk (integer and string ids, and a
    label vocabulary first seen in the last chunk)."""
    rng = np.random.default_rng(0)
    n = 5000
    task = rng.integers(0, 700, n) * 3 + 11
    worker = np.array([f"w{i}" for i in rng.integers(0, 40, n)])
    label = rng.choice(["a", "b"], n)
    label[-1] = "z"
    one = pa.table({"task": task, "worker": worker, "label": label})
    pq.write_table(one, tmp_path / "a.parquet", row_group_size=97)
    read = pq.read_table(tmp_path / "a.parquet")
    assert read.column("task").num_chunks > 50
    ref, t = LabelTensor.from_arrow(one.combine_chunks()), read_answers(tmp_path / "a.parquet")
    seen_task = list(dict.fromkeys(task.tolist()))
    assert t.task_ids.tolist() == seen_task and ref.task_ids.tolist() == seen_task
    assert t.worker_ids.tolist() == list(dict.fromkeys(worker.tolist()))
    assert t.classes.tolist() == ["a", "b", "z"]
    for f in ("task", "worker", "label"):
        np.testing.assert_array_equal(getattr(t, f), getattr(ref, f))
    np.testing.assert_array_equal(t.task, [seen_task.index(x) for x in task.tolist()])


def test_parquet_reads_only_the_answer_columns(tmp_path, monkeypatch):
    """A run's Parquet file can hold long texts beside the answers: only the three columns are
    read. A file without one of them still gets the error that lists the columns it has."""
    import crowdllm.labels as labels_mod

    table = pa.table({"task": ["t1", "t2"], "worker": ["w", "w"], "label": ["a", "b"],
                      "response": ["x" * 1000, "y" * 1000], "latency_s": [0.1, 0.2]})
    pq.write_table(table, tmp_path / "run.parquet")
    asked = []
    real = labels_mod.read_table
    monkeypatch.setattr(labels_mod, "read_table",
                        lambda path, columns=None: asked.append(columns) or real(path, columns=columns))
    t = read_answers(tmp_path / "run.parquet")
    assert asked == [["task", "worker", "label"]]
    assert t.task_ids.tolist() == ["t1", "t2"] and t.classes.tolist() == ["a", "b"]
    t = read_answers(tmp_path / "run.parquet", label_col="response")
    assert asked[-1] == ["task", "worker", "response"] and t.n_classes == 2
    pq.write_table(table.drop(["label"]), tmp_path / "nolabel.parquet")
    with pytest.raises(CrowdDataError) as e:
        read_answers(tmp_path / "nolabel.parquet")
    assert asked[-1] is None
    assert "'label'" in str(e.value) and "response" in str(e.value) and "latency_s" in str(e.value)


def test_ids_are_kept_as_written_and_numeric_labels_sort_numerically(tmp_path):
    p = write_csv(tmp_path / "a.csv", [("007", "w", "10"), ("7", "w", "2"), ("8", "w", "9")])
    t = read_answers(p)
    assert t.task_ids.tolist() == ["007", "7", "8"]
    assert t.classes.tolist() == ["2", "9", "10"]


def test_column_names_can_be_overridden(tmp_path):
    p = write_csv(tmp_path / "a.csv", ROWS, header=("item", "annotator", "answer"))
    t = read_answers(p, task_col="item", worker_col="annotator", label_col="answer")
    assert t.n_answers == 5
    with pytest.raises(CrowdDataError) as e:
        read_answers(p)
    msg = str(e.value)
    assert "a.csv" in msg and "'task'" in msg and "'worker'" in msg and "item" in msg


def test_dense_view_and_from_dense_roundtrip():
    t = LabelTensor.from_arrays(*zip(*ROWS))
    d = t.dense()
    assert d.dtype == np.int8 and d.shape == (3, 3)
    assert d.tolist() == [[1, 0, -1], [0, 0, -1], [-1, -1, 2]]
    t2 = LabelTensor.from_dense(d, classes=t.classes)
    assert np.array_equal(t2.dense(), d)
    assert t.density == pytest.approx(5 / 9)


def _columns_in_runs(rng, n):
    """Id columns of every shape the run encoding meets: sorted, grouped out of order, grouped
    with a value coming back later, long runs, no runs, text, one value, and chunked."""
    sorted_ids = np.repeat(np.sort(rng.choice(10**9, 300, replace=False)), rng.integers(1, 9, 300))
    grouped = np.repeat(rng.permutation(400) * 7 - 900, rng.integers(1, 6, 400))
    back = np.repeat(rng.integers(0, 30, 500), rng.integers(1, 5, 500))  # values come back
    long_runs = np.repeat(rng.integers(0, 10, 40), 40)
    cols = {"sorted": pa.array(sorted_ids[:n]), "grouped": pa.array(grouped[:n]),
            "back": pa.array(back[:n]), "long": pa.array(long_runs),
            "no runs": pa.array(rng.integers(0, 50, n)),
            "text": pa.array([f"t{x}" for x in grouped[:n]]),
            "large text": pa.array([f"t{x}" for x in back[:n]], pa.large_string()),
            "one value": pa.array(np.full(n, 5, np.int32)), "one answer": pa.array([3]),
            "chunked": pa.chunked_array([pa.array(back[:n // 3]), pa.array(back[n // 3:n])]),
            "float": pa.array(np.repeat([0.5, -0.0, 0.0, 2.0], 4)),
            "uint8": pa.array(np.repeat(np.array([3, 1, 3, 200], np.uint8), 3))}
    return cols


def test_run_encoding_equals_one_dictionary_over_the_column():
    """A column in runs (a file written task by task) is encoded by its runs' first values: the
    codes and vocabulary equal a dictionary encoding of the whole column, whatever the runs."""
    from crowdllm.labels import _encode_first_seen, _run_breaks

    rng = np.random.default_rng(1)
    cols = _columns_in_runs(rng, 1000)
    took_runs = []
    for name, col in cols.items():
        whole = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
        ref = pc.dictionary_encode(whole)
        codes, vocab = _encode_first_seen(col)
        np.testing.assert_array_equal(codes, ref.indices.to_numpy(), err_msg=name)
        assert codes.dtype == np.int32
        assert vocab.tolist() == ref.dictionary.to_pylist(), name
        assert all(type(v) is type(w) for v, w in zip(vocab.tolist(), ref.dictionary.to_pylist()))
        if _run_breaks(whole) is not None:
            took_runs.append(name)
    assert set(took_runs) == {"sorted", "grouped", "back", "long", "one value", "chunked", "uint8"}


def _repeats_by_dict(task, worker, last):
    seen, out = {}, np.zeros(len(task), bool)
    idx = range(len(task) - 1, -1, -1) if last else range(len(task))
    for i in idx:
        key = (int(task[i]), int(worker[i]))
        out[i] = key in seen
        seen[key] = True
    return out


@pytest.mark.parametrize("shape", ["grouped", "grouped, 30 a task", "scattered"])
def test_repeated_answers_found_as_a_dict_finds_them(shape):
    """The repeated (task, worker) answers, by neighbours within a task's run or by sorting,
    are those a dict of the pairs seen finds, first or last kept."""
    from crowdllm.labels import _repeats

    rng = np.random.default_rng(2)
    per = 30 if "30" in shape else 6
    task = np.repeat(np.arange(300), rng.integers(1, per + 1, 300)).astype(np.int32)
    worker = rng.integers(0, per, len(task)).astype(np.int32)
    if shape == "scattered":
        order = rng.permutation(len(task))
        task, worker = task[order], worker[order]
    for last in (False, True):
        ref = _repeats_by_dict(task, worker, last)
        assert ref.sum() > 20
        np.testing.assert_array_equal(_repeats(task, worker, per, last=last), ref)
    one = np.zeros(1, np.int32)
    assert not _repeats(one, one, 1).any()


def test_duplicates_keep_first_last_error(tmp_path):
    rows = [("t1", "w1", "a"), ("t1", "w1", "b"), ("t2", "w1", "a"), ("t1", "w1", "c")]
    p = write_csv(tmp_path / "d.csv", rows)
    keep = read_answers(p)
    assert keep.n_answers == 4 and keep.n_duplicates == 2 and keep.has_repeats
    first = read_answers(p, duplicates="first")
    assert first.n_answers == 2 and not first.has_repeats
    assert first.classes[first.label].tolist() == ["a", "a"]
    last = read_answers(p, duplicates="last")
    assert sorted(last.classes[last.label].tolist()) == ["a", "c"]
    assert last.n_duplicates == 2  # reported, even though dropped
    with pytest.raises(CrowdDataError) as e:
        read_answers(p, duplicates="error")
    msg = str(e.value)
    assert "d.csv" in msg and "row 2 (line 3)" in msg and "'w1'" in msg and "'t1'" in msg
    with pytest.raises(CrowdDataError, match="dense"):
        keep.dense()


def test_zencrowd_duplicates_are_counted(data_dir):
    t = read_answers(data_dir / "zencrowd_all" / "answers.csv")
    pairs = pd.read_csv(data_dir / "zencrowd_all" / "answers.csv").groupby(["task", "worker"]).size()
    assert t.n_duplicates == int((pairs - 1).sum()) > 0
    assert t.n_answers == 21855


@pytest.mark.parametrize("content,needle", [
    ("", "empty"),
    ("task,worker,label\n", "no answers"),
    ("task,worker,label\nt1,w1,a\nt2,w2,\n", "row 2 (line 3), column 'label': empty value"),
    ("task,worker,label\nt1,w1,a\n,w2,b\n", "row 2 (line 3), column 'task'"),
    ("task,worker,label\nt1,w1,a\nt2,  ,b\n", "column 'worker'"),
    ("task,worker\nt1,w1\n", "missing column(s) 'label'"),
    ("task,worker,label\nt1,w1,a,extra\n", "could not read"),
])
def test_bad_csv_errors_name_file_row_and_column(tmp_path, content, needle):
    p = tmp_path / "bad.csv"
    p.write_text(content)
    with pytest.raises(CrowdDataError) as e:
        read_answers(p)
    assert "bad.csv" in str(e.value)
    assert needle in str(e.value)


def test_null_label_in_parquet_and_jsonl(tmp_path):
    pq.write_table(pa.table({"task": ["a", "b"], "worker": ["w", "w"], "label": ["x", None]}), tmp_path / "n.parquet")
    with pytest.raises(CrowdDataError, match=r"n\.parquet: row 2, column 'label': empty value"):
        read_answers(tmp_path / "n.parquet")
    (tmp_path / "n.jsonl").write_text('{"task": "a", "worker": "w", "label": "x"}\n{"task": "b", "worker": "w", "label": null}\n')
    with pytest.raises(CrowdDataError, match=r"n\.jsonl: row 2 \(line 2\), column 'label'"):
        read_answers(tmp_path / "n.jsonl")


def test_unreadable_missing_and_unknown_files(tmp_path):
    with pytest.raises(CrowdDataError, match="no such file"):
        read_answers(tmp_path / "missing.csv")
    (tmp_path / "x.xlsx").write_text("junk")
    with pytest.raises(CrowdDataError, match="unknown file type"):
        read_answers(tmp_path / "x.xlsx")
    (tmp_path / "garbage.parquet").write_bytes(b"\x00\x01 not parquet at all")
    with pytest.raises(CrowdDataError, match="garbage.parquet: could not read it as parquet"):
        read_answers(tmp_path / "garbage.parquet")
    with pytest.raises(CrowdDataError, match="folder has no answers"):
        read_answers(tmp_path)


def test_label_outside_a_given_schema_is_named(tmp_path):
    p = write_csv(tmp_path / "s.csv", [("t1", "w1", "a"), ("t2", "w1", "zzz")])
    with pytest.raises(CrowdDataError, match=r"s\.csv: row 2 \(line 3\), column 'label': label 'zzz' is not in the schema"):
        read_answers(p, classes=["a", "b"])
    t = read_answers(p, classes=["zzz", "b", "a"])
    assert t.classes.tolist() == ["zzz", "b", "a"] and t.label.tolist() == [2, 0]


def test_gold_attach_unknown_label_and_unknown_task(tmp_path):
    p = write_csv(tmp_path / "a.csv", ROWS)
    g = tmp_path / "gold.csv"
    g.write_text("task,label\nt1,b\nt2,new\nt9,a\n")
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        t = read_answers(p, gold=g)
    messages = " ".join(str(x.message) for x in w)
    assert "['new']" in messages and "nobody chose" in messages
    assert "1 gold row(s) name tasks that have no answers" in messages
    assert t.classes.tolist() == ["a", "b", "c", "new"]
    assert t.gold.tolist() == [1, 3, -1]
    assert read_gold(g) == {"t1": "b", "t2": "new", "t9": "a"}


def test_gold_errors(tmp_path):
    t = LabelTensor.from_arrays(*zip(*ROWS))
    g = tmp_path / "g.csv"
    g.write_text("task,label\nt1,a\nt1,b\n")
    with pytest.raises(CrowdDataError, match=r"g\.csv: row 2 \(line 3\): task 't1' has two different gold labels"):
        t.with_gold(g)
    g.write_text("task,label\nt1,\n")
    with pytest.raises(CrowdDataError, match=r"g\.csv: row 1 \(line 2\), column 'label': empty value"):
        t.with_gold(g)
    g.write_text("item,label\nt1,a\n")
    with pytest.raises(CrowdDataError, match=r"g\.csv: missing column"):
        t.with_gold(g)


def test_select_workers_keeps_tasks_and_classes():
    t = LabelTensor.from_arrays(*zip(*ROWS))
    s = t.select_workers(["w1"])
    assert s.n_tasks == 3 and s.n_classes == 3 and s.n_workers == 1 and s.n_answers == 2
    with pytest.raises(CrowdDataError, match="unknown worker"):
        t.select_workers(["nobody"])


@pytest.mark.parametrize("ext", ["csv", "parquet", "jsonl"])
def test_write_table_roundtrip(tmp_path, ext):
    table = pa.table({"task": ["a", "b"], "label": ["x", "y"], "p_x": [0.75, 0.25]})
    out = write_table(table, tmp_path / "sub" / f"out.{ext}")
    back = read_answers.__globals__["read_table"](out)
    assert back.column("task").to_pylist() == ["a", "b"]
    assert [float(v) for v in back.column("p_x").to_pylist()] == [0.75, 0.25]
    assert [f.name for f in (tmp_path / "sub").iterdir()] == [f"out.{ext}"]  # no temp files left


def test_write_table_failure_keeps_the_old_file(tmp_path, monkeypatch):
    out = tmp_path / "out.parquet"
    write_table(pa.table({"a": [1]}), out)
    before = out.read_bytes()

    def boom(table, where, *a, **k):
        with open(where, "wb") as fh:
            fh.write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(pq, "write_table", boom)
    with pytest.raises(OSError, match="disk full"):
        write_table(pa.table({"a": [2]}), out)
    assert out.read_bytes() == before
    assert [f.name for f in tmp_path.iterdir()] == ["out.parquet"]
