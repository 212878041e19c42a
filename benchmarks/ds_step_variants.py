#!/usr/bin/env python
"""Dawid-Skene's fused EM iteration written three ways, timed side by side on this device.

The dense fast path (``_fast.ds_em_step``) turns each chunk of answers into a one-hot
``[tasks, workers * classes]`` matrix and does both EM sums as matrix products. On CPU that
is what XLA runs best; on a GPU the one-hot matrix is written to and read back from device
memory (2.4 GB at 10,000,000 x 12 x 5), which the floor of ``speed.py ds`` does not count.
The variants here compute the same sums without it:

* ``onehot-matmul``: ``_fast.ds_em_step`` as it is (the default);
* ``gather-reduce``: E-step by gathering each answer's log-confusion row, M-step as a fused
  multiply-and-sum over tasks (no matrix product, nothing of size ``[T, W, L]`` stored);
* ``gather-scatter``: the same E-step, the M-step as a scatter-add into the ``[W*L, K]`` counts.

Each runs exactly ``--iters`` iterations (parameters updated between them, as in a fit) from the
same start; the script prints ms per iteration and the largest posterior difference from the
default. Run: ``python benchmarks/ds_step_variants.py --n 10000000``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np


def main(argv: list[str] | None = None) -> int:
    import jax
    import jax.numpy as jnp

    from crowdllm.aggregation import _fast
    from crowdllm.aggregation import dawid_skene as ds
    from crowdllm.eval import speed

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args(argv)
    labels, truth = speed.dense_panel(a.n)
    data = speed.dense_data(labels)
    L = data.n_classes

    def gather_e(lab, log_prior, log_conf):
        W = lab.shape[1]
        tab = _fast._flat_table(log_conf)  # [W * L, K]
        lab32 = lab.astype(jnp.int32)
        idx = jnp.arange(W, dtype=jnp.int32) * L + jnp.maximum(lab32, 0)
        g = jnp.where((lab32 >= 0)[..., None], tab[idx], 0.0)  # [T, W, K], fused into the sum
        return log_prior + g.sum(axis=1)

    def e_common(lab, mask, g, log_prior, log_conf):
        return _fast.ds_posteriors(gather_e(lab, log_prior, log_conf), mask, g)

    def step_reduce(lab, mask, g, log_prior, log_conf):
        p, ll, pm = e_common(lab, mask, g, log_prior, log_conf)
        oh = lab.astype(jnp.int32)[..., None] == jnp.arange(L, dtype=jnp.int32)  # [T, W, L]
        counts = jnp.sum(jnp.where(oh[..., None], pm[:, None, None, :], 0.0), axis=0)  # [W,L,K]
        return p, ll, counts.transpose(0, 2, 1), pm.sum(axis=0)

    def step_scatter(lab, mask, g, log_prior, log_conf):
        p, ll, pm = e_common(lab, mask, g, log_prior, log_conf)
        T, W = lab.shape
        K = pm.shape[1]
        lab32 = lab.astype(jnp.int32)
        idx = jnp.where(lab32 >= 0, jnp.arange(W, dtype=jnp.int32) * L + lab32, W * L)
        counts = jnp.zeros((W * L + 1, K), pm.dtype).at[idx.reshape(-1)].add(
            jnp.repeat(pm, W, axis=0))[:-1]
        return p, ll, counts.reshape(W, L, K).transpose(0, 2, 1), pm.sum(axis=0)

    def step_matmul(lab, mask, g, log_prior, log_conf):
        return _fast.ds_em_step(lab, L, mask, g, log_prior, log_conf)

    def run(step):
        @jax.jit
        def fit(d):
            st = ds.init(d, smoothing=0.01)

            def body(_, c):
                lp, lc, _p = c
                post, ll, counts, psum = step(d.labels, d.task_mask, d.gold, lp, lc)
                lp, lc = _fast._ds_params(counts, psum, 0.01)
                return lp, lc, post

            return jax.lax.fori_loop(0, a.iters, body,
                                     (st.log_prior, st.log_conf, st.posteriors))[2]
        return fit

    dev = jax.devices()[0]
    print(f"machine: {speed.machine()}")
    print(f"{dev.device_kind} ({dev.platform}), jax {jax.__version__}; dense {a.n:,} x 12 x {L}, "
          f"{a.iters} iterations")
    print(f"{'variant':16s} {'compile s':>10s} {'ms/iter':>9s} {'max |dp|':>10s} {'accuracy':>9s}")
    ref = None
    for name, step in (("onehot-matmul", step_matmul), ("gather-reduce", step_reduce),
                       ("gather-scatter", step_scatter)):
        fit = run(step)
        try:
            t = time.perf_counter()
            post = jax.block_until_ready(fit(data))
            first = time.perf_counter() - t
            runs = []
            for _ in range(a.repeats):
                t = time.perf_counter()
                jax.block_until_ready(fit(data))
                runs.append(time.perf_counter() - t)
        except Exception as e:  # one variant failing must not hide the others
            print(f"{name:16s} FAILED: {type(e).__name__}: {e}"[:200], flush=True)
            continue
        run_s = statistics.median(runs)
        post = np.asarray(post)[: a.n]
        ref = post if ref is None else ref
        print(f"{name:16s} {first - run_s:10.2f} {run_s / a.iters * 1e3:9.3f} "
              f"{np.abs(post - ref).max():10.2e} {(post.argmax(1) == truth).mean():9.4f}",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
