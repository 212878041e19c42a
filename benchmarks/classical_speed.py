"""Fit time of GLAD, MACE, M-MSR and KOS on a synthetic dense panel, compile and run separately.

The panel: ``--items`` items (default 1,000,000) x 12 annotators x 5 classes (2 for KOS, which is
binary only), every annotator labels every item, drawn from the one-coin model with accuracies
0.45 ... 0.9. Each kernel is lowered and compiled first (timed as "compile"), then the compiled
function is run ``--repeats`` times (the best run is "fit"). GLAD and MACE run the path their
classes take here: the native kernels (``aggregation/_native.py``) where they apply (then
"compile" is the first call's time less the best run's), else the XLA fits. Defaults of each
class are used
(GLAD: max_iter=100, 5 Adam steps per M-step; MACE: VB, 10 restarts under vmap, max_iter=50;
M-MSR: pair statistics + MSR iterations + weighted vote; KOS: 100 iterations).

crowd-kit 1.4.2's figures are measured beside ours where it is installed, at ``--ck-items`` items
(default 2,000: its GLAD and MACE do not finish at a million items in any reasonable time), in a
child process with a time limit (``--ck-timeout``); ours is also timed at that size so the two
columns compare like with like.

Usage::

    nice python benchmarks/classical_speed.py                # 1M items, crowd-kit at 2,000
    python benchmarks/classical_speed.py --items 100000 --ck-items 0   # no crowd-kit
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import time

import jax
import jax.numpy as jnp
import numpy as np

from crowdllm.aggregation import _native, glad, kos, mace, mmsr
from crowdllm.aggregation._core import prepare
from crowdllm.eval import speed
from crowdllm.labels import LabelTensor

N_WORKERS = 12


def panel(n_items: int, n_classes: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    acc = np.linspace(0.45, 0.9, N_WORKERS)
    z = rng.integers(0, n_classes, n_items)
    right = rng.random((n_items, N_WORKERS)) < acc
    wrong = (z[:, None] + rng.integers(1, n_classes, (n_items, N_WORKERS))) % n_classes
    return np.where(right, z[:, None], wrong).astype(np.int8)


def time_compiled(fn, args, kwargs, repeats):
    """Compile ``fn(*args, **kwargs)`` (keywords closed over), then time the compiled call."""
    jitted = jax.jit(lambda *a: fn(*a, **kwargs))
    t0 = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    t_compile = time.perf_counter() - t0
    best = np.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        best = min(best, time.perf_counter() - t0)
    return t_compile, best


def time_calls(fn, repeats):
    """``(first call less the best, best of repeats)`` of a function that compiles as it goes."""
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    first = time.perf_counter() - t0
    best = np.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - t0)
    return first - best, best


def ours(n_items: int, repeats: int) -> dict[str, tuple[float, float]]:
    res = {}
    t5 = LabelTensor.from_dense(panel(n_items, 5))
    data5 = prepare(t5, layout="dense")
    keys = jax.random.split(jax.random.key(0), 10)
    if _native.applies(data5, jnp.float32) is None:  # what GLAD and MACE run here
        res["glad"] = time_calls(lambda: _native.glad_fit(data5, max_iter=100).posteriors,
                                 repeats)
        res["mace"] = time_calls(lambda: _native.mace_fit_restarts(
            data5, keys, max_iter=50, method="vb").posteriors, repeats)
    else:
        res["glad"] = time_compiled(glad.fit, (data5,), dict(max_iter=100), repeats)
        res["mace"] = time_compiled(mace.fit_restarts, (data5, keys),
                                    dict(max_iter=50, method="vb"), repeats)

    # M-MSR: the pair statistics (one pass over the panel) and the MSR + vote, both jitted.
    tc1, tr1 = time_compiled(mmsr._dense_pairs, (data5.labels,), dict(n_classes=5), repeats)
    agree, common = (jnp.asarray(x) for x in mmsr._dense_pairs(data5.labels, 5))
    tc2, tr2 = time_compiled(mmsr.fit, (data5, agree, common, jax.random.key(0)),
                             dict(n_tasks=n_items), repeats)
    res["mmsr"] = (tc1 + tc2, tr1 + tr2)

    t2 = LabelTensor.from_dense(panel(n_items, 2))
    data2 = prepare(t2, layout="dense")
    res["kos"] = time_compiled(kos.fit, (data2, jax.random.key(0)), dict(n_iter=100), repeats)
    return res


def _ck_run(method: str, n_items: int, queue) -> None:
    import pandas as pd
    from crowdkit.aggregation import GLAD, KOS, MACE, MMSR

    K = 2 if method == "kos" else 5
    lab = panel(n_items, K)
    t, w = np.nonzero(lab >= 0)
    df = pd.DataFrame({"task": t, "worker": w, "label": lab[t, w].astype(int)})
    model = {"glad": GLAD, "mace": MACE, "mmsr": MMSR, "kos": KOS}[method]()
    t0 = time.perf_counter()
    model.fit_predict(df)
    queue.put(time.perf_counter() - t0)


def crowdkit_time(method: str, n_items: int, timeout: float) -> str:
    ctx = mp.get_context("spawn")  # not fork: JAX is multithreaded in this process
    q = ctx.Queue()
    p = ctx.Process(target=_ck_run, args=(method, n_items, q))
    p.start()
    p.join(timeout)
    if p.is_alive():
        p.kill()
        p.join()
        return f"> {timeout:.0f}"
    return f"{q.get():.2f}" if not q.empty() else "error"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, default=1_000_000)
    ap.add_argument("--ck-items", type=int, default=2_000, help="0: skip crowd-kit")
    ap.add_argument("--ck-timeout", type=float, default=600)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    try:
        import crowdkit  # noqa: F401
        have_ck = args.ck_items > 0
    except ImportError:
        have_ck = False
    why = _native.why_unavailable()
    print(f"machine: {speed.machine()}; panel: {N_WORKERS} annotators, 5 classes (KOS: 2); "
          f"GLAD and MACE: {'native kernels' if why is None else 'XLA (' + why + ')'}")
    big = ours(args.items, args.repeats)
    small = ours(args.ck_items, args.repeats) if have_ck else {}
    head = f"{'method':6s} | {'items':>9s} | {'compile s':>9s} | {'fit s':>8s}"
    if have_ck:
        head += f" | {'ours s @' + str(args.ck_items):>12s} | {'crowd-kit s @' + str(args.ck_items):>17s}"
    print(head)
    print("-" * len(head))
    for m in ("glad", "mace", "mmsr", "kos"):
        tc, tr = big[m]
        line = f"{m:6s} | {args.items:9d} | {tc:9.2f} | {tr:8.2f}"
        if have_ck:
            ck = crowdkit_time(m, args.ck_items, args.ck_timeout)
            line += f" | {small[m][1]:12.3f} | {ck:>17s}"
        print(line, flush=True)


if __name__ == "__main__":
    main()
