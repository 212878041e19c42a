#!/usr/bin/env python
"""What a sparse crowd's row layout costs the native sweep (``native/ebcc.cc``): a sweep's time
at several row widths (empty slots add a zero table row), and a kernel call's time on a few tasks
(what one more tier costs: ``_native.tier_call_slots``).

    python benchmarks/coo_row_width.py --tasks 1000000 --widths 4,5,6,8

The crowd is ``speed.sparse_crowd``'s (10,000 annotators, 3 answers a task, 5 classes). Each
width's sweep is timed ``--calls`` times, the medians of ``--repeats`` rounds printed, the
widths alternating between rounds.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", type=int, default=1_000_000)
    ap.add_argument("--widths", default="4,5,6,8")
    ap.add_argument("--calls", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()

    import jax
    import jax.numpy as jnp

    from crowdllm.aggregation import _core, _native
    from crowdllm.eval.speed import machine, sparse_crowd
    from crowdllm.labels import LabelTensor

    W, K = 10_000, 5
    rng = np.random.default_rng(0)

    def crowd(n):
        task, worker, label, _ = sparse_crowd(n)
        t = LabelTensor(task=task, worker=worker, label=label, task_ids=np.arange(n),
                        worker_ids=np.arange(W), classes=np.arange(K))
        return _core.prepare(t, layout="coo")

    bias = jnp.zeros(K)
    sweep = jax.jit(lambda rows, w, t, z: _native.ebcc_sweep(rows, w, bias, t, z, 1))

    def timed(rows, data):  # log confusion [annotators (padded), K, L]
        table = jnp.asarray(np.log(rng.dirichlet(np.ones(K), (data.n_workers, K)))
                            .astype(np.float32))
        z = jnp.full((data.n_tasks, K), 1 / K)
        jax.block_until_ready(sweep(rows, data.task_mask, table, z))
        ts = []
        for _ in range(a.calls):
            t0 = time.perf_counter()
            jax.block_until_ready(sweep(rows, data.task_mask, table, z))
            ts.append(time.perf_counter() - t0)
        return float(np.median(ts)) * 1e3

    print(f"machine: {machine()}")
    data = crowd(a.tasks)
    widths = [int(w) for w in a.widths.split(",")]
    rows = {w: jax.jit(lambda d, w=w: _native.ebcc_rows(d, w))(data) for w in widths}
    got: dict[int, list[float]] = {w: [] for w in widths}
    for _ in range(a.repeats):
        for w in widths:
            got[w].append(timed(rows[w], data))
    print(f"# {a.tasks:,} tasks x 3 answers, 10,000 annotators, 5 classes: ms a sweep")
    for w in widths:
        print(f"width {w:3d}: " + " ".join(f"{x:7.2f}" for x in got[w]))
    small = crowd(8)  # 8 tasks, among the same 10,000 annotators
    print(f"one call on 8 tasks (the same table): "
          f"{timed(jax.jit(lambda d: _native.ebcc_rows(d, 4))(small), small):.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
