#!/usr/bin/env python
"""Peak memory of Dawid-Skene on a large sparse crowd (COO): N answers, 10,000 annotators,
3 answers per task, 5 classes.

    nice python benchmarks/coo_memory.py --answers 100000000 --iters 10

Prints the peak RSS (``resource.getrusage``) after each stage: drawing the answers, building
the label tensor, ``prepare`` (device arrays, bucketed), and the fit.
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
    a = ap.parse_args()
    n = a.answers // 3
    t0 = time.perf_counter()

    def stage(name: str) -> None:
        print(f"{name:28s} {time.perf_counter() - t0:8.1f} s   peak RSS {peak_rss_gib():6.2f} GiB",
              flush=True)

    import jax

    from crowdllm.aggregation import _core, dawid_skene
    from crowdllm.labels import LabelTensor
    stage("imports")
    task, worker, label, truth = sparse_crowd(n)
    stage(f"drew {task.shape[0]:,} answers")
    tensor = LabelTensor(task=task, worker=worker, label=label, task_ids=np.arange(n),
                         worker_ids=np.arange(10_000), classes=np.arange(5))
    del task, worker, label
    stage("label tensor")
    data = _core.prepare(tensor, layout="coo")
    del tensor
    stage(f"prepare (answers padded to {data.task.shape[0]:,})")
    res = dawid_skene.fit(data, max_iter=a.iters, tol=-1.0)
    jax.block_until_ready(res.posteriors)
    stage(f"DS fit, {int(res.n_iter)} iterations")
    acc = float((np.asarray(res.posteriors)[:n].argmax(1) == truth).mean())
    print(f"accuracy vs truth {acc:.3f}; peak RSS {peak_rss_gib():.2f} GiB", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
