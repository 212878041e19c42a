#!/usr/bin/env python
"""EBCC's sweep on the native kernel (``_native.ebcc_sweep``, ``native/ebcc.cc``) against the
XLA sweep (``_fast.subtype_sweep``: the E-step and both sums as one-hot matrix products), and
both against the same sweep in float64 numpy.

On the distinct rows of a dense panel (EBCC merges identical rows, each with its count as
weight), from one random state of the parameters, it checks that both compute the same sweep
(class posteriors, log-likelihood, counts, column sums, largest move) and times each (medians,
compiled first):

    python benchmarks/ebcc_sweep_native.py --tasks 1000000

The kernel was prototyped here (session 18) before it went into the package (session 19).
Needs the native kernels (x86-64 with AVX2 and FMA, a C++ compiler).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np


def main(argv: list[str] | None = None) -> int:
    import jax
    import jax.numpy as jnp

    from crowdllm.aggregation import _fast, _native
    from crowdllm.aggregation._core import Dense
    from crowdllm.eval import speed

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", type=int, default=1_000_000)
    ap.add_argument("--classes", type=int, default=5)
    ap.add_argument("--subtypes", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args(argv)
    print(f"machine: {speed.machine()}")
    labels, _ = speed.dense_panel(a.tasks, n_classes=a.classes)
    rows, counts = np.unique(labels, axis=0, return_counts=True)
    U, W = rows.shape
    K = L = int(labels.max()) + 1
    M = a.subtypes
    KM = K * M
    rng = np.random.default_rng(0)
    log_table = np.log(rng.dirichlet(np.ones(L), (W, KM))).astype(np.float32)  # [W, KM, L]
    bias = np.log(rng.dirichlet(np.ones(KM))).astype(np.float32)
    gold = np.where(rng.random(U) < 0.02, rng.integers(0, K, U), -1).astype(np.int32)
    weight = counts.astype(np.float32)
    weight[-3:] = 0  # padding rows, as EBCC's buckets have
    z_prev = rng.dirichlet(np.ones(K), U).astype(np.float32)

    args = (jnp.asarray(weight), jnp.asarray(gold), jnp.asarray(bias), jnp.asarray(log_table),
            jnp.asarray(z_prev))
    xla = jax.jit(lambda lab, *x: _fast.subtype_sweep(lab, L, M, *x))
    data = Dense(labels=jnp.asarray(rows), task_mask=jnp.asarray((weight > 0).astype(np.float32)),
                 worker_mask=jnp.ones(W, jnp.float32), gold=jnp.asarray(gold), n_classes=L)
    ebcc_rows = jax.jit(lambda d: _native.ebcc_rows(d, columns=KM))(data)
    ds_groups = jax.jit(lambda d: _native.ebcc_rows(d))(data)  # DS's groups (4 annotators)
    native = jax.jit(lambda r, w, g, *x: _native.ebcc_sweep(r, w, *x, M))

    # the kernel's two ways to the E-step's exps: products of an exp table (its default), or a
    # log-table sum and an exp per column (CROWDLLM_EBCC_LOGPATH=1, read at each call)
    variants = {"XLA (subtype_sweep)": (xla, jnp.asarray(rows), None),
                "native (ebcc_sweep)": (native, ebcc_rows, None),
                "  log path": (native, ebcc_rows, "1"),
                "  DS's groups": (native, ds_groups, None),
                "  DS's groups, log path": (native, ds_groups, "1")}
    outs, runs = {}, {name: [] for name in variants}
    for rep in range(a.repeats + 1):  # interleaved, so that the host's drift hits all alike
        for name, (fn, first, logpath) in variants.items():
            if logpath:
                os.environ["CROWDLLM_EBCC_LOGPATH"] = logpath
            t = time.perf_counter()
            out = jax.block_until_ready(fn(first, *args))
            runs[name].append(time.perf_counter() - t)
            os.environ.pop("CROWDLLM_EBCC_LOGPATH", None)
            if rep == 0:
                outs[name] = [np.asarray(v) for v in out]
    times = {name: statistics.median(r[1:]) for name, r in runs.items()}  # the first compiles
    ref, t_xla = outs["XLA (subtype_sweep)"], times["XLA (subtype_sweep)"]

    # the sums in float64 with numpy, to judge both float32 sweeps against
    s64 = bias.astype(np.float64) + sum(
        log_table[w].astype(np.float64).T[rows[:, w]] for w in range(W))  # [U, KM]
    ruled = (gold[:, None] >= 0) & (np.arange(KM)[None] // M != gold[:, None])
    s64[ruled] = -np.inf
    e64 = np.exp(s64 - s64.max(1, keepdims=True))
    pw64 = e64 / e64.sum(1, keepdims=True) * weight[:, None]
    csum64 = pw64.sum(0)
    counts64 = np.zeros((W, KM, L))
    for w in range(W):
        for y in range(L):
            counts64[w, :, y] = pw64[rows[:, w] == y].sum(0)

    def rel(x: np.ndarray, y: np.ndarray) -> float:
        return float(np.abs(x - y).max() / np.abs(y).max())

    print(f"{U:,} distinct rows of {a.tasks:,} x {W} x {L}, {M} subtypes ({KM} columns), "
          f"{(gold >= 0).sum():,} gold rows, annotator groups "
          f"{[len(g) for g in _native.ebcc_plan(W, L, KM).groups]}")
    print(f"{'sweep':30s} {'ms':>8s} {'x XLA':>7s}  differences")
    ok = True
    for name, (z, ll, cnt, csum, dz) in outs.items():
        sec = times[name]
        diffs = {"z vs XLA": float(np.abs(z - ref[0]).max()),
                 "ll vs XLA (rel)": float(abs(ll - ref[1]) / abs(ref[1])),
                 "counts vs float64 (rel)": rel(cnt, counts64),
                 "csum vs float64 (rel)": rel(csum, csum64),
                 "dz vs XLA": float(abs(dz - ref[4]))}
        good = diffs["z vs XLA"] < 1e-4 and diffs["ll vs XLA (rel)"] < 1e-5 and \
            diffs["counts vs float64 (rel)"] < 1e-5 and diffs["csum vs float64 (rel)"] < 1e-5 \
            and diffs["dz vs XLA"] < 1e-4
        ok &= good
        print(f"{name:30s} {sec * 1e3:8.1f} {t_xla / sec:7.1f}  "
              + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items()) + ("" if good else "  <- !"))
    print("same sweep" if ok else "DIFFERENT")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
