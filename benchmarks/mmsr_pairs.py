#!/usr/bin/env python
"""M-MSR's annotator pair statistics on a sparse crowd: the native walk (``native/pairs.cc``)
against scipy's sparse products (one for the answered mask, one a class), side by side in one
process, each timed ``--repeats`` times (medians), the two alternating:

    python benchmarks/mmsr_pairs.py --tasks 1000000,10000000

Two crowds of 10,000 annotators, 3 answers a task, 5 classes: the speed harness's
(``speed.sparse_crowd``: each annotator shares tasks with 4 others) and one whose annotators are
drawn at random for each task (at 10M tasks ~45M distinct pairs). The counts must be equal;
the script stops if they differ. Then ``MMSR(layout="coo")``'s whole fit on each crowd
(compiled first; ``--no-fit`` skips it).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", default="1000000,10000000")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--fit", action=argparse.BooleanOptionalAction, default=True,
                    help="also time MMSR's whole fit on each crowd")
    a = ap.parse_args()

    from crowdllm.aggregation import MMSR, _native, mmsr
    from crowdllm.eval import speed
    from crowdllm.labels import LabelTensor

    print(f"machine: {speed.machine()}")
    if not _native.available():
        print(f"native kernels unavailable: {_native.why_unavailable()}")
        return 1
    W = 10_000
    print(f"{'crowd':>8s} {'tasks':>11s} {'pairs':>11s} {'scipy s':>8s} {'native s':>9s} "
          f"{'ratio':>6s}")
    for n in (int(x) for x in a.tasks.split(",")):
        harness, _ = speed.workload("mmsr", n, "coo")
        rng = np.random.default_rng(1)
        # three distinct random annotators a task: the third drawn from the W - 2 others,
        # shifted past the first two
        w0 = rng.integers(0, W, n)
        w1 = (w0 + rng.integers(1, W, n)) % W
        lo, hi = np.minimum(w0, w1), np.maximum(w0, w1)
        w2 = rng.integers(0, W - 2, n)
        w2 += w2 >= lo
        w2 += w2 >= hi
        worker = np.stack([w0, w1, w2], axis=1).reshape(-1).astype(np.int32)
        random_crowd = LabelTensor(task=harness.task, worker=worker, label=harness.label,
                                   task_ids=np.arange(n), worker_ids=np.arange(W),
                                   classes=np.arange(5))
        for name, t in (("harness", harness), ("random", random_crowd)):
            secs: dict[bool, list[float]] = {True: [], False: []}
            out = {}
            for _ in range(a.repeats):
                for native in (True, False):
                    s = time.perf_counter()
                    out[native] = mmsr.sparse_pair_statistics(t, native=native)
                    secs[native].append(time.perf_counter() - s)
                for x, y in zip(out[True], out[False]):
                    if not np.array_equal(x, y):
                        print("the native counts differ from scipy's")
                        return 1
                out.clear()
            nat, ref = statistics.median(secs[True]), statistics.median(secs[False])
            pairs = len(mmsr.sparse_pair_statistics(t, native=True)[0])
            print(f"{name:>8s} {n:>11,d} {pairs:>11,d} {ref:8.2f} {nat:9.2f} {ref / nat:6.1f}",
                  flush=True)
        for name, t in (("harness", harness), ("random", random_crowd)) if a.fit else ():
            MMSR(max_iter=50, layout="coo").fit(t)  # compiled
            fits = []
            for _ in range(a.repeats):
                s = time.perf_counter()
                MMSR(max_iter=50, layout="coo").fit(t)
                fits.append(time.perf_counter() - s)
            print(f"  MMSR(max_iter=50, layout='coo').fit, {name} crowd, {n:,} tasks: "
                  f"{statistics.median(fits):.2f} s (median of {a.repeats})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
