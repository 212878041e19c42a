#!/usr/bin/env python
"""EBCC's whole fit on the native kernel, as ``benchmarks/speed.py iters`` times it, alone: one
restart, 10 subtypes, exactly ``--sweeps`` sweeps from the prepared distinct rows of a dense
``--tasks x 12 x 5`` panel (setup included), ms a sweep (median and min of ``--repeats`` fits,
compiled first).

To compare two checkouts on a noisy host, run it from each in turn, a few rounds:

    for r in 1 2 3 4; do for d in OLD NEW; do (cd $d && PYTHONPATH=$d \\
        python benchmarks/ebcc_fit_iters.py); done; done

(session 27: benchmarks/results/session27-amd-ebcc.txt). Needs the native kernels.
"""

from __future__ import annotations

import argparse
import statistics
import sys


def main(argv: list[str] | None = None) -> int:
    from crowdllm.aggregation import _native
    from crowdllm.eval import speed

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", type=int, default=1_000_000)
    ap.add_argument("--sweeps", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args(argv)
    print(f"machine: {speed.machine()}")
    if not _native.available():
        print(f"native kernels unavailable: {_native.why_unavailable()}")
        return 1
    labels, _ = speed.dense_panel(a.tasks)
    merged = speed._merged(labels)
    fit = speed._iteration_fits()["ebcc"][0]
    first, runs = speed._runs(lambda: fit(merged, a.sweeps), a.repeats)
    per = [r / a.sweeps * 1e3 for r in runs]
    print(f"EBCC, native, {int(merged[1].astype(bool).sum()):,} distinct rows of {a.tasks:,} x 12 "
          f"x 5, {a.sweeps} sweeps: {statistics.median(per):.2f} ms a sweep (min {min(per):.2f}; "
          f"first fit {first:.2f} s with compiling)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
