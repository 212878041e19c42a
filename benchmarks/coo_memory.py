#!/usr/bin/env python
"""Peak memory of Dawid-Skene on a large sparse crowd (COO): N answers, 10,000 annotators,
3 answers per task, 5 classes.

    nice python benchmarks/coo_memory.py --answers 100000000 --iters 10

Prints the peak RSS (``resource.getrusage``) after each stage: drawing the answers, building
the label tensor, ``prepare`` (device arrays, bucketed), and the fit: on the path
``DawidSkene`` takes (the native sweep, where it applies), or with ``--xla`` on the XLA path.

With ``--parquet FOLDER`` it measures what a user runs instead: the answers are written to
``FOLDER/answers.parquet`` (integer task, worker and label columns), then
``crowdllm aggregate FOLDER/answers.parquet -m ds --max-iter N --tol -1 -o
FOLDER/labels.parquet`` runs in a child process (the file read with pyarrow, no pandas), and
the child's peak RSS is printed (``RUSAGE_CHILDREN``: the drawing is not in it):

    nice python benchmarks/coo_memory.py --answers 100000000 --iters 50 --parquet /tmp/coo

``--csv FOLDER`` does the same with a CSV file whose ids are strings (``t17``, ``w3``), every
column read as text, as a CSV of real ids is.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from crowdllm.eval.speed import peak_rss_gib, sparse_crowd  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--answers", type=int, default=100_000_000)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--parquet", metavar="FOLDER",
                    help="write the answers here as Parquet and time `crowdllm aggregate` on it")
    ap.add_argument("--csv", metavar="FOLDER",
                    help="the same with a CSV file of string ids")
    ap.add_argument("--xla", action="store_true",
                    help="in memory: the XLA path, not the native sweep DawidSkene runs")
    a = ap.parse_args()
    n = a.answers // 3
    t0 = time.perf_counter()
    if a.parquet or a.csv:
        return via_file(n, a.iters, Path(a.parquet or a.csv), "parquet" if a.parquet else "csv", t0)

    def stage(name: str) -> None:
        print(f"{name:28s} {time.perf_counter() - t0:8.1f} s   peak RSS {peak_rss_gib():6.2f} GiB",
              flush=True)

    import jax

    from crowdllm.aggregation import _core, _native, dawid_skene
    from crowdllm.labels import LabelTensor
    stage("imports")
    task, worker, label, truth = sparse_crowd(n)
    stage(f"drew {task.shape[0]:,} answers")
    tensor = LabelTensor(task=task, worker=worker, label=label, task_ids=np.arange(n),
                         worker_ids=np.arange(10_000), classes=np.arange(5))
    del task, worker, label
    stage("label tensor")
    data = _core.prepare(tensor, layout="coo")
    stage(f"prepare (answers padded to {data.task.shape[0]:,})")
    # the path DawidSkene takes (the native sweep where it applies), or XLA's with --xla
    native, width = (False, None) if a.xla else _native.coo_use("auto", data, tensor)
    del tensor
    if native:
        res = _native.ds_fit(data, max_iter=a.iters, tol=-1.0, width=width)
    else:
        res = dawid_skene.fit(data, max_iter=a.iters, tol=-1.0)
    jax.block_until_ready(res.posteriors)
    stage(f"DS fit ({'native' if native else 'XLA'}), {int(res.n_iter)} iterations")
    acc = float((np.asarray(res.posteriors)[:n].argmax(1) == truth).mean())
    print(f"accuracy vs truth {acc:.3f}; peak RSS {peak_rss_gib():.2f} GiB", flush=True)
    return 0


def via_file(n: int, iters: int, folder: Path, fmt: str, t0: float) -> int:
    """The command-line path on a Parquet or CSV file of the drawn answers; the child's peak
    RSS."""
    import resource
    import subprocess

    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    src, out = folder / f"answers.{fmt}", folder / "labels.parquet"
    task, worker, label, truth = sparse_crowd(n)
    cols = {"task": task.astype(np.int64), "worker": worker.astype(np.int64),
            "label": label.astype(np.int64)}
    if fmt == "parquet":
        pq.write_table(pa.table(cols), src)
    else:  # string ids, as a CSV of real ids has
        def ids(prefix, v):
            return pc.binary_join_element_wise(pa.scalar(prefix), pa.array(v).cast(pa.string()), "")

        pcsv.write_csv(pa.table({"task": ids("t", cols["task"]), "worker": ids("w", cols["worker"]),
                                 "label": pa.array(cols["label"]).cast(pa.string())}), src)
    n_answers = task.shape[0]
    del task, worker, label, cols
    print(f"wrote {n_answers:,} answers to {src} ({src.stat().st_size / 2**30:.2f} GiB) "
          f"{time.perf_counter() - t0:8.1f} s", flush=True)
    cmd = [sys.executable, "-m", "crowdllm.cli", "aggregate", str(src), "-m", "ds",
           "--max-iter", str(iters), "--tol", "-1", "-o", str(out)]
    print("$ " + " ".join(cmd[2:]), flush=True)
    t1 = time.perf_counter()
    subprocess.run(cmd, check=True)
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
    labels = pq.read_table(out, columns=["task", "label"])
    if fmt == "parquet":
        order = np.argsort(labels.column("task").to_numpy())
        acc = float((labels.column("label").to_numpy()[order] == truth).mean())
    else:
        tid = pc.cast(pc.utf8_slice_codeunits(labels.column("task"), 1), pa.int64()).to_numpy()
        lab = pc.cast(labels.column("label"), pa.int64()).to_numpy()
        acc = float((lab == truth[tid]).mean())
    print(f"crowdllm aggregate: {time.perf_counter() - t1:.1f} s, peak RSS {peak:.2f} GiB; "
          f"{labels.num_rows:,} tasks labelled, accuracy vs truth {acc:.3f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
