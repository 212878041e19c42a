"""Speed harness: synthetic panels and crowds, our kernels vs crowd-kit vs the memory floor.

Two workloads, both drawn from the Dawid-Skene generative story (so every method has signal):

* dense LLM panel: ``N`` items x 12 annotators x 5 classes, every annotator labels every item;
* sparse human crowd: ``N`` tasks, 10,000 annotators, 3 answers per task (COO).

:func:`ds_check` is the issue's headline check: Dawid-Skene, 50 EM iterations on a dense
``N x 12 x 5`` panel; it times the compile and the run separately (median of several runs),
crowd-kit's DawidSkene with the same iteration count in the same process (at a smaller size
when asked, scaled linearly), and prints the floor = bytes one iteration must touch / this
machine's measured copy bandwidth. :func:`iteration_table` does the same for every EM / VB
kernel (native and XLA paths side by side). :func:`method_table` times every registered aggregator at
given sizes, each in a fresh subprocess, with its peak RSS (``resource.getrusage``).

Used by ``benchmarks/speed.py`` (command line) and ``crowdllm bench --speed``.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from typing import Any, Callable

import numpy as np

__all__ = ["copy_bandwidth", "dense_panel", "sparse_crowd", "ds_check", "iteration_table",
           "method_table", "peak_rss_gib", "run_method", "machine"]


def _progress(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _cpu_model() -> str:
    """The CPU's model name and last-level cache (Linux; '' where unknown): the project's VM
    has come on different hosts (an AMD EPYC at 27-36 GB/s copy bandwidth, an Intel Xeon at
    10.5 GB/s), and the floors and the kernels' ratios to them move with it."""
    import glob
    import pathlib

    name = ""
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    caches = sorted(glob.glob("/sys/devices/system/cpu/cpu0/cache/index*/level"))
    for lvl in reversed(caches):
        try:
            size = pathlib.Path(lvl).with_name("size").read_text().strip()
            level = pathlib.Path(lvl).read_text().strip()
        except OSError:
            continue
        return f"{name}, L{level} {size}" if name else f"L{level} {size}"
    return name


def machine() -> str:
    """One line naming the machine a figure is measured on: host, CPU model and last-level
    cache, CPUs, JAX and its device, load average."""
    import platform

    import jax

    dev = jax.devices()[0]
    cpu = _cpu_model()
    return (f"{platform.node()} {platform.machine()}{' (' + cpu + ')' if cpu else ''}, "
            f"{os.cpu_count()} CPUs, jax {jax.__version__} on {dev.platform} "
            f"({dev.device_kind}), load average {os.getloadavg()[0]:.1f}")


def peak_rss_gib() -> float:
    """This process's peak resident memory so far, GiB (``ru_maxrss`` is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def device_peak_gib() -> float | None:
    """The first device's peak memory in use so far, GiB, where JAX reports it (GPUs); None on
    CPU, whose arrays are in this process's resident memory (:func:`peak_rss_gib`)."""
    import jax

    dev = jax.devices()[0]
    if dev.platform == "cpu":
        return None
    stats = dev.memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return None if peak is None else peak / 2**30


