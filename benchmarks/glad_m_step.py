#!/usr/bin/env python
"""GLAD's M-step: one native call (``_native.glad_m``) against JAX's Adam and loop around the
native gradient and Q passes (the path it replaced), side by side in one process.

On the speed harness's dense panel (``crowdllm.eval.speed.dense_panel``: n x 12 x 5), the
native GLAD fit (``_native.glad_fit``) of exactly ``--iters`` iterations from the prepared panel
(the rows' merge included), with ``m_step="native"`` and ``m_step="jax"``: each compiled first,
then ``--repeats`` rounds, each path timed once a round in alternating order (the host's noise
reaches both alike). Prints ms per iteration (min and median), the ratio of the medians, and
how far apart the two fits' posteriors are:

    python benchmarks/glad_m_step.py --n 1000000

Needs the native kernels (x86-64 with AVX2 and FMA, a C++ compiler).
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np


def main(argv: list[str] | None = None) -> int:
    import jax

    from crowdllm.aggregation import _native
    from crowdllm.eval import speed

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args(argv)
    if not _native.available():
        print(f"native kernels unavailable: {_native.why_unavailable()}")
        return 1
    print(f"machine: {speed.machine()}", flush=True)
    labels, truth = speed.dense_panel(a.n)
    data = speed.dense_data(labels)
    paths = ("native", "jax")

    def fit(path):
        return _native.glad_fit(data, max_iter=a.iters, tol=-1.0, m_step=path).posteriors

    post = {}
    for p in paths:
        speed._progress(f"compiling the fit with m_step={p} ...")
        post[p] = np.asarray(jax.block_until_ready(fit(p)))[:a.n]
    times: dict[str, list[float]] = {p: [] for p in paths}
    for r in range(a.repeats):
        speed._progress(f"round {r + 1} of {a.repeats} ...")
        for p in paths if r % 2 == 0 else paths[::-1]:
            t0 = time.perf_counter()
            jax.block_until_ready(fit(p))
            times[p].append((time.perf_counter() - t0) / a.iters * 1e3)
    med = {p: float(np.median(times[p])) for p in paths}
    print(f"\nGLAD, exactly {a.iters} iterations, dense {a.n:,} x 12 x 5, "
          f"{a.repeats} alternating rounds")
    print("| M-step | ms/iter min | ms/iter median | x native | accuracy |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for p in paths:
        acc = float((post[p].argmax(1) == truth).mean())
        print(f"| {p} | {min(times[p]):.2f} | {med[p]:.2f} | {med[p] / med['native']:.2f} "
              f"| {acc:.4f} |")
    print(f"max |posterior difference| between the two fits: "
          f"{np.abs(post['native'] - post['jax']).max():.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
