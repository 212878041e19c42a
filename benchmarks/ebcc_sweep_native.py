#!/usr/bin/env python
"""EBCC's sweep as a native AVX2 prototype (``ebcc_sweep_native.cc``) against the XLA sweep
EBCC runs now (``_fast.subtype_sweep``: the E-step and both sums as one-hot matrix products).

Not part of the package: it measures what a native EBCC kernel would gain before one is built.
On the distinct rows of a dense panel (EBCC merges identical rows, each with its count as
weight), from one random state of the parameters, it checks that both compute the same sweep
(class posteriors, log-likelihood, counts, column sums, largest move) and times each:

    python benchmarks/ebcc_sweep_native.py --tasks 1000000

Needs a C++ compiler and an x86-64 CPU with AVX2 and FMA.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def build(out_dir: str) -> ctypes.CDLL:
    so = os.path.join(out_dir, "ebcc_sweep_native.so")
    cxx = os.environ.get("CXX", "g++")
    # EBCC_SWEEP_ABLATE=EXP,Z,M leaves stages out (timing only: the check then fails)
    ablate = [f"-DABLATE_{x}" for x in os.environ.get("EBCC_SWEEP_ABLATE", "").split(",") if x]
    subprocess.run([cxx, "-O3", "-mavx2", "-mfma", "-std=c++17", "-shared", "-fPIC", "-pthread",
                    *ablate, str(HERE / "ebcc_sweep_native.cc"), "-o", so], check=True)
    lib = ctypes.CDLL(so)
    lib.ebcc_sweep.restype = ctypes.c_int
    return lib


def _ptr(a: np.ndarray) -> ctypes.c_void_p:
    return ctypes.c_void_p(a.ctypes.data)


def main(argv: list[str] | None = None) -> int:
    import jax
    import jax.numpy as jnp

    from crowdllm.aggregation import _fast, _native
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
    KMp = -(-KM // 8) * 8
    rng = np.random.default_rng(0)
    log_table = np.log(rng.dirichlet(np.ones(L), (W, KM))).astype(np.float32)  # [W, KM, L]
    bias = np.log(rng.dirichlet(np.ones(KM))).astype(np.float32)
    gold = np.where(rng.random(U) < 0.02, rng.integers(0, K, U), -1).astype(np.int32)
    weight = counts.astype(np.float32)
    weight[-3:] = 0  # padding rows, as EBCC's buckets have
    z_prev = rng.dirichlet(np.ones(K), U).astype(np.float32)

    sweep = jax.jit(lambda *x: _fast.subtype_sweep(x[0], L, M, *x[1:]))
    args = (jnp.asarray(rows), jnp.asarray(weight), jnp.asarray(gold), jnp.asarray(bias),
            jnp.asarray(log_table), jnp.asarray(z_prev))
    ref = [np.asarray(v) for v in jax.block_until_ready(sweep(*args))]
    xla = []
    for _ in range(a.repeats):
        t = time.perf_counter()
        jax.block_until_ready(sweep(*args))
        xla.append(time.perf_counter() - t)

    tab = np.zeros((W, L, KMp), np.float32)
    tab[:, :, :KM] = log_table.transpose(0, 2, 1)
    bias_p = np.full(KMp, -1e30, np.float32)
    bias_p[:KM] = bias
    rows_c = np.ascontiguousarray(rows, np.int8)
    z = np.empty((U, K), np.float32)
    ll = np.zeros(1, np.float64)
    dz = np.zeros(1, np.float32)
    cnt = np.empty((W, L, KMp), np.float32)
    csum = np.empty(KMp, np.float32)
    # the sums in float64 with numpy, to judge both float32 versions against
    s64 = bias.astype(np.float64) + sum(
        log_table[w].astype(np.float64).T[rows[:, w]] for w in range(W))  # [U, KM]
    ruled = (gold[:, None] >= 0) & (np.arange(KM)[None] // M != gold[:, None])
    s64[ruled] = -np.inf
    e64 = np.exp(s64 - s64.max(1, keepdims=True))
    pw64 = e64 / e64.sum(1, keepdims=True) * weight[:, None]
    csum64 = pw64.sum(0)
    counts64 = np.zeros((W, L, KM))
    for w in range(W):
        for y in range(L):
            counts64[w, y] = pw64[rows[:, w] == y].sum(0)
    z_r, ll_r, counts_r, csum_r, dz_r = ref  # counts_r [W, KM, L]

    def rel(x: np.ndarray, y: np.ndarray) -> float:
        return float(np.abs(x - y).max() / np.abs(y).max())

    def check(z, ll, dz, cnt, csum) -> dict[str, float]:
        return {"z": float(np.abs(z - z_r).max()),
                "ll vs XLA (rel)": abs(ll[0] - ll_r) / abs(ll_r),
                "counts vs float64 (rel)": rel(cnt[:, :, :KM], counts64),
                "csum vs float64 (rel)": rel(csum[:KM], csum64),
                "dz vs XLA": float(abs(dz[0] - dz_r))}

    plan = _native.plan(W, L)  # the DS kernel's annotator groups and combination codes
    codes = np.asarray(_native.encode(jnp.asarray(rows), plan))
    group = len(plan.groups[0])
    with tempfile.TemporaryDirectory() as d:
        lib = build(d)

        def native(fn, first, threads: int) -> None:
            sizes = (ctypes.c_int64(U), ctypes.c_int64(W), ctypes.c_int64(L)) + \
                ((ctypes.c_int64(group),) if fn is lib.ebcc_sweep_grouped else ())
            rc = fn(_ptr(first), *sizes, _ptr(weight), _ptr(gold), _ptr(bias_p), _ptr(tab), ctypes.c_int64(K),
                    ctypes.c_int64(M), ctypes.c_int64(KMp), _ptr(z_prev), _ptr(z), _ptr(ll),
                    _ptr(dz), _ptr(cnt), _ptr(csum), ctypes.c_int64(threads))
            assert rc == 0

        timings, checks = {}, {}
        for name, fn, first in (("every answer", lib.ebcc_sweep, rows_c),
                                (f"grouped by {group}", lib.ebcc_sweep_grouped, codes)):
            for threads in (1, os.cpu_count() or 1):
                for v in (z, cnt, csum):
                    v.fill(np.nan)  # every output must be written
                native(fn, first, threads)
                checks[name, threads] = check(z, ll, dz, cnt, csum)
                runs = []
                for _ in range(a.repeats):
                    t = time.perf_counter()
                    native(fn, first, threads)
                    runs.append(time.perf_counter() - t)
                timings[name, threads] = statistics.median(runs)
    print(f"{U:,} distinct rows of {a.tasks:,} x {W} x {L}, {M} subtypes ({KM} columns), "
          f"{(gold >= 0).sum():,} gold rows; XLA's counts and column sums are "
          f"{rel(counts_r.transpose(0, 2, 1), counts64):.1e} and {rel(csum_r, csum64):.1e} "
          f"from float64")
    x = statistics.median(xla)
    print(f"{'sweep':34s} {'ms':>8s} {'x XLA':>7s}  differences")
    print(f"{'XLA (subtype_sweep)':34s} {x * 1e3:8.1f} {1.0:7.1f}")
    ok = True
    for (name, threads), sec in timings.items():
        diffs = checks[name, threads]
        good = diffs["z"] < 1e-4 and diffs["ll vs XLA (rel)"] < 1e-5 and \
            diffs["counts vs float64 (rel)"] < 1e-5 and diffs["csum vs float64 (rel)"] < 1e-5 \
            and diffs["dz vs XLA"] < 1e-4
        ok &= good
        print(f"{f'native, {name}, {threads} thread(s)':34s} {sec * 1e3:8.1f} {x / sec:7.1f}  "
              + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items()) + ("" if good else "  <- !"))
    print("same sweep" if ok else "DIFFERENT")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
