#!/usr/bin/env python
"""Dawid-Skene, one-coin DS, IBCC, MACE, BWA and GLAD on a sparse crowd (the COO layout): the
native passes against the XLA path, ms an iteration, side by side in one process.

    python benchmarks/coo_native.py --tasks 1000000

The crowd is ``speed.sparse_crowd``'s: N tasks, 10,000 annotators, 3 answers a task, 5
classes. Each method is fitted through its class (``layout="coo"``), with ``native="auto"``
(the sweep of ``native/ebcc.cc`` with one subtype a class; BWA: its ratio pass; GLAD:
``native/glad.cc``'s passes over rows of answer slots) and ``native="off"``, for 1 and for
``1 + --iters`` iterations (IBCC: sweeps; MACE: one restart); an iteration's time is the
difference over ``--iters``, the setup (preparing the rows, the start) in the first. The two
paths alternate, and each time is the smallest of ``--repeats`` fits after a compiling one.
Also printed: each fit's accuracy against the drawn truth (both paths agree).

``--control N``: N more tasks (control questions), each answered by ``--control-answers``
annotators (default 2,000) with the crowd's own accuracy. One such task makes the crowd's
rows tiered by width (``_native.coo_tiers``); before tiers, it sent every method to XLA. GLAD's
rows are ragged blocks instead (``_native.glad_coo_layout``); before them, such a crowd ran GLAD
on XLA.

    python benchmarks/coo_native.py --tasks 1000000 --control 20

``--most N``: each task keeps 1 to N of N drawn answers (uniformly), instead of 3 answers each.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", type=int, default=1_000_000)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--methods", default="ds,onecoin-ds,ibcc,mace,bwa,glad")
    ap.add_argument("--control", type=int, default=0)
    ap.add_argument("--control-answers", type=int, default=2000)
    ap.add_argument("--most", type=int, default=0)
    a = ap.parse_args()

    from crowdllm.aggregation import (BWA, GLAD, IBCC, MACE, DawidSkene, OneCoinDawidSkene, _core,
                                      _native)
    from crowdllm.eval.speed import machine, sparse_crowd
    from crowdllm.labels import LabelTensor

    warnings.filterwarnings("ignore", message=".*did not converge")
    n = a.tasks
    task, worker, label, truth = sparse_crowd(n, per_task=a.most or 3)
    if a.most:  # task t keeps its first k_t answers, k_t in 1 ... most
        keep = np.random.default_rng(2).integers(1, a.most + 1, n)
        kept = np.tile(np.arange(a.most), n) < np.repeat(keep, a.most)
        task, worker, label = task[kept], worker[kept], label[kept]
    if a.control:  # control tasks answered by many, each annotator right with p = 0.7
        rng = np.random.default_rng(1)
        c_truth = rng.integers(0, 5, a.control)
        c_task = np.repeat(np.arange(n, n + a.control), a.control_answers)
        c_worker = np.concatenate([rng.choice(10_000, a.control_answers, replace=False)
                                   for _ in range(a.control)])
        right = rng.random(c_task.size) < 0.7
        c_label = np.where(right, c_truth[c_task - n], rng.integers(0, 5, c_task.size))
        task, worker = np.concatenate([task, c_task]), np.concatenate([worker, c_worker])
        label, truth = np.concatenate([label, c_label]), np.concatenate([truth, c_truth])
        n += a.control
    tensor = LabelTensor(task=task, worker=worker, label=label, task_ids=np.arange(n),
                         worker_ids=np.arange(10_000), classes=np.arange(5))
    fixed = {"tol": -1.0}
    classes = {"ds": (DawidSkene, fixed), "onecoin-ds": (OneCoinDawidSkene, fixed),
               "ibcc": (IBCC, {"tol": None, "atol": -1.0}),
               "mace": (MACE, {"tol": -1.0, "n_restarts": 1}), "bwa": (BWA, fixed),
               "glad": (GLAD, fixed)}
    print(f"machine: {machine()}")
    print(f"# sparse crowd: {n:,} tasks, 10,000 annotators, {task.size:,} answers, 5 classes; "
          f"{a.iters} iterations timed; rows: "
          f"{_native.coo_layout(_core.prepare(tensor, layout='coo'), tensor)}")
    print(f"{'method':12s} {'native ms/it':>12s} {'XLA ms/it':>10s} {'ratio':>6s} "
          f"{'native setup s':>14s} {'XLA setup s':>11s} {'accuracy':>9s}")
    for name in a.methods.split(","):
        cls, kw = classes[name]
        best: dict[tuple[str, int], float] = {}
        models = {}
        for native in ("auto", "off"):
            for it in (1, 1 + a.iters):
                m = cls(layout="coo", native=native, max_iter=it, **kw)
                m.fit(tensor)  # compiles
                models[native, it] = m
        for _ in range(a.repeats):
            for native in ("auto", "off"):
                for it in (1, 1 + a.iters):
                    t0 = time.perf_counter()
                    models[native, it].fit(tensor)
                    dt = time.perf_counter() - t0
                    best[native, it] = min(best.get((native, it), np.inf), dt)
        assert models["auto", 1].native_used_ and not models["off", 1].native_used_
        per = {nat: (best[nat, 1 + a.iters] - best[nat, 1]) / a.iters * 1e3
               for nat in ("auto", "off")}
        acc = (models["auto", 1 + a.iters].label_codes_ == truth).mean()
        print(f"{name:12s} {per['auto']:12.1f} {per['off']:10.1f} {per['off'] / per['auto']:6.1f} "
              f"{best['auto', 1]:14.2f} {best['off', 1]:11.2f} {acc:9.4f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