def copy_bandwidth(nbytes: int = 400 * 2**20, repeats: int = 7) -> float:
    """Bytes moved per second (read + written) by a copy of a large array: the best run.

    On CPU a numpy copy; on an accelerator a jitted copy in the device's memory (the memory the
    kernels read there), of at least 2 GiB so that the launch's fixed cost stays small beside it.
    """
    import jax

    if jax.default_backend() != "cpu":
        import jax.numpy as jnp
        x = jnp.ones(max(nbytes, 2**31) // 4, jnp.float32)
        cp = jax.jit(lambda v: v + 0.0)
        jax.block_until_ready(cp(x))
        best = min(_timed(lambda: jax.block_until_ready(cp(x))) for _ in range(repeats * 3))
        return 2 * x.nbytes / best
    a = np.ones(nbytes // 8)
    b = np.empty_like(a)
    np.copyto(b, a)
    best = min(_timed(lambda: np.copyto(b, a)) for _ in range(repeats))
    return 2 * a.nbytes / best


def _timed(fn: Callable[[], Any]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _confusions(rng: np.random.Generator, n_workers: int, n_classes: int) -> np.ndarray:
    acc = rng.uniform(0.45, 0.9, n_workers)
    off = rng.dirichlet(np.ones(n_classes - 1), (n_workers, n_classes))
    conf = np.zeros((n_workers, n_classes, n_classes))
    for k in range(n_classes):
        others = [l for l in range(n_classes) if l != k]
        conf[:, k, k] = acc
        conf[:, k, others] = (1 - acc)[:, None] * off[:, k]
    return conf


def _draw(rng: np.random.Generator, conf_rows: np.ndarray) -> np.ndarray:
    """One label per row of ``conf_rows`` ([n, L] probabilities), int8."""
    u = rng.random(conf_rows.shape[0])[:, None]
    return (u > np.cumsum(conf_rows, axis=1)[:, :-1]).sum(axis=1).astype(np.int8)


def dense_panel(n: int, n_workers: int = 12, n_classes: int = 5, seed: int = 0
                ) -> tuple[np.ndarray, np.ndarray]:
    """``(labels int8[n, workers], truth int8[n])`` drawn from Dawid-Skene's story."""
    rng = np.random.default_rng(seed)
    truth = rng.integers(0, n_classes, n).astype(np.int8)
    conf = _confusions(rng, n_workers, n_classes)
    labels = np.empty((n, n_workers), np.int8)
    for w in range(n_workers):
        labels[:, w] = _draw(rng, conf[w][truth])
    return labels, truth


def sparse_crowd(n: int, n_workers: int = 10_000, per_task: int = 3, n_classes: int = 5,
                 seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(task, worker, label, truth)``: ``per_task`` distinct annotators per task."""
    rng = np.random.default_rng(seed)
    truth = rng.integers(0, n_classes, n).astype(np.int8)
    conf = _confusions(rng, n_workers, n_classes)
    task = np.repeat(np.arange(n, dtype=np.int32), per_task)
    # distinct workers per task: a random start and distinct offsets modulo n_workers
    start = rng.integers(0, n_workers, n)
    offs = np.array([0, 1, 2][:per_task] if per_task <= 3 else range(per_task))
    worker = ((start[:, None] + offs[None, :] * 7919) % n_workers).astype(np.int32).reshape(-1)
    label = np.empty(task.shape[0], np.int8)
    step = 1 << 22
    for s in range(0, task.shape[0], step):
        t, w = task[s:s + step], worker[s:s + step]
        label[s:s + step] = _draw(rng, conf[w, truth[t]])
    return task, worker, label.astype(np.int32), truth


def tensor_from_dense(labels: np.ndarray):
    """A :class:`~crowdllm.labels.LabelTensor` of a full panel (integer ids)."""
    from ..labels import LabelTensor

    n, W = labels.shape
    return LabelTensor(task=np.repeat(np.arange(n, dtype=np.int32), W),
                       worker=np.tile(np.arange(W, dtype=np.int32), n),
                       label=labels.reshape(-1).astype(np.int32), task_ids=np.arange(n),
                       worker_ids=np.arange(W), classes=np.arange(int(labels.max()) + 1))


def dense_data(labels: np.ndarray):
    """The padded :class:`~crowdllm.aggregation._core.Dense` layout of a panel, directly."""
    import jax.numpy as jnp

    from ..aggregation._core import Dense, bucket

    n, W = labels.shape
    T = bucket(n)
    lab = np.full((T, W), -1, np.int8)
    lab[:n] = labels
    mask = np.zeros(T, np.float32)
    mask[:n] = 1
    return Dense(labels=jnp.asarray(lab), task_mask=jnp.asarray(mask),
                 worker_mask=jnp.ones(W, jnp.float32), gold=jnp.full(T, -1, jnp.int32),
                 n_classes=int(labels.max()) + 1)


def _runs(fn: Callable[[], Any], repeats: int) -> tuple[float, list[float]]:
    """``(first call seconds, seconds of each of `repeats` further calls)``, each call's
    result waited for."""
    import jax

    first = _timed(lambda: jax.block_until_ready(fn()))
    return first, [_timed(lambda: jax.block_until_ready(fn())) for _ in range(repeats)]


def _median_run(fn: Callable[[], Any], repeats: int) -> tuple[float, float]:
    """``(first call seconds, median of `repeats` further calls)``."""
    first, runs = _runs(fn, repeats)
    return first, statistics.median(runs)


def crowdkit_ds_seconds(labels: np.ndarray, n_iter: int) -> float | None:
    """crowd-kit's DawidSkene on the same panel, ``n_iter`` iterations (None if not installed)."""
    try:
        import pandas as pd
        from crowdkit.aggregation import DawidSkene as CKDawidSkene
    except ImportError:
        return None
    n, W = labels.shape
    df = pd.DataFrame({"task": np.repeat(np.arange(n), W), "worker": np.tile(np.arange(W), n),
                       "label": labels.reshape(-1).astype(np.int64)})
    return _timed(lambda: CKDawidSkene(n_iter=n_iter, tol=0.0).fit(df))


def ds_check(n: int = 1_000_000, n_workers: int = 12, n_classes: int = 5, n_iter: int = 50,
             repeats: int = 3, crowdkit_n: int | None = 100_000, reference: bool = False
             ) -> dict[str, Any]:
    """The headline check; returns the figures (also printed as a table)."""
    import jax
    import jax.numpy as jnp

    from ..aggregation import _core, _fast, _native, dawid_skene

    _progress("copy bandwidth ...")
    bw = copy_bandwidth()
    _progress(f"drawing a dense panel {n:,} x {n_workers} x {n_classes} ...")
    labels, truth = dense_panel(n, n_workers, n_classes)
    data = dense_data(labels)
    T = data.n_tasks
    # one iteration must read the int8 labels and read + write the float32 posteriors
    bytes_iter = T * n_workers * labels.itemsize + 2 * T * n_classes * 4
    floor = bytes_iter / bw
    out: dict[str, Any] = {"n": n, "workers": n_workers, "classes": n_classes, "iters": n_iter,
                           "copy_GBps": bw / 1e9, "bytes_per_iter": bytes_iter,
                           "floor_ms_per_iter": floor * 1e3}
    tol = -1.0  # the objective never drops by 1 per answer: exactly n_iter iterations

    variants: list[tuple[str, Callable[[], Any]]] = []
    why_not = _native.applies(data, jnp.float32)
    out["native"] = why_not or "used"
    if why_not is None:  # what DawidSkene runs on this machine (dense, float32)
        out["distinct_rows"] = int(jax.jit(lambda d: _native.unique(
            _native.encode(d.labels, _native.plan(d.labels.shape[1], d.n_classes)),
            _native.flags_of(d.task_mask, d.gold)).n[0])(data))
        variants += [
            ("native kernel, rows merged (default)",
             lambda: _native.ds_fit(data, max_iter=n_iter, tol=tol).posteriors),
            ("native kernel, every row",
             lambda: _native.ds_fit(data, max_iter=n_iter, tol=tol, merge=False).posteriors)]
    variants += [
        ("fused E+M (_fast.ds_fit_dense)",
         lambda: _fast.ds_fit_dense(data, max_iter=n_iter, tol=tol).posteriors),
        ("chunked sums (DawidSkene kernel)",
         lambda: dawid_skene.fit(data, max_iter=n_iter, tol=tol).posteriors),
    ]
    rows = []
    for name, fn in variants:
        _progress(f"ours: {name}: compile + {repeats} runs ...")
        first, run = _median_run(fn, repeats)
        rows.append((name, first - run, run))
    if reference:
        with _core.use_fast(False):
            _progress("one-hot einsum reference: compile + 1 run ...")
            first, run = _median_run(
                lambda: dawid_skene.fit(data, max_iter=n_iter, tol=tol).posteriors, 1)
            rows.append(("one-hot einsum reference", first - run, run))
    fit_default = _native.ds_fit if why_not is None else _fast.ds_fit_dense
    post = np.asarray(fit_default(data, max_iter=n_iter, tol=tol).posteriors)[:n]
    out["accuracy"] = float((post.argmax(1) == truth).mean())
    ck_s = ck_n = None
    if crowdkit_n:
        ck_n = min(crowdkit_n, n)
        _progress(f"crowd-kit DawidSkene at {ck_n:,} items, {n_iter} iterations ...")
        ck_s = crowdkit_ds_seconds(labels[:ck_n], n_iter)
    best = min(r[2] for r in rows if r[0] != "one-hot einsum reference")
    out["variants"] = [{"name": r[0], "compile_s": r[1], "run_s": r[2],
                        "ms_per_iter": r[2] / n_iter * 1e3,
                        "x_floor": r[2] / n_iter / floor} for r in rows]
    if ck_s is not None:
        ck_scaled = ck_s * n / ck_n
        out.update(crowdkit_n=ck_n, crowdkit_s=ck_s, crowdkit_s_scaled=ck_scaled,
                   speedup=ck_scaled / best)
        for v in out["variants"]:
            v["x_crowdkit"] = ck_scaled / v["run_s"]
    out["peak_rss_GiB"] = peak_rss_gib()
    _print_ds(out)
    return out


#: the EM / VB methods of :func:`iteration_table`, each ``(native fit or None, XLA fit)`` as a
#: function of ``(data, n_iter)`` that runs exactly ``n_iter`` iterations (stopping rules off)
def _iteration_fits() -> dict[str, tuple[Callable | None, Callable]]:
    import jax

    from ..aggregation import (_native, bwa, dawid_skene, ebcc, glad, ibcc, mace, one_coin,
                               zero_based_skill)

    key1 = jax.random.split(jax.random.key(0), 1)
    mace_kw = dict(method="vb", smoothing=0.002, learn_prior=True)
    return {
        "ds": (lambda d, n: _native.ds_fit(d, max_iter=n, tol=-1.0).posteriors,
               lambda d, n: dawid_skene.fit(d, max_iter=n, tol=-1.0).posteriors),
        "onecoin-ds": (lambda d, n: _native.onecoin_fit(d, max_iter=n, tol=-1.0).posteriors,
                       lambda d, n: one_coin.fit(d, max_iter=n, tol=-1.0).posteriors),
        "ibcc": (lambda d, n: _native.ibcc_fit(d, max_iter=n, tol=-np.inf, atol=-1.0).posteriors,
                 lambda d, n: ibcc.fit(d, max_iter=n, tol=-np.inf, atol=-1.0,
                                       native_special=False).posteriors),
        "mace": (lambda d, n: _native.mace_fit_restarts(d, key1, max_iter=n, tol=-1.0,
                                                        **mace_kw).posteriors[0],
                 lambda d, n: mace.fit_restarts(d, key1, max_iter=n, tol=-1.0,
                                                native_special=False, **mace_kw).posteriors[0]),
        "glad": (lambda d, n: _native.glad_fit(d, max_iter=n, tol=-1.0).posteriors,
                 lambda d, n: glad.fit(d, max_iter=n, tol=-1.0).posteriors),
        "bwa": (lambda d, n: _native.bwa_fit(d, max_iter=n, tol=-np.inf).posteriors,
                lambda d, n: bwa.fit(d, max_iter=n, tol=-np.inf).posteriors),
        "zbs": (lambda d, n: _native.zbs_fit(d, jax.random.key(0), max_iter=n,
                                             tol=-1.0).posteriors,
                lambda d, n: zero_based_skill.fit(d, jax.random.key(0), max_iter=n,
                                                  tol=-1.0).posteriors),
        # on the merged rows (see _merged): one restart of 10 subtypes, every sweep run
        "ebcc": tuple((lambda m, n, nat=nat: ebcc.fit(
            m[0], jax.random.key(0), m[1], n_subtypes=EBCC_SUBTYPES, restarts=1, restart_batch=1,
            max_iter=n, tol=-np.inf, atol=-1.0, native=nat, native_special=nat
        ).posteriors[m[2]])
            for nat in (True, False)),
    }


ITERATION_METHODS = ("ds", "onecoin-ds", "ibcc", "mace", "glad", "bwa", "zbs", "ebcc")
#: EBCC's subtypes in :func:`iteration_table` (its default)
EBCC_SUBTYPES = 10


def _merged(labels: np.ndarray) -> tuple[Any, Any, Any]:
    """``(data, weight, inverse)``: the panel's distinct rows as EBCC fits them (merged on the
    host, ``ebcc.merge_patterns``), each weighted by its count, and each task's row."""
    import jax.numpy as jnp

    from ..aggregation import _core, ebcc
    from ..labels import LabelTensor

    rows, counts, inverse, _ = ebcc.merge_patterns(LabelTensor.from_dense(labels), None)
    data = _core.prepare(rows, layout="dense")
    return data, ebcc._padded(counts, data.n_tasks, jnp.float32), jnp.asarray(inverse)


def iteration_table(n: int = 1_000_000, n_iter: int = 50, repeats: int = 3,
                    methods: tuple[str, ...] = ITERATION_METHODS) -> dict[str, Any]:
    """Every EM / VB kernel on one dense ``n x 12 x 5`` panel: exactly ``n_iter`` iterations
    from the prepared panel to the posteriors (setup included), the native kernel (where the
    method has one and it runs here) and the XLA path side by side, ms per iteration and its
    ratio to the one-pass floor of :func:`ds_check` (int8 labels read, float32 posteriors read
    and written, at the copy bandwidth measured in the same run). The XLA rows make no native
    call at all (IBCC's, MACE's and EBCC's digamma and gammaln in XLA too), as ``native="off"``.

    EBCC (one restart, 10 subtypes) runs on the panel's distinct rows, as the ``EBCC`` class
    does: they are merged once before its timing (the time is printed), and its own floor is
    printed too: its posteriors are 50 floats (5 classes x 10 subtypes) per distinct row, read
    and written once a sweep. So is ZBS's: its round reads the int8 labels and keeps no
    posteriors (one vote a task, made hard at once)."""
    import jax.numpy as jnp

    from ..aggregation import _native

    _progress("copy bandwidth ...")
    bw = copy_bandwidth()
    labels, truth = dense_panel(n)
    data = dense_data(labels)
    T, W = data.labels.shape
    floor = (T * W + 2 * T * 5 * 4) / bw
    why_not = _native.applies(data, jnp.float32)
    fits = _iteration_fits()
    out: dict[str, Any] = {"n": n, "iters": n_iter, "copy_GBps": bw / 1e9,
                           "floor_ms_per_iter": floor * 1e3, "native": why_not or "used",
                           "rows": []}
    if "zbs" in methods:
        out["zbs"] = {"floor_ms_per_iter": T * W / bw * 1e3}
    for m in methods:
        native_fn, xla_fn = fits[m]
        arg, skip_native = data, why_not is not None
        if m == "ebcc":
            _progress("ebcc: merging the identical rows ...")
            t0 = time.perf_counter()
            arg = _merged(labels)
            U = int(arg[1].astype(bool).sum())
            out["ebcc"] = {"merge_s": time.perf_counter() - t0, "rows": U,
                           "floor_ms_per_iter": U * 5 * EBCC_SUBTYPES * 4 * 2 / bw * 1e3}
            skip_native = _native.applies(arg[0], jnp.float32, columns=5 * EBCC_SUBTYPES) \
                is not None
        for path, fn in (("native", native_fn), ("xla", xla_fn)):
            if fn is None or (path == "native" and skip_native):
                continue
            _progress(f"{m}, {path}: compile + {repeats} runs of {n_iter} iterations ...")
            first, run = _median_run(lambda: fn(arg, n_iter), repeats)
            post = np.asarray(fn(arg, n_iter))[:n]
            out["rows"].append({"method": m, "path": path, "compile_s": first - run,
                                "run_s": run, "ms_per_iter": run / n_iter * 1e3,
                                "x_floor": run / n_iter / floor,
                                "accuracy": float((post.argmax(1) == truth).mean())})
    out["peak_rss_GiB"] = peak_rss_gib()
    _print_iterations(out)
    return out


def _print_iterations(o: dict[str, Any]) -> None:
    print(f"\nEM / VB kernels, exactly {o['iters']} iterations, dense {o['n']:,} x 12 x 5 "
          f"(setup included); floor {o['floor_ms_per_iter']:.2f} ms/iteration at "
          f"{o['copy_GBps']:.2f} GB/s; native kernel: {o['native']}")
    print(f"{'method':12s} {'path':7s} {'compile s':>10s} {'run s':>8s} {'ms/iter':>9s} "
          f"{'x floor':>8s} {'x XLA':>6s} {'accuracy':>9s}")
    xla = {r["method"]: r["run_s"] for r in o["rows"] if r["path"] == "xla"}
    for r in o["rows"]:
        ratio = f"{xla[r['method']] / r['run_s']:6.1f}" if r["method"] in xla else f"{'-':>6s}"
        print(f"{r['method']:12s} {r['path']:7s} {r['compile_s']:10.2f} {r['run_s']:8.3f} "
              f"{r['ms_per_iter']:9.2f} {r['x_floor']:8.1f} {ratio} {r['accuracy']:9.4f}")
    if "ebcc" in o:
        e = o["ebcc"]
        own = ", ".join(f"{r['path']} {r['ms_per_iter'] / e['floor_ms_per_iter']:.1f}x"
                        for r in o["rows"] if r["method"] == "ebcc")
        print(f"ebcc: one restart on the {e['rows']:,} distinct rows (merged in {e['merge_s']:.2f}"
              f" s, not timed); its own floor (50 floats of posteriors per row read and written) "
              f"{e['floor_ms_per_iter']:.2f} ms/sweep: {own}")
    if "zbs" in o:
        own = ", ".join(f"{r['path']} {r['ms_per_iter'] / o['zbs']['floor_ms_per_iter']:.1f}x"
                        for r in o["rows"] if r["method"] == "zbs")
        print(f"zbs: its own floor (the int8 labels read once a round) "
              f"{o['zbs']['floor_ms_per_iter']:.2f} ms/round: {own}")
    print(f"peak RSS of this process: {o['peak_rss_GiB']:.2f} GiB")


def _print_ds(o: dict[str, Any]) -> None:
    print(f"\nDawid-Skene, {o['iters']} EM iterations, dense {o['n']:,} x {o['workers']} x "
          f"{o['classes']} (accuracy vs truth {o['accuracy']:.3f})")
    print(f"copy bandwidth {o['copy_GBps']:.2f} GB/s (read+write); one iteration touches "
          f"{o['bytes_per_iter'] / 1e6:.1f} MB -> floor {o['floor_ms_per_iter']:.2f} ms/iteration")
    if "distinct_rows" in o:
        print(f"native kernel: used; {o['distinct_rows']:,} distinct answer rows of {o['n']:,} "
              f"(merged once per fit, inside the timed run)")
    else:
        print(f"native kernel: not used here ({o['native']})")
    print(f"{'path':38s} {'compile s':>10s} {'run s':>9s} {'ms/iter':>9s} {'x floor':>8s} "
          f"{'x crowd-kit':>12s}")
    for v in o["variants"]:
        ck = f"{v['x_crowdkit']:12.0f}" if "x_crowdkit" in v else f"{'-':>12s}"
        print(f"{v['name']:38s} {v['compile_s']:10.2f} {v['run_s']:9.3f} {v['ms_per_iter']:9.2f} "
              f"{v['x_floor']:8.1f} {ck}")
    if "crowdkit_s" in o:
        scale = "" if o["crowdkit_n"] == o["n"] else \
            f" (measured at {o['crowdkit_n']:,} items: {o['crowdkit_s']:.1f} s, scaled linearly)"
        print(f"crowd-kit DawidSkene: {o['crowdkit_s_scaled']:.1f} s{scale}")
        print(f"speed-up of our best over crowd-kit: {o['speedup']:.0f}x")
    print(f"peak RSS of this process: {o['peak_rss_GiB']:.2f} GiB")


# ------------------------------------------------------------------------- per-method table
PARAMS: dict[str, dict[str, Any]] = {
    "ds": {"max_iter": 50}, "onecoin-ds": {"max_iter": 50}, "zbs": {"max_iter": 50},
    "glad": {"max_iter": 50}, "mace": {"n_restarts": 1, "max_iter": 50},
    "mmsr": {"max_iter": 50}, "kos": {"n_iter": 50}, "ibcc": {"max_iter": 50},
    "ebcc": {"restarts": 1, "max_iter": 50}, "bwa": {"max_iter": 50},
}
#: crowd-kit's class and arguments for each of our methods it also has (same iteration counts as
#: PARAMS; tol=0 where crowd-kit takes one, so it runs them all)
CROWDKIT: dict[str, tuple[str, dict[str, Any]]] = {
    "mv": ("MajorityVote", {}), "wawa": ("Wawa", {}), "zbs": ("ZeroBasedSkill", {"n_iter": 50}),
    "ds": ("DawidSkene", {"n_iter": 50, "tol": 0.0}),
    "onecoin-ds": ("OneCoinDawidSkene", {"n_iter": 50, "tol": 0.0}),
    "glad": ("GLAD", {"n_iter": 50, "tol": 0.0, "silent": True}),
    "mace": ("MACE", {"n_restarts": 1, "n_iter": 50}), "mmsr": ("MMSR", {"n_iter": 50, "tol": 0.0}),
    "kos": ("KOS", {"n_iter": 50}),
}


def crowdkit_seconds(method: str, tensor: Any) -> float | None:
    """crowd-kit's version of ``method`` fitted once on the same answers (None: no such method in
    crowd-kit, or crowd-kit not installed)."""
    if method not in CROWDKIT:
        return None
    try:
        import pandas as pd
        import crowdkit.aggregation as ck
    except ImportError:
        return None
    name, kw = CROWDKIT[method]
    # labels as strings: crowd-kit's KOS looks labels up by value and fails on numeric codes
    df = pd.DataFrame({"task": np.asarray(tensor.task), "worker": np.asarray(tensor.worker),
                       "label": np.asarray(tensor.label).astype(str)})
    return _timed(lambda: getattr(ck, name)(**kw).fit(df))


def _drawn(kind: str, n: int, L: int, data_dir: str | None) -> dict[str, np.ndarray]:
    """The arrays of :func:`dense_panel` / :func:`sparse_crowd` (seed 0), read from
    ``data_dir`` when an earlier call saved them there (drawing 10,000,000 x 12 takes ~15 s,
    reading it back well under one), else drawn and, with ``data_dir``, saved for the next."""
    path = os.path.join(data_dir, f"{kind}-{n}-{L}.npz") if data_dir else None
    if path and os.path.exists(path):
        with np.load(path) as z:
            return dict(z)
    if kind == "dense":
        labels, truth = dense_panel(n, n_classes=L)
        arrays = {"labels": labels, "truth": truth}
    else:
        task, worker, label, truth = sparse_crowd(n, n_classes=L)
        arrays = {"task": task, "worker": worker, "label": label, "truth": truth}
    if path:
        tmp = f"{path}.{os.getpid()}.tmp.npz"  # written whole, then renamed: never half a file
        np.savez(tmp, **arrays)
        os.replace(tmp, path)
    return arrays


def workload(method: str, n: int, kind: str = "dense", data_dir: str | None = None
             ) -> tuple[Any, np.ndarray]:
    """The synthetic answers of the table, as a label tensor, and the true labels: 5 classes
    (2 for KOS, which is binary only), dense panel or sparse crowd (deterministic seeds).
    ``data_dir``: where the drawn arrays are shared between the table's subprocesses."""
    from ..labels import LabelTensor

    L = 2 if method == "kos" else 5
    a = _drawn(kind, n, L, data_dir)
    if kind == "dense":
        return tensor_from_dense(a["labels"]), a["truth"]
    return LabelTensor(task=a["task"], worker=a["worker"], label=a["label"],
                       task_ids=np.arange(n), worker_ids=np.arange(10_000),
                       classes=np.arange(L)), a["truth"]


def run_method(method: str, n: int, kind: str = "dense", repeats: int = 2,
               data_dir: str | None = None) -> dict[str, Any]:
    """Time one aggregator's ``fit`` (prepare + kernel + results) on :func:`workload`.

    ``first_s`` includes compilation, ``run_s`` is the median of ``repeats`` further fits (the
    compiled kernels are cached). ``device_peak_GiB``: the accelerator's peak memory in use
    (None on CPU, where ``peak_rss_GiB`` holds it all).
    """
    from ..aggregation import METHODS

    tensor, truth = workload(method, n, kind, data_dir)
    cls = METHODS[method]
    kw = {k: v for k, v in PARAMS.get(method, {}).items() if k in cls.parameters()}
    if "layout" in cls.parameters():
        kw["layout"] = "dense" if kind == "dense" else "coo"
    model = cls(**kw)
    first = _timed(lambda: model.fit(tensor))
    runs = [_timed(lambda: model.fit(tensor)) for _ in range(repeats)]
    run = statistics.median(runs) if runs else first
    acc = float((np.asarray(model.label_codes_) == truth).mean())
    return {"method": method, "n": n, "kind": kind, "first_s": first, "run_s": run,
            "accuracy": acc, "peak_rss_GiB": peak_rss_gib(), "device_peak_GiB": device_peak_gib()}


def run_crowdkit(method: str, n: int, kind: str = "dense", data_dir: str | None = None
                 ) -> dict[str, Any]:
    """crowd-kit's same method, one fit on the same :func:`workload` (``crowdkit_s`` None when
    crowd-kit lacks the method or is not installed)."""
    tensor, _ = workload(method, n, kind, data_dir)
    return {"crowdkit_s": crowdkit_seconds(method, tensor),
            "crowdkit_peak_rss_GiB": peak_rss_gib()}


def _subprocess(call: str, timeout: float) -> dict[str, Any]:
    """Run ``crowdllm.eval.speed.<call>`` in a fresh interpreter; its dict, or ``error``."""
    code = f"import json; from crowdllm.eval import speed; print('RESULT', json.dumps(speed.{call}))"
    try:
        p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           timeout=timeout, env=dict(os.environ))
    except subprocess.TimeoutExpired:
        return {"error": f"timeout {timeout:.0f}s"}
    line = [l for l in p.stdout.splitlines() if l.startswith("RESULT ")]
    return json.loads(line[-1][7:]) if line else {
        "error": (p.stderr.strip().splitlines() or ["?"])[-1][:120]}


def method_table(methods: list[str], sizes: list[int], kind: str = "dense", repeats: int = 1,
                 timeout: float = 1800, crowdkit_max: int = 0,
                 crowdkit_timeout: float = 600) -> list[dict[str, Any]]:
    """Each (method, size) in a fresh subprocess (so its peak RSS is its own); up to
    ``crowdkit_max`` items, crowd-kit's same method in another one, stopped after
    ``crowdkit_timeout`` seconds (``crowdkit_s`` then records the limit as a lower bound).
    The synthetic answers are drawn once per size and class count and shared through a
    temporary folder, removed at the end."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="crowdllm-speed-") as data_dir:
        return _method_rows(methods, sizes, kind, repeats, timeout, crowdkit_max,
                            crowdkit_timeout, data_dir)


def _method_rows(methods: list[str], sizes: list[int], kind: str, repeats: int, timeout: float,
                 crowdkit_max: int, crowdkit_timeout: float, data_dir: str
                 ) -> list[dict[str, Any]]:
    rows = []
    for n in sizes:
        for m in methods:
            _progress(f"{m} on {kind} {n:,} ...")
            row = {"method": m, "n": n, "kind": kind,
                   **_subprocess(f"run_method({m!r}, {n}, {kind!r}, {repeats}, {data_dir!r})",
                                 timeout)}
            if n <= crowdkit_max and m in CROWDKIT and "error" not in row:
                _progress(f"crowd-kit's {m} on {kind} {n:,} ...")
                ck = _subprocess(f"run_crowdkit({m!r}, {n}, {kind!r}, {data_dir!r})",
                                 crowdkit_timeout)
                if "error" in ck and ck["error"].startswith("timeout"):
                    row.update(crowdkit_s=crowdkit_timeout, crowdkit_timed_out=True)
                elif ck.get("crowdkit_s") is not None:
                    row.update(crowdkit_s=ck["crowdkit_s"],
                               crowdkit_peak_rss_GiB=ck["crowdkit_peak_rss_GiB"])
                elif "error" in ck:
                    row["crowdkit_error"] = ck["error"]
                if "crowdkit_s" in row:
                    row["speedup"] = row["crowdkit_s"] / max(row["run_s"], 1e-9)
            rows.append(row)
            _print_row(row)
    return rows


def _print_row(r: dict[str, Any]) -> None:
    if "error" in r:
        print(f"{r['method']:12s} {r['kind']:6s} {r['n']:>12,}  FAILED: {r['error']}", flush=True)
        return
    acc = "" if r.get("accuracy") is None else f"{r['accuracy']:.3f}"
    ck = ""
    if "crowdkit_s" in r:
        more = ">" if r.get("crowdkit_timed_out") else " "
        ck = f"{more}{r['crowdkit_s']:11.2f} {more}{r['speedup']:7.0f}x"
    elif "crowdkit_error" in r:
        ck = f"  crowd-kit failed: {r['crowdkit_error']}"
    dev = "-" if r.get("device_peak_GiB") is None else f"{r['device_peak_GiB']:.2f}"
    print(f"{r['method']:12s} {r['kind']:6s} {r['n']:>12,} {r['first_s']:10.2f} {r['run_s']:10.2f} "
          f"{r['peak_rss_GiB']:9.2f} {dev:>8s} {acc:>8s} {ck}", flush=True)


def print_header() -> None:
    """The table's column names (``peak GiB``: the process's peak RSS; ``dev GiB``: the
    accelerator's peak memory in use, ``-`` on CPU)."""
    print(f"{'method':12s} {'kind':6s} {'items':>12s} {'first s':>10s} {'run s':>10s} "
          f"{'peak GiB':>9s} {'dev GiB':>8s} {'accuracy':>8s} {'crowd-kit s':>12s} "
          f"{'speed-up':>9s}", flush=True)


def run_speed(methods: str | None = None, output: str | None = None, n: int = 1_000_000,
              crowdkit_n: int = 100_000, sizes: tuple[int, ...] = (10_000, 100_000)) -> dict:
    """``crowdllm bench --speed``: the DS check, every EM / VB kernel's iteration on the same
    panel (native and XLA), then the dense method table."""
    from ..aggregation import METHODS

    res: dict[str, Any] = {"machine": machine()}
    print(f"machine: {res['machine']}", flush=True)
    res["ds"] = ds_check(n=n, crowdkit_n=crowdkit_n)
    res["iters"] = iteration_table(n=n)
    names = [m for m in (methods or "").split(",") if m] or \
        [m for m in METHODS if m not in ("llm-judge", "ds-bayes")]
    print()
    print_header()
    res["table"] = method_table(names, list(sizes), "dense", crowdkit_max=crowdkit_n)
    if output:
        from pathlib import Path
        Path(output).write_text(json.dumps(res, indent=1))
    return res
