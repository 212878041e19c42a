#!/usr/bin/env python
"""EBCC on a sparse crowd (the COO layout): the native sweep against the XLA sums, side by side.

On the speed harness's sparse crowd (``crowdllm.eval.speed.sparse_crowd``: 10,000 annotators, 3
answers a task, 5 classes), one restart of ``EBCC(layout="coo")`` with ``native`` on and off:
the seconds of a fit of ``--short`` sweeps and of ``--sweeps`` sweeps (compiled first, median
of ``--repeats``), and from their difference the milliseconds per sweep, the fits' agreement and
accuracy. Then the kernel's sweep alone (``_native.ebcc_sweep``) on the tasks in the order drawn
and sorted by their first annotator (what ``EBCC`` does before the fit), to show what the order
is worth:

    python benchmarks/ebcc_sparse.py --tasks 1000000

Needs the native kernels (x86-64 with AVX2 and FMA, a C++ compiler).
"""

from __future__ import annotations

import argparse
import sys
import warnings

import numpy as np


def main(argv: list[str] | None = None) -> int:
    import jax
    import jax.numpy as jnp

    from crowdllm.aggregation import EBCC, _core, _native, ebcc
    from crowdllm.eval import speed

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", type=int, default=1_000_000)
    ap.add_argument("--sweeps", type=int, default=42)
    ap.add_argument("--short", type=int, default=2)
    ap.add_argument("--subtypes", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--float64", action="store_true",
                    help="also fit in float64 (XLA) and print each float32 fit's distance to it")
    a = ap.parse_args(argv)
    print(f"machine: {speed.machine()}")
    tensor, truth = speed.workload("ebcc", a.tasks, "coo")
    print(f"sparse crowd: {tensor.n_tasks:,} tasks, {tensor.n_workers:,} annotators, "
          f"{tensor.n_answers:,} answers, {tensor.n_classes} classes; EBCC one restart, "
          f"{a.subtypes} subtypes")
    warnings.filterwarnings("ignore", message="EBCC did not converge")
    fits: dict[str, EBCC] = {}
    per_sweep: dict[str, float] = {}
    print(f"{'sums':8s} {f'{a.short} sweeps s':>14s} {f'{a.sweeps} sweeps s':>14s} "
          f"{'ms/sweep':>9s} {'accuracy':>9s}")
    for native in ("on", "off"):
        secs = []
        for n in (a.short, a.sweeps):
            model = EBCC(restarts=1, max_iter=n, tol=None, atol=0.0, n_subtypes=a.subtypes,
                         layout="coo", native=native)
            secs.append(speed._median_run(lambda: model.fit(tensor), a.repeats)[1])
        fits[native] = model
        per_sweep[native] = (secs[1] - secs[0]) / (a.sweeps - a.short) * 1e3
        acc = float((np.asarray(model.label_codes_) == truth).mean())
        name = "native" if native == "on" else "XLA"
        print(f"{name:8s} {secs[0]:14.2f} {secs[1]:14.2f} {per_sweep[native]:9.1f} {acc:9.4f}",
              flush=True)
    diff = np.abs(fits["on"].probas_ - fits["off"].probas_).max()
    print(f"native {per_sweep['off'] / per_sweep['on']:.1f}x faster a sweep; posteriors within "
          f"{diff:.1e} of the XLA fit's")
    if a.float64:  # which float32 fit drifts: both against the float64 sums
        ref = EBCC(restarts=1, max_iter=a.sweeps, tol=None, atol=0.0, n_subtypes=a.subtypes,
                   layout="coo", native="off", dtype="float64").fit(tensor).probas_
        for native, name in (("on", "native"), ("off", "XLA")):
            d = np.abs(fits[native].probas_ - ref).max(axis=1)
            print(f"{name} float32 against float64: posteriors within {d.max():.1e}, "
                  f"{int((d > 1e-3).sum()):,} tasks past 1e-3")

    # the kernel's sweep alone, tasks as drawn and sorted by their first annotator
    K, M = tensor.n_classes, a.subtypes
    rng = np.random.default_rng(0)
    print(f"{'task order':28s} {'kernel sweep ms':>16s}")
    order = _native.coo_task_order(tensor.task, tensor.worker, tensor.n_tasks)
    for name, t in (("as drawn", tensor),
                    ("sorted by first annotator",
                     ebcc.reorder_tasks(tensor, np.ones(tensor.n_tasks), None, order)[0])):
        data = _core.prepare(t, layout="coo")
        width = _native.coo_row_width(t.task, t.n_tasks)
        rows = jax.jit(lambda d: _native.ebcc_rows(d, width))(data)
        table = jnp.asarray(np.log(rng.dirichlet(np.ones(K), (data.n_workers, K * M)))
                            .astype(np.float32))
        bias = jnp.asarray(np.log(rng.dirichlet(np.ones(K * M))).astype(np.float32))
        z = jnp.asarray(rng.dirichlet(np.ones(K), data.n_tasks).astype(np.float32))
        sweep = jax.jit(lambda r, w, b, tb, zp: _native.ebcc_sweep(r, w, b, tb, zp, M))
        ms = speed._median_run(lambda: sweep(rows, data.task_mask, bias, table, z),
                               max(a.repeats, 5))[1] * 1e3
        print(f"{name:28s} {ms:16.1f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
