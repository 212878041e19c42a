#!/usr/bin/env python
"""MACE's restarts on the XLA path: run one after another (``lax.map``, what ``fit_restarts``
does) against run together under ``vmap`` (what it did up to session 12), side by side in one
process on the synthetic sparse crowd (N tasks x 3 answers, 10,000 annotators, 5 classes):
compile seconds, then the minimum of a few timed fits, and whether both keep the same best
objective.

    python benchmarks/restarts_speed.py --n 100000
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from crowdllm.aggregation import mace  # noqa: E402
from crowdllm.aggregation._core import prepare  # noqa: E402
from crowdllm.eval import speed  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--restarts", type=int, default=10)
    ap.add_argument("--method", choices=("vb", "em"), default="vb")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    tensor, _ = speed.workload("mace", args.n, "sparse")
    data = prepare(tensor, layout="coo")
    keys = jax.random.split(jax.random.key(0), args.restarts)
    kw = dict(max_iter=50, tol=1e-5, method=args.method, smoothing=0.01 / 5, a=0.5, b=0.5,
              gamma=10.0, default_noise=0.5, init_from_gold=False, learn_prior=True)

    def one(d, k):
        return mace.fit_one(d, k, **kw)

    # the data are arguments, not constants of the program (XLA would fold their scatters)
    runs = {"lax.map": jax.jit(lambda d, ks: jax.lax.map(lambda k: one(d, k), ks)),
            "vmap": jax.jit(lambda d, ks: jax.vmap(lambda k: one(d, k))(ks))}
    print(f"machine: {speed.machine()}")
    print(f"MACE ({args.method}), {args.restarts} restarts, sparse crowd {args.n:,} tasks x 3")
    print("| restarts run | compile s | fit s (min of %d) | best objective | iterations |"
          % args.repeats)
    print("| --- | ---: | ---: | ---: | --- |")
    for name, f in runs.items():
        t0 = time.perf_counter()
        compiled = f.lower(data, keys).compile()
        c = time.perf_counter() - t0
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            res = jax.block_until_ready(compiled(data, keys))
            times.append(time.perf_counter() - t0)
        print(f"| {name} | {c:.2f} | {min(times):.2f} | {float(np.max(res.objective)):.6f} | "
              f"{' '.join(map(str, np.asarray(res.n_iter)))} |", flush=True)


if __name__ == "__main__":
    main()
