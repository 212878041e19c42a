"""Experiment (issue 5): how far do hand-written C++ kernels get beyond XLA's CPU code on
Dawid-Skene's fused E+M pass?

Builds two kernels with g++ into a temporary folder and registers them as XLA FFI targets:
``ffi_ds_step.cc`` (a scalar loop per row, classes padded to 8) and, where the CPU has AVX2,
``ffi_ds_avx2.cc`` (8 rows at a time, table lookups by register permutes). Checks each one's
counts and class sums against float64 sums of the posteriors of ``_fast.ds_em_step`` (the
library's fused XLA pass) to 1e-5, and its log-likelihood against that pass's, on a dense ``--items`` x 12 x 5 panel (20 % of the answers missing with ``--missing``), then times
all (best and median of ``--calls`` calls; the XLA pass also writes the [items, 5] posteriors,
the C++ ones do not). Not used by the library.

Usage:
    python benchmarks/ffi_ds.py [--items 1000000] [--missing]
"""

from __future__ import annotations

import argparse
import ctypes
import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np


def has_avx2() -> bool:
    try:
        return "avx2" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def build(out_dir: str, source: str, flags: tuple[str, ...] = ()) -> str:
    import jax.ffi

    lib = os.path.join(out_dir, Path(source).stem + ".so")
    src = Path(__file__).with_name(source)
    subprocess.run(["g++", "-O3", "-march=native", *flags, "-std=c++17", "-shared", "-fPIC",
                    f"-I{jax.ffi.include_dir()}", str(src), "-o", lib, "-lpthread"],
                   check=True, capture_output=True)
    return lib


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, default=1_000_000)
    ap.add_argument("--calls", type=int, default=7)
    ap.add_argument("--missing", action="store_true", help="leave 20 %% of the answers out")
    args = ap.parse_args()

    import jax
    import jax.numpy as jnp

    from crowdllm.aggregation import _fast

    T, W, K = args.items, 12, 5
    with tempfile.TemporaryDirectory() as tmp:
        lib = ctypes.cdll.LoadLibrary(build(tmp, "ffi_ds_step.cc", ("-ffast-math",)))
        avx2 = ctypes.cdll.LoadLibrary(build(tmp, "ffi_ds_avx2.cc")) if has_avx2() else None
    jax.ffi.register_ffi_target("crowdllm_ds_step8", jax.ffi.pycapsule(lib.DsStep8), platform="cpu")
    if avx2 is not None:
        jax.ffi.register_ffi_target("crowdllm_ds_avx2", jax.ffi.pycapsule(avx2.DsStepAvx2), platform="cpu")

    rng = np.random.default_rng(0)
    truth = rng.integers(0, K, T)
    acc = rng.uniform(0.45, 0.9, W)
    lab = np.where(rng.random((T, W)) < acc, truth[:, None], rng.integers(0, K, (T, W))).astype(np.int8)
    if args.missing:
        lab[rng.random((T, W)) < 0.2] = -1
    log_conf = jnp.asarray(np.log(rng.dirichlet(np.ones(K) * 2, (W, K))), jnp.float32)  # [W, K, L]
    log_prior = jnp.asarray(np.log(rng.dirichlet(np.ones(K) * 5)), jnp.float32)
    labels, mask, gold = jnp.asarray(lab), jnp.ones(T, jnp.float32), -jnp.ones(T, jnp.int32)

    xla = jax.jit(lambda l, m, g, p, c: _fast.ds_em_step(l, K, m, g, p, c))

    def cpp(l, m, p, c, threads):
        pad = jnp.full((W, K, 8 - K), -1e30, jnp.float32)
        tab = jnp.concatenate([jnp.transpose(c, (0, 2, 1)), pad], axis=2)  # [W, L, 8]
        p8 = jnp.concatenate([p, jnp.full((8 - K,), -1e30, jnp.float32)])
        out = (jax.ShapeDtypeStruct((W, K, 8), jnp.float32), jax.ShapeDtypeStruct((8,), jnp.float32),
               jax.ShapeDtypeStruct((1,), jnp.float32))
        counts, csum, ll = jax.ffi.ffi_call("crowdllm_ds_step8", out)(l, tab, p8, m, threads=np.int64(threads))
        return ll[0], jnp.transpose(counts[:, :, :K], (0, 2, 1)), csum[:K]

    def cpp_avx2(l, m, p, c, threads):
        out = (jax.ShapeDtypeStruct((W, K, K), jnp.float32), jax.ShapeDtypeStruct((K,), jnp.float32),
               jax.ShapeDtypeStruct((1,), jnp.float32))
        counts, csum, ll = jax.ffi.ffi_call("crowdllm_ds_avx2", out)(
            l, jnp.transpose(c, (0, 2, 1)), p, m, threads=np.int64(threads))
        return ll[0], jnp.transpose(counts, (0, 2, 1)), csum

    post, ll, counts, psum = xla(labels, mask, gold, log_prior, log_conf)
    # float64 sums of the XLA pass's own posteriors: the yardstick for every pass's float32 sums
    post64 = np.asarray(post, np.float64)
    psum64 = post64.sum(axis=0)
    counts64 = np.zeros((W, K, K))
    for w in range(W):
        ok = lab[:, w] >= 0
        for k in range(K):
            counts64[w, k] = np.bincount(lab[ok, w], weights=post64[ok, k], minlength=K)
    np.testing.assert_allclose(np.asarray(psum), psum64, rtol=1e-4)  # XLA's float32 carry
    runs = {"XLA fused pass (library)": (xla, (labels, mask, gold, log_prior, log_conf))}
    kernels = [("C++ scalar", cpp)] + ([("C++ AVX2", cpp_avx2)] if avx2 is not None else [])
    for name, kernel in kernels:
        for threads in (1, 2):
            f = jax.jit(lambda *a, n=threads, k=kernel: k(*a, n))
            ll2, counts2, psum2 = f(labels, mask, log_prior, log_conf)
            np.testing.assert_allclose(np.asarray(counts2), counts64, rtol=1e-5, atol=1e-2)
            np.testing.assert_allclose(np.asarray(psum2), psum64, rtol=1e-5)
            np.testing.assert_allclose(float(ll2), float(ll), rtol=1e-5)
            runs[f"{name}, {threads} thread(s)"] = (f, (labels, mask, log_prior, log_conf))

    print(f"machine: {platform.machine()} {os.cpu_count()} CPUs, jax {jax.__version__}; "
          f"panel {T} x {W} x {K}{' (20 % missing)' if args.missing else ''}; the C++ results equal "
          f"the XLA pass's (counts and class sums to 1e-5 of float64 sums of its posteriors)"
          f"{'' if avx2 is not None else '; no AVX2 on this CPU'}")
    print(f"{'pass':32s} {'best ms':>8s} {'median ms':>9s}")
    for name, (fn, a) in runs.items():
        ts = []
        for _ in range(args.calls):
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*a))
            ts.append(time.perf_counter() - t0)
        print(f"{name:32s} {min(ts) * 1e3:8.1f} {np.median(ts) * 1e3:9.1f}")


if __name__ == "__main__":
    main()
