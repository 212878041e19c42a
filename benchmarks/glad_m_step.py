#!/usr/bin/env python
"""GLAD's M-step: one native call (``_native.glad_m``) against JAX's Adam and loop around the
native gradient and Q passes (the path it replaced), side by side in one process.

On the speed harness's dense panel (``crowdllm.eval.speed.dense_panel``: n x 12 x 5), the
native GLAD fit (``_native.glad_fit``) of exactly ``--iters`` iterations from the prepared panel
(the rows' merge included), with ``m_step="native"`` and ``m_step="jax"``: each compiled first,
then ``--repeats`` rounds, each path timed once a round in alternating order (the host's noise
reaches both alike). Prints ms per iteration (min and median), the ratio of the medians, and
how far apart the two fits' posteriors are; then one native M-step with its first gradient
given (as the last E pass returns it) and summed in a pass, alternating in one process:

    python benchmarks/glad_m_step.py --n 1000000

Needs the native kernels (x86-64 with AVX2 and FMA, a C++ compiler).
"""

from __future__ import annotations

import argparse
import functools
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
    times = alternating({p: functools.partial(fit, p) for p in paths}, a.repeats, a.iters)
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
    first_gradient(data, a.repeats)
    return 0


def alternating(fns: dict, repeats: int, per: int) -> dict[str, list[float]]:
    """Each of ``fns`` timed once a round, ``repeats`` rounds, in alternating order (the host's
    noise reaches each alike): ms per ``per`` (iterations or calls) of each timing."""
    import jax

    from crowdllm.eval import speed

    names = list(fns)
    times: dict[str, list[float]] = {k: [] for k in names}
    for r in range(repeats):
        speed._progress(f"round {r + 1} of {repeats} ...")
        for k in names if r % 2 == 0 else names[::-1]:
            t0 = time.perf_counter()
            jax.block_until_ready(fns[k]())
            times[k].append((time.perf_counter() - t0) / per * 1e3)
    return times


def first_gradient(data, repeats: int, calls: int = 10) -> None:
    """One native M-step (``_native.glad_m``, 5 Adam steps, accepted at its first try) at the
    parameters of a 10-iteration fit, with its first step's gradient given (``g1``, as the last
    M-step's E pass returns it; session 29) and summed in a gradient pass, ``calls`` calls a
    timing, the two alternating in one process."""
    import jax
    import jax.numpy as jnp

    from crowdllm.aggregation import _native, glad

    lab_b, flags, wts, n, _ = _native.glad_rows(data)
    K, W = data.n_classes, lab_b.shape[1]
    res = _native._glad_fit_rows(lab_b, flags, wts, n, data.worker_mask, K, max_iter=10,
                                 tol=-1.0, lr=0.1, m_steps=5, mu_alpha=1.0, mu_beta=1.0,
                                 learn_prior=False, init_from_gold=False)
    prm = glad.GladParams(res.alphas, jnp.log(res.betas))
    lp = jnp.full((K,), -np.log(K), jnp.float32)
    p = _native.glad_e(lab_b, flags, wts, n, prm.alpha, prm.log_beta, lp,
                       jnp.zeros(lab_b.shape))[1]
    st = glad.GladState(prm, glad._optimizer().init(prm), lp, p, jnp.asarray(1.0, jnp.float32))
    wm = jnp.ones(W, jnp.float32)
    spare = jnp.zeros(lab_b.shape, jnp.float32)
    m_step = functools.partial(_native.glad_m, lr=0.1, m_steps=5, mu_alpha=1.0, mu_beta=1.0)
    # the E pass at the start (every try rejected: the start's E pass) gives its gradient sums
    g1 = m_step(lab_b, flags, wts, n, (spare, p, jnp.asarray(1)), st, jnp.asarray(np.inf), wm,
                lp)[-1]

    @jax.jit
    def run(have):
        def one(i, c):  # Q's target -inf: the first try is kept
            out = m_step(lab_b, flags, wts, n, (p, spare, jnp.asarray(0)), st,
                         jnp.asarray(-np.inf) + c, wm, lp, (g1, have))
            return c + out[2] * 0
        return jax.lax.fori_loop(0, calls, one, jnp.asarray(0.0))

    ways = {"given": jnp.asarray(1, jnp.int32), "summed in a pass": jnp.asarray(0, jnp.int32)}
    for h in ways.values():
        jax.block_until_ready(run(h))
    times = alternating({w: functools.partial(run, h) for w, h in ways.items()}, repeats, calls)
    print(f"\none M-step of 5 Adam steps (first try kept), {calls} calls a timing, "
          f"{repeats} alternating rounds")
    print("| first step's gradient | ms min | ms median |")
    print("| --- | ---: | ---: |")
    for w in ways:
        print(f"| {w} | {min(times[w]):.2f} | {float(np.median(times[w])):.2f} |")


if __name__ == "__main__":
    sys.exit(main())
