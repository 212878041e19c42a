#!/usr/bin/env python
"""Every aggregator fitted on the accelerator and on the CPU of the same machine, side by side.

The tests check every method against crowd-kit and the reference paths on CPU; this checks
that the accelerator computes the same thing (float32 reductions run in another order there, so
posteriors agree to rounding, not bit for bit). Per method and layout: the share of tasks
whose label agrees, and the largest posterior difference. Exit 1 if a label share is under
``--min-agree`` or a posterior differs by more than ``--atol``.

    python benchmarks/gpu_parity.py --n 2000 --layouts dense,coo

On a machine without an accelerator both sides run on the CPU (the check is then trivial).
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np


def main(argv: list[str] | None = None) -> int:
    import jax

    from crowdllm.aggregation import METHODS
    from crowdllm.eval import speed

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2000, help="tasks of the dense panel (x 12 x 5)")
    ap.add_argument("--layouts", default="dense,coo")
    ap.add_argument("--methods", default="", help="comma-separated (default: all but "
                                                   "ds-bayes and llm-judge)")
    ap.add_argument("--atol", type=float, default=1e-3)
    ap.add_argument("--min-agree", type=float, default=0.999)
    a = ap.parse_args(argv)
    methods = [m for m in a.methods.split(",") if m] or \
        [m for m in METHODS if m not in ("ds-bayes", "llm-judge")]
    cpu = jax.devices("cpu")[0]
    print(f"machine: {speed.machine()}")
    print(f"accelerator: {jax.devices()[0].device_kind} ({jax.default_backend()}); "
          f"reference: {cpu.device_kind} (cpu); jax {jax.__version__}")
    print(f"{'method':12s} {'layout':6s} {'labels agree':>12s} {'max |dp|':>10s} "
          f"{'accel s':>8s} {'cpu s':>8s}")
    bad = 0
    for layout in [l for l in a.layouts.split(",") if l]:
        for m in methods:
            tensor, _ = speed.workload(m, a.n, "dense")
            cls = METHODS[m]
            kw = {k: v for k, v in speed.PARAMS.get(m, {}).items() if k in cls.parameters()}
            if "layout" in cls.parameters():
                kw["layout"] = layout
            elif layout != "dense":
                continue
            try:
                t = time.perf_counter()
                acc = cls(**kw).fit(tensor)
                t_acc = time.perf_counter() - t
                with jax.default_device(cpu):
                    t = time.perf_counter()
                    ref = cls(**kw).fit(tensor)
                    t_cpu = time.perf_counter() - t
            except Exception as e:  # one method's failure must not hide the others'
                bad += 1
                print(f"{m:12s} {layout:6s} FAILED: {type(e).__name__}: {e}"[:200], flush=True)
                continue
            agree = float((acc.label_codes_ == ref.label_codes_).mean())
            dp = float(np.abs(np.asarray(acc.probas_, np.float64)
                              - np.asarray(ref.probas_, np.float64)).max())
            ok = agree >= a.min_agree and dp <= a.atol
            bad += not ok
            print(f"{m:12s} {layout:6s} {agree:12.4f} {dp:10.2e} {t_acc:8.2f} {t_cpu:8.2f}"
                  f"{'' if ok else '  <- differs'}", flush=True)
    print("all agree" if not bad else f"{bad} method(s) differ or failed")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
