#!/usr/bin/env python
"""GLAD's whole fit on the native kernels, as ``benchmarks/speed.py iters`` times it, alone:
exactly ``--iters`` iterations on a dense ``--tasks x 12 x 5`` panel (the rows' merge
included), ms an iteration (median and min of ``--repeats`` fits, compiled first); then one
gradient pass (``_native.glad_grad``, 40 in a ``fori_loop``) at the parameters the fit reached,
on 1 and on 2 threads, ms a pass.

To compare two checkouts on a noisy host, run it from each in turn, a few rounds:

    for r in 1 2 3; do for d in OLD NEW; do (cd $d && PYTHONPATH=$d \\
        python benchmarks/glad_fit_iters.py); done; done

(session 28: benchmarks/results/session28-zen4-glad.txt). Needs the native kernels.
"""

from __future__ import annotations

import argparse
import statistics
import sys


def main(argv: list[str] | None = None) -> int:
    import jax
    import jax.numpy as jnp

    from crowdllm.aggregation import _core, _native
    from crowdllm.eval import speed
    from crowdllm.labels import LabelTensor

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", type=int, default=1_000_000)
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=4)
    ap.add_argument("--passes", type=int, default=40, help="gradient passes timed a call")
    a = ap.parse_args(argv)
    print(f"machine: {speed.machine()}")
    if not _native.available():
        print(f"native kernels unavailable: {_native.why_unavailable()}")
        return 1
    labels, _ = speed.dense_panel(a.tasks)
    data = _core.prepare(LabelTensor.from_dense(labels), layout="dense")
    fit = speed._iteration_fits()["glad"][0]
    first, runs = speed._runs(lambda: fit(data, a.iters), a.repeats)
    runs = [r / a.iters * 1e3 for r in runs]
    print(f"GLAD, native, {a.tasks:,} x 12 x 5, {a.iters} iterations: "
          f"{statistics.median(runs):.2f} ms an iteration (min {min(runs):.2f}; first fit "
          f"{first:.2f} s with compiling)")

    lab_b, flags, wts, n, _ = _native.glad_rows(data)
    res = _native._glad_fit_rows(lab_b, flags, wts, n, data.worker_mask, data.n_classes,
                                 max_iter=a.iters, tol=-1.0, lr=0.1, m_steps=5, mu_alpha=1.0,
                                 mu_beta=1.0, learn_prior=False, init_from_gold=False)
    alpha, log_beta = res.alphas, jnp.log(res.betas)
    log_prior = jnp.log(res.priors)
    p = _native.glad_e(lab_b, flags, wts, n, alpha, log_beta, log_prior,
                       jnp.zeros(lab_b.shape, jnp.float32))[1]
    threads_of = _native._threads
    try:
        for threads in (1, 2):
            _native._threads = lambda threads=threads: threads
            jax.clear_caches()  # the thread count is an attribute of the compiled call

            @jax.jit
            def passes(alpha, log_beta, p):
                def one(i, c):  # each pass's alpha depends on the last: none is skipped
                    return _native.glad_grad(lab_b, wts, n, p, alpha + c[0][0] * 1e-12,
                                             log_beta)[:2]
                zero = (jnp.zeros_like(alpha), jnp.zeros_like(log_beta))
                return jax.lax.fori_loop(0, a.passes, one, zero)

            ts = [t / a.passes * 1e3
                  for t in speed._runs(lambda: passes(alpha, log_beta, p), a.repeats)[1]]
            print(f"gradient pass at the fitted parameters, {int(n[0]):,} distinct rows, "
                  f"{threads} thread{'s' if threads > 1 else ''}: {statistics.median(ts):.2f} "
                  f"ms (min {min(ts):.2f})")
    finally:
        _native._threads = threads_of
        jax.clear_caches()
    return 0


if __name__ == "__main__":
    sys.exit(main())
