"""Experiment (issue 5): how far does a hand-written C++ kernel get beyond XLA's CPU code on
Dawid-Skene's fused E+M pass?

Builds ``benchmarks/ffi_ds_step.cc`` with g++ into a temporary folder, registers it as an XLA
FFI target, checks that its counts, class sums and log-likelihood equal ``_fast.ds_em_step``'s
(the library's fused XLA pass) on a dense ``--items`` x 12 x 5 panel, then times both (best and
median of 7 calls; the XLA pass also writes the [items, 5] posteriors, the C++ one does not).
Not used by the library.

Usage:
    python benchmarks/ffi_ds.py [--items 1000000]
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


def build(out_dir: str) -> str:
    import jax.ffi

    lib = os.path.join(out_dir, "libffi_ds.so")
    src = Path(__file__).with_name("ffi_ds_step.cc")
    subprocess.run(["g++", "-O3", "-march=native", "-ffast-math", "-std=c++17", "-shared", "-fPIC",
                    f"-I{jax.ffi.include_dir()}", str(src), "-o", lib, "-lpthread"],
                   check=True, capture_output=True)
    return lib


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, default=1_000_000)
    ap.add_argument("--calls", type=int, default=7)
    args = ap.parse_args()

    import jax
    import jax.numpy as jnp

    from crowdllm.aggregation import _fast

    T, W, K = args.items, 12, 5
    with tempfile.TemporaryDirectory() as tmp:
        lib = ctypes.cdll.LoadLibrary(build(tmp))
    jax.ffi.register_ffi_target("crowdllm_ds_step8", jax.ffi.pycapsule(lib.DsStep8), platform="cpu")

    rng = np.random.default_rng(0)
    truth = rng.integers(0, K, T)
    acc = rng.uniform(0.45, 0.9, W)
    lab = np.where(rng.random((T, W)) < acc, truth[:, None], rng.integers(0, K, (T, W))).astype(np.int8)
    log_conf = jnp.asarray(np.log(rng.dirichlet(np.ones(K) * 2, (W, K))), jnp.float32)  # [W, K, L]
    log_prior = jnp.full((K,), -np.log(K), jnp.float32)
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

    _, ll, counts, psum = xla(labels, mask, gold, log_prior, log_conf)
    runs = {"XLA fused pass (library)": (xla, (labels, mask, gold, log_prior, log_conf))}
    for threads in (1, 2):
        f = jax.jit(lambda *a, n=threads: cpp(*a, n))
        ll2, counts2, psum2 = f(labels, mask, log_prior, log_conf)
        np.testing.assert_allclose(np.asarray(counts2), np.asarray(counts), rtol=1e-4, atol=1e-2)
        np.testing.assert_allclose(np.asarray(psum2), np.asarray(psum), rtol=1e-5)
        np.testing.assert_allclose(float(ll2), float(ll), rtol=1e-5)
        runs[f"C++ FFI kernel, {threads} thread(s)"] = (f, (labels, mask, log_prior, log_conf))

    print(f"machine: {platform.machine()} {os.cpu_count()} CPUs, jax {jax.__version__}; "
          f"panel {T} x {W} x {K}; the C++ results equal the XLA pass's (checked)")
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
