r"""Native CPU kernels for the EM / VB loops: Dawid-Skene's iteration by groups of annotators
(used by ``DawidSkene``, ``OneCoinDawidSkene``, ``IBCC``'s VB and ``MACE``: all four have
Dawid-Skene's E-step), and GLAD's E-step and gradient passes.

XLA's CPU code for the fused pass (:func:`._fast.ds_em_step`) runs at ~116 ms per iteration on
1,000,000 x 12 x 5 on the 2-core VM, ~70 times the memory-bandwidth floor. This module builds
hand-written AVX2 kernels (``native/ds_grouped.cc``, ``native/glad.cc``) with the system's C++
compiler on first use and calls them as XLA FFI custom calls. The grouped pass computes exactly
what the XLA pass computes, another way round:

* the annotators are cut into groups of ``s`` (as many as keep ``(L + 1) ** s <= 2048``: 4 of 12
  annotators with 5 classes), and each task row is encoded once per fit as one ``uint16`` code per
  group (the group's answers as digits in base ``L + 1``, 0 = no answer);
* per iteration a table ``tab[code, k] = sum_{w in group} log pi_w[k, y_w]`` (log prior folded
  into the first group) is built from the parameters (a few thousand entries), the E-step score
  of a row is the sum of its ``G`` table rows, and the M-step adds the row's posteriors to its
  ``G`` combinations' sums ``C[code, k]``;
* the per-annotator confusion counts are ``C`` summed over the other annotators' digits, and the
  class totals are the first group's ``C`` summed over its combinations (all tiny, in JAX).

A row then costs ``G`` vector loads and ``G`` vector read-add-writes (3 for 12 annotators) instead
of ``W x K`` lookups and adds; sums are carried in double. Before the first pass, tasks with the
same answers and gold are merged into one row weighted by their number (a hash pass in the
kernel, once per fit: 384,857 distinct rows of 1,000,000 on the synthetic 12 x 5 panel), so the
passes run over distinct rows. At 1,000,000 x 12 x 5 on the 2-core VM a whole 50-iteration fit
takes 4.4 ms per iteration (merging included) against the XLA pass's 126
(``python benchmarks/speed.py ds``). The compiled library is cached per user
(``$CROWDLLM_CACHE`` or ``~/.cache/crowdllm``; written to a temporary name and renamed, so
concurrent first uses are safe). It is used where it applies (CPU backend, x86-64 with AVX2 and
FMA, a C++ compiler, float32, dense layout, at most 8 classes; COO: see below) and skipped
otherwise, with the XLA pass in its place; ``CROWDLLM_NATIVE=0`` turns it off. Equal to the XLA
pass to float rounding (``tests/test_native.py``).

MACE's likelihood is a confusion matrix (``mace.log_confusion``), so its sweeps are the grouped
pass with MACE's counts read off the summed counts (:func:`mace_fit_restarts`). GLAD gives every
answer its own logit ``alpha_w * beta_t``, so nothing can be tabulated: :func:`glad_fit` runs its
E-step as one pass over the distinct rows (identical tasks keep identical difficulties) and its
whole M-step as one call (:func:`glad_m`: each Adam step one pass that also steps the difficulties,
then the next E pass, which also sums Q with the old posteriors: the Q check; retried with smaller
steps while Q fell), one exp per answer and pass. BWA's truth of a task is a ratio of two such table
sums per class (precision-weighted answers over summed precisions), so its sweeps are ratio passes
of the grouped kernel (:func:`bwa_fit`). ZBS's round is a skill-weighted vote and each
annotator's agreement with it: the grouped kernel's vote pass with each row's vote made hard
(:func:`hard_vote_sums`: the indicator of the voted class, ties drawn from the same counter hash
as XLA's), whose per-combination sums give every annotator's hits (:func:`zbs_fit`; Wawa's
majority vote and agreements the same way, :func:`wawa_fit`).

EBCC's latent state is a (class, subtype) pair: its sweep (:func:`ebcc_sweep`,
``native/ebcc.cc``) is the grouped pass with ``K x M`` columns per table row instead of ``K``
(the group tables summing E log V, E log tau + E log pi folded into the first group), a softmax
over those columns per row, the class posteriors summed over subtypes and their largest move,
and the per-combination sums of the weighted posteriors; rows go 8 at a time, transposed so that
the softmax and the sums over subtypes are lane-wise. 385k distinct rows of 1,000,000 x 12 x 5
with 10 subtypes: 24 ms per sweep against the XLA sweep's 102 in the same run on the 2-core AMD
VM (``python benchmarks/ebcc_sweep_native.py``). A sparse crowd's (COO) tasks go through the same
kernel as rows of one code per answer (:func:`ebcc_coo_rows`: a table row per annotator and
label instead of per group combination), in tiers by width where a few tasks have many more
answers than the rest (:func:`coo_tiers`), tasks in order of their first annotator
(:func:`coo_rank`: a block's table rows then stay in cache). With one subtype a class that sweep
is Dawid-Skene's E-step and sums, so DS, one-coin DS, IBCC and MACE run a sparse crowd on it too
(:func:`coo_use`, :class:`_Passes`): at 1,000,000 tasks x 3 answers of 10,000 annotators, 28-44
ms an iteration against the XLA path's 88-436 over two runs (``python benchmarks/coo_native.py``;
session 31, before the rows were in that order).
BWA runs a sparse crowd on the same rows with the kernel's ratio pass (each table row the
numerators, then the denominators, of the classes; :func:`coo_ratio_sums`). GLAD runs a sparse
crowd on its own passes, each task a row of answer slots (:func:`glad_coo_rows`: labels and
annotators blocked as a dense panel's labels are, in ragged blocks of 8 rows, each as wide as its
busiest task, tasks sorted by their number of answers: :func:`glad_coo_layout`), each answer's
alpha gathered by its annotator and alpha's gradient added to that annotator's sum.

The VB methods' Dirichlet statistics need digamma and log-gamma of every parameter each sweep;
:func:`digamma_gammaln` (``native/special.cc``) computes both in one pass.

Two passes on the host's arrays before a fit are plain C functions called with ``ctypes`` (not
custom calls): a sparse crowd's task order (:func:`coo_task_order`, ``native/order.cc``: a
counting sort by first annotator) and M-MSR's annotator pair counts
(:func:`pair_statistics`, ``native/pairs.cc``).
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import dataclasses
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .._cache import cache_root, switched_off

__all__ = ["available", "why_unavailable", "applies", "use", "check_option", "Plan", "plan",
           "encode", "flags_of",
           "Rows", "unique", "every_row", "tables", "vote_table", "counts_from", "sums",
           "posteriors", "coo_use", "ds_fit", "onecoin_fit", "ibcc_fit", "mace_fit_restarts",
           "decode",
           "glad_e", "glad_grad", "glad_m", "glad_rows", "glad_fit", "glad_coo_use",
           "glad_coo_layout", "GladCooLayout", "glad_coo_rows", "block", "unblock", "bwa_fit",
           "ratio_sums", "ratio_values", "ebcc_rows", "ebcc_coo_rows", "coo_row_width",
           "coo_tiers", "coo_layout", "coo_slots", "tier_call_slots", "RowWidth", "EbccTiers",
           "coo_task_order", "coo_rank", "coo_fit_args", "to_rows", "digamma_gammaln",
           "special_calls", "special_allowed", "pair_statistics", "dense_fill",
           "ebcc_sweep", "ebcc_posteriors", "ebcc_counts",
           "track_buffer", "sums_tracked", "hard_vote_sums", "zbs_fit", "wawa_fit",
           "use_for_votes"]

NATIVE_DIR = Path(__file__).with_name("native")
#: compiled together into one library; the header is part of the cache key
SOURCES = (NATIVE_DIR / "ds_grouped.cc", NATIVE_DIR / "glad.cc", NATIVE_DIR / "ebcc.cc",
           NATIVE_DIR / "special.cc", NATIVE_DIR / "pairs.cc", NATIVE_DIR / "order.cc")
HEADERS = (NATIVE_DIR / "simd.h",)
FLAGS = ("-O3", "-mavx2", "-mfma", "-std=c++17", "-shared", "-fPIC")
#: most combinations per annotator group (the group's two tables stay in cache)
MAX_COMBOS = 2048
_TARGETS = {"crowdllm_ds_grouped_sums": "CrowdllmDsGroupedSums",
            "crowdllm_ds_grouped_post": "CrowdllmDsGroupedPost",
            "crowdllm_ds_grouped_unique": "CrowdllmDsGroupedUnique",
            "crowdllm_ds_grouped_track": "CrowdllmDsGroupedTrack",
            "crowdllm_ds_grouped_ratio": "CrowdllmDsGroupedRatio",
            "crowdllm_ds_grouped_ratio_post": "CrowdllmDsGroupedRatioPost",
            "crowdllm_ds_grouped_hard": "CrowdllmDsGroupedHard",
            "crowdllm_glad_e": "CrowdllmGladE", "crowdllm_glad_grad": "CrowdllmGladGrad",
            "crowdllm_glad_m": "CrowdllmGladM",
            "crowdllm_ebcc_sweep": "CrowdllmEbccSweep", "crowdllm_ebcc_post": "CrowdllmEbccPost",
            "crowdllm_ebcc_given": "CrowdllmEbccGiven", "crowdllm_ebcc_start": "CrowdllmEbccStart",
            "crowdllm_ebcc_ratio": "CrowdllmEbccRatio",
            "crowdllm_ebcc_ratio_post": "CrowdllmEbccRatioPost",
            "crowdllm_digamma_gammaln": "CrowdllmDigammaGammaln"}
#: most latent columns (classes x subtypes) the EBCC sweep takes (a table row is 256 floats)
MAX_COLUMNS = 255

#: the plain C functions called with ctypes on host arrays (not custom calls): their results
_HOST_CALLS = {"crowdllm_task_order": None, "crowdllm_dense_fill": ctypes.c_int64,
               "crowdllm_pairs_groups": ctypes.c_int64, "crowdllm_pairs_count": ctypes.c_int64,
               "crowdllm_pairs_fill": None}
_I64 = ctypes.c_int64


def _ptr(a: np.ndarray) -> ctypes.c_void_p:
    """A contiguous host array's data, for a host call."""
    return a.ctypes.data_as(ctypes.c_void_p)


_lock = threading.Lock()
_state: dict[str, Any] = {}
_registered: set[str] = set()


def _cache_dir() -> Path:
    return cache_root() / "native"


def _cpu_ok() -> str | None:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"the CPU is {platform.machine()}, not x86-64"
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "no /proc/cpuinfo to check the CPU for AVX2 and FMA"
    for line in flags.splitlines():
        if line.startswith("flags"):
            have = set(line.split(":", 1)[1].split())
            missing = {"avx2", "fma"} - have
            return f"the CPU lacks {', '.join(sorted(missing))}" if missing else None
    return "no CPU flags in /proc/cpuinfo"


def compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")


def build(cache: Path | None = None) -> Path:
    """Compile the kernel into the cache (once per source, flags and JAX version); its path."""
    cxx = compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler (g++, c++ or $CXX) found")
    include = jax.ffi.include_dir()
    src = b"\0".join(f.read_bytes() for f in SOURCES + HEADERS)
    key = hashlib.sha256(b"\0".join([src, " ".join(FLAGS).encode(), cxx.encode(),
                                     jax.__version__.encode(), include.encode()])).hexdigest()[:16]
    cache = _cache_dir() if cache is None else Path(cache)
    lib = cache / f"kernels-{key}.so"
    if lib.exists():
        return lib
    cache.mkdir(parents=True, exist_ok=True)
    print(f"crowdllm: building the native kernels into {cache} (once, ~15 s) ...",
          file=sys.stderr, flush=True)
    fd, tmp = tempfile.mkstemp(prefix=lib.stem + ".", suffix=".tmp", dir=cache)
    os.close(fd)
    try:
        res = subprocess.run([cxx, *FLAGS, f"-I{include}", *map(str, SOURCES), "-o", tmp,
                              "-lpthread"],
                             capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"{cxx} failed to build the native kernels:\n{res.stderr[-2000:]}")
        os.replace(tmp, lib)  # atomic: a concurrent build of the same key writes the same file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return lib


def _load() -> str | None:
    """Build, load and register the kernel once per process; None, or why it is unavailable."""
    with _lock:
        if "why" in _state:
            return _state["why"]
        why = None
        if switched_off("CROWDLLM_NATIVE"):
            why = "turned off by CROWDLLM_NATIVE"
        else:
            why = _cpu_ok()
        if why is None:
            try:
                path = str(build())
                lib = ctypes.cdll.LoadLibrary(path)  # (the same handle when loaded before)
                for name, restype in _HOST_CALLS.items():
                    getattr(lib, name).restype = restype
                _state["lib"] = lib
                if path not in _registered:  # once per process (XLA keeps the targets)
                    for name, sym in _TARGETS.items():
                        jax.ffi.register_ffi_target(name,
                                                    jax.ffi.pycapsule(getattr(lib, sym)),
                                                    platform="cpu")
                    _registered.add(path)
            except Exception as exc:  # noqa: BLE001 - any failure means: use the XLA pass
                why = f"the native kernel could not be built or loaded ({exc})"
                warnings.warn(f"crowdllm: {why}; the aggregators use their XLA passes (slower)",
                              RuntimeWarning, stacklevel=3)
        _state["why"] = why
        return why


def why_unavailable() -> str | None:
    """None when the kernel can run here, else the reason (builds it on first call). The
    kernels are CPU custom calls: with a GPU as JAX's default backend the arrays live there,
    and they do not run."""
    if jax.default_backend() != "cpu":
        return f"the backend is {jax.default_backend()}, not cpu"
    return _load()


def available() -> bool:
    return why_unavailable() is None


_special = contextvars.ContextVar("crowdllm_native_special", default=True)


@contextlib.contextmanager
def special_calls(allowed: bool):
    """While a fit is traced: whether ``ibcc.digamma_gammaln`` may run as the native call
    (:func:`digamma_gammaln`) where it is available. An aggregator with ``native="off"`` traces
    its XLA fit with ``allowed=False``, so it runs (and builds) no native code at all. The fits
    take it as a static argument (``native_special``), so each setting has its own compiled
    program."""
    token = _special.set(bool(allowed))
    try:
        yield
    finally:
        _special.reset(token)


def special_allowed() -> bool:
    """See :func:`special_calls` (True unless a fit is being traced with it off)."""
    return _special.get()


def _reset() -> None:
    """Forget the load result (tests)."""
    with _lock:
        _state.clear()


# --------------------------------------------------------------------------- the encoding
class Plan(NamedTuple):
    """Annotator groups: ``groups[g]`` lists the group's annotators; combination ``c`` of group
    ``g`` is row ``offsets[g] + c`` of the table; digit ``j`` of ``c`` (base ``L + 1``) is the
    answer of ``groups[g][j]`` plus one (0 = no answer)."""
    groups: tuple[tuple[int, ...], ...]
    offsets: tuple[int, ...]
    base: int
    n_combos: int


@functools.lru_cache(maxsize=64)
def plan(n_workers: int, n_classes: int, max_combos: int = MAX_COMBOS) -> Plan | None:
    """The grouping for ``n_workers`` x ``n_classes`` (groups of at most ``max_combos``
    combinations); None when the codes overflow ``uint16``."""
    base = n_classes + 1
    size = 1
    while base ** (size + 1) <= max_combos and size < n_workers:
        size += 1
    groups = tuple(tuple(range(a, min(a + size, n_workers))) for a in range(0, n_workers, size))
    offsets, total = [], 0
    for g in groups:
        offsets.append(total)
        total += base ** len(g)
    if total > 65536:
        return None
    return Plan(groups=groups, offsets=tuple(offsets), base=base, n_combos=total)


def applies(data: Any, dtype: Any, columns: int | None = None, codes: bool = True
            ) -> str | None:
    """None when the native kernel can fit ``data`` (a Dense panel), else why not. ``columns``:
    the latent columns of a model whose latent state is not just the class (EBCC's classes x
    subtypes, at most :data:`MAX_COLUMNS`); the class count is then not limited to 8, and a Coo
    crowd qualifies too (:func:`ebcc_coo_rows`: at most 65,534 annotators x labels, where its
    rows are 16-bit ``codes``; GLAD's are not)."""
    from ._core import Coo, Dense, fast_enabled

    coo = columns is not None and isinstance(data, Coo)
    if not (isinstance(data, Dense) or coo):
        return "the data are not on the dense layout"
    if coo and codes and 2 + data.n_workers * data.n_classes > 65536:
        return (f"{data.n_workers} annotators x {data.n_classes} labels (uint16 codes: at most "
                f"{65536 - 2} on the COO layout)")
    if not fast_enabled():
        return "the reference path was asked for (_core.use_fast(False))"
    if jnp.dtype(dtype) != jnp.float32:
        return "float64 was asked for (the kernel sums in float32 lanes)"
    if jax.default_backend() != "cpu":
        return f"the backend is {jax.default_backend()}, not cpu"
    if columns is None and data.n_classes > 8:
        return f"{data.n_classes} classes (the kernel takes at most 8)"
    if columns is not None and columns > MAX_COLUMNS:
        return f"{columns} latent columns (the kernel takes at most {MAX_COLUMNS})"
    if data.n_classes > 127:
        return f"{data.n_classes} classes (gold classes are int8 flags: at most 127)"
    if not coo and plan(int(data.labels.shape[1]), int(data.n_classes)) is None:
        return "too many annotators for uint16 combination codes"
    sharding = getattr(data.task if coo else data.labels, "sharding", None)
    if sharding is not None and len(getattr(sharding, "device_set", ())) > 1:
        return "the data are sharded over several devices"
    return _load()


NATIVE_OPTIONS = ("auto", "on", "off")


def check_option(native: str) -> str:
    if native not in NATIVE_OPTIONS:
        raise ValueError(f"native must be 'auto', 'on' or 'off', got {native!r}")
    return native


#: COO rows (:func:`ebcc_coo_rows`) are as wide as the task with the most answers (or in tiers
#: by width, :func:`coo_tiers`): the kernel takes them while their slots are at most this many
#: times the answers (and biases) they hold, give or take a tier's cost (:data:`TIER_SLOTS`)
MAX_SLOTS_PER_ANSWER = 4


def _mostly_empty(slots: int, n_tasks: int, n_answers: int) -> bool:
    """Rows of ``slots`` slots for ``n_tasks`` tasks' ``n_answers`` answers are too empty to
    sweep (:data:`MAX_SLOTS_PER_ANSWER`, give or take a tier's cost)."""
    return slots > MAX_SLOTS_PER_ANSWER * (n_answers + n_tasks) + TIER_SLOTS


def use(native: str, data: Any, columns: int | None = None,
        row_slots: tuple[Any, int, int] | None = None) -> bool:
    """Whether an aggregator with option ``native`` runs ``data`` on the kernel (``on`` where it
    cannot: a ValueError saying why). ``row_slots``: ``(width, tasks, answers)`` of COO rows
    (``width``: :func:`coo_tiers`' layout, or one row width)."""
    why_not = "turned off (native='off')" if check_option(native) == "off" else \
        applies(data, data.task_mask.dtype, columns)
    if why_not is None and row_slots is not None:
        width, n_tasks, n_answers = row_slots
        slots = coo_slots(width, n_tasks)
        if _mostly_empty(slots, n_tasks, n_answers):
            widest = max(w for w, _ in _tier_list(width, n_tasks))
            why_not = (f"rows of up to {widest} slots for {n_answers / max(n_tasks, 1):.1f} "
                       f"answers a task: their {slots} slots would be mostly empty, even in "
                       f"tiers by width (COO layout)")
    if why_not is not None and native == "on":
        raise ValueError(f"native='on', but the native kernel cannot run: {why_not}")
    return why_not is None


def use_for_votes(native: str, ties: str, data: Any) -> bool:
    """:func:`use` for the vote passes (ZBS, Wawa: :func:`hard_vote_sums`), which break ties at
    random only: with ``ties="lowest"`` False, or a ValueError for ``native="on"``."""
    if ties == "lowest":
        if native == "on":
            raise ValueError("native='on', but the native vote passes break ties at random only "
                             "(ties='lowest' is XLA's argmax of exactly equal votes, which "
                             "depends on the order the kernel adds them in)")
        return False
    return use(native, data)


def runs(p: Plan) -> tuple[tuple[int, int, int, int], ...]:
    """The groups as runs of equal size: ``(first annotator, groups, size, first row)`` each (the
    full groups, then a shorter last group). The passes below work on a run at once, so a
    program's size does not grow with the number of annotators (compile time)."""
    out: list[tuple[int, int, int, int]] = []
    for g, off in zip(p.groups, p.offsets):
        if out and out[-1][2] == len(g):
            a, n, s, o = out[-1]
            out[-1] = (a, n + 1, s, o)
        else:
            out.append((g[0], 1, len(g), off))
    return tuple(out)


def encode(labels: jax.Array, p: Plan) -> jax.Array:
    """``[T, G]`` uint16 combination codes of each row (once per fit)."""
    lab = labels.astype(jnp.int32) + 1  # missing (-1) -> digit 0
    T = labels.shape[0]
    cols = []
    for a, n, s, off in runs(p):
        digits = lab[:, a: a + n * s].reshape(T, n, s)
        place = jnp.asarray(p.base ** np.arange(s), jnp.int32)
        first = off + p.base ** s * jnp.arange(n, dtype=jnp.int32)
        cols.append((digits * place).sum(axis=2) + first)
    return jnp.concatenate(cols, axis=1).astype(jnp.uint16)


def _digit_sum(x: jax.Array, s: int) -> jax.Array:
    """``x [n, s, B, K]`` (digit j of group i: ``x[i, j]``) -> ``[n, B, ..., B, K]`` (``s`` digit
    axes, little-endian: digit j is axis ``s - j``): each combination's sum over its digits."""
    n, _, B, K = x.shape
    t = None
    for j in range(s):
        shape = [n] + [1] * s + [K]
        shape[s - j] = B
        part = x[:, j].reshape(shape)
        t = part if t is None else t + part
    return jnp.broadcast_to(t, (n,) + (B,) * s + (K,))


def tables(p: Plan, log_prior: jax.Array, log_conf: jax.Array, width: int = 8) -> jax.Array:
    """``[n_combos, width]`` float32: each combination's summed log-confusion entries per class
    (the log prior folded into the first group; zeros past the classes). ``log_conf`` ``[W, K,
    L]``; ``K``, the latent columns, may differ from ``L`` (EBCC: classes x subtypes)."""
    W, K, _ = log_conf.shape
    ext = jnp.concatenate([jnp.zeros((W, 1, K), log_conf.dtype),
                           jnp.transpose(log_conf, (0, 2, 1))], axis=1)  # [W, B, K]; 0 = no answer
    parts = []
    for ri, (a, n, s, _) in enumerate(runs(p)):
        t = _digit_sum(ext[a: a + n * s].reshape(n, s, p.base, K), s)
        if ri == 0:
            t = t.at[0].add(log_prior)
        parts.append(t.reshape(-1, K))
    tab = jnp.concatenate(parts, axis=0)
    return jnp.pad(tab, ((0, 0), (0, width - K))).astype(jnp.float32)


def vote_table(p: Plan, worker_weight: jax.Array, n_classes: int) -> jax.Array:
    """``[n_combos, 8]``: each combination's votes per class (annotators weighted)."""
    K = n_classes
    onehot = jnp.concatenate([jnp.zeros((1, K), jnp.float32), jnp.eye(K, dtype=jnp.float32)])
    ext = onehot[None] * worker_weight[:, None, None]  # [W, B, K]
    parts = [_digit_sum(ext[a: a + n * s].reshape(n, s, p.base, K), s).reshape(-1, K)
             for a, n, s, _ in runs(p)]
    return jnp.pad(jnp.concatenate(parts, axis=0), ((0, 0), (0, 8 - K)))


def counts_from(p: Plan, C: jax.Array, n_classes: int, columns: int | None = None
                ) -> tuple[jax.Array, jax.Array]:
    """``(counts [W, K, L], class totals [K])`` from the per-combination sums ``C`` (``K`` =
    ``columns`` where given, else the classes)."""
    K = n_classes if columns is None else columns
    per_w = []
    for _, n, s, off in runs(p):
        Cg = C[off: off + n * p.base ** s, :K].reshape((n,) + (p.base,) * s + (K,))
        per_j = []
        for j in range(s):
            axes = tuple(1 + a for a in range(s) if a != s - 1 - j)
            # [n, K, L], "no answer" dropped
            per_j.append(Cg.sum(axis=axes)[:, 1:].transpose(0, 2, 1))
        per_w.append(jnp.stack(per_j, axis=1).reshape(n * s, K, p.base - 1))
    psum = C[: p.base ** len(p.groups[0]), :K].sum(axis=0)
    return jnp.concatenate(per_w, axis=0), psum


def _threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def flags_of(task_mask: jax.Array, gold: jax.Array) -> jax.Array:
    """int8 per row: -2 padding, -1 no gold, k gold class."""
    return jnp.where(task_mask > 0, gold, -2).astype(jnp.int8)


def _require() -> None:
    why = _load()
    if why is not None:
        raise RuntimeError(f"crowdllm's native kernels are unavailable: {why}")


class Rows(NamedTuple):
    """The distinct rows of a panel (first ``n`` of each array; the rest is inert)."""
    codes: jax.Array  # [T, G] uint16
    flags: jax.Array  # [T] int8: gold class or -1
    weights: jax.Array  # [T] float32: how many tasks each row stands for (0 past n)
    n: jax.Array  # [1] int32
    inverse: jax.Array  # [T] int32: each task's distinct row (-1 for padding rows)


def unique(codes: jax.Array, flags: jax.Array) -> Rows:
    """Merge tasks with the same codes and gold (a hash pass; padding rows dropped)."""
    _require()
    T, G = codes.shape
    out = (jax.ShapeDtypeStruct((T, G), jnp.uint16), jax.ShapeDtypeStruct((T,), jnp.int8),
           jax.ShapeDtypeStruct((T,), jnp.float32), jax.ShapeDtypeStruct((T,), jnp.int32),
           jax.ShapeDtypeStruct((1,), jnp.int32))
    ucodes, uflags, weights, inverse, n = jax.ffi.ffi_call("crowdllm_ds_grouped_unique", out)(
        codes, flags)
    return Rows(codes=ucodes, flags=uflags, weights=weights, n=n, inverse=inverse)


def sums(rows: Rows, tab: jax.Array, n_classes: int, vote: bool = False
         ) -> tuple[jax.Array, jax.Array]:
    """E-step and M-step sums in one pass over the distinct rows: ``(C [n_combos, 8],
    log-likelihood)``. ``vote``: the table holds vote weights and the posteriors are the
    normalised votes (majority-vote fractions; no log-likelihood)."""
    _require()
    out = (jax.ShapeDtypeStruct((tab.shape[0], 8), jnp.float32),
           jax.ShapeDtypeStruct((1,), jnp.float32))
    C, ll = jax.ffi.ffi_call("crowdllm_ds_grouped_sums", out)(
        rows.codes, rows.flags, rows.weights, rows.n, tab, K=np.int64(n_classes),
        threads=np.int64(_threads()), vote=np.int64(vote))
    return C, ll[0]


def track_buffer(rows: Rows, n_classes: int) -> jax.Array:
    """The buffer :func:`sums_tracked` keeps each distinct row's posteriors in (blocks of 8 rows,
    class-major: ``[ceil(T / 8), K, 8]``)."""
    return jnp.zeros(((rows.codes.shape[0] + 7) // 8 * 8 * n_classes,), jnp.float32)


def sums_tracked(rows: Rows, tab: jax.Array, n_classes: int, track: jax.Array,
                 vote: bool = False) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """:func:`sums`, also comparing each distinct row's posteriors with the ones kept in
    ``track`` by the last call: ``(C, log-likelihood, track, largest change)`` (the track
    buffer is updated in place where XLA can alias it)."""
    _require()
    out = (jax.ShapeDtypeStruct((tab.shape[0], 8), jnp.float32),
           jax.ShapeDtypeStruct((1,), jnp.float32), jax.ShapeDtypeStruct(track.shape, jnp.float32),
           jax.ShapeDtypeStruct((1,), jnp.float32))
    C, ll, track, dz = jax.ffi.ffi_call("crowdllm_ds_grouped_track", out,
                                        input_output_aliases={5: 2})(
        rows.codes, rows.flags, rows.weights, rows.n, tab, track, K=np.int64(n_classes),
        threads=np.int64(_threads()), vote=np.int64(vote))
    return C, ll[0], track, dz[0]


def posteriors(rows: Rows, tab: jax.Array, n_classes: int, vote: bool = False) -> jax.Array:
    """The E-step's posteriors of every task ``[T, K]`` (padding rows: zeros). ``vote``: the
    table holds vote weights (:func:`vote_table`) and the posteriors are the normalised votes,
    gold clamped (``_core.normalize``, ``clamp_gold``)."""
    _require()
    T = rows.inverse.shape[0]
    out = (jax.ShapeDtypeStruct((T, n_classes), jnp.float32),
           jax.ShapeDtypeStruct((1,), jnp.float32))
    post, _ = jax.ffi.ffi_call("crowdllm_ds_grouped_post", out)(
        rows.codes, rows.flags, rows.n, tab, rows.inverse, K=np.int64(n_classes),
        threads=np.int64(_threads()), vote=np.int64(vote))
    return post


def hard_vote_sums(rows: Rows, votes: jax.Array, n_classes: int, key: jax.Array) -> jax.Array:
    """``C [n_combos, 8]``: per combination, the summed indicators of its rows' voted classes
    (``votes``: :func:`vote_table`; gold rows vote their gold class), each vote made hard by
    ``_core.argmax_ties`` with random ties from ``key``, drawing the same numbers (the counter
    hash of task t's classes: row t must be task t, :func:`every_row`).

    Random ties only: they are the classes within 1e-6 of the largest fraction. The lowest
    policy's ties are XLA's argmax's, exactly equal maxima, and the kernel adds a vote in another
    order (by annotator groups): a sum of equal skills can come out one bit apart and the tie go
    the other way (on 3 of the 18 bundled datasets the kernel takes, session 35: 1 of 24 labels
    on li_quiz_chinese, the iteration count on li_quiz_english and ws_cf_amt).
    """
    _require()
    seeds = jax.random.bits(key, (2,), jnp.uint32)
    out = jax.ShapeDtypeStruct((votes.shape[0], 8), jnp.float32)
    return jax.ffi.ffi_call("crowdllm_ds_grouped_hard", out)(
        rows.codes, rows.flags, rows.weights, rows.n, votes, seeds, K=np.int64(n_classes),
        threads=np.int64(_threads()))


@functools.partial(jax.jit, static_argnames=("max_iter", "lr_steps_to_reduce"))
def zbs_fit(data: Any, key: jax.Array, *, max_iter: int = 100, tol: float = 1e-6,
            lr_init: float = 1.0, lr_steps_to_reduce: int = 20, lr_reduce_factor: float = 0.5,
            eps: float = 1e-5):
    """Zero-Based Skill with random ties, with the native kernel (a Dense panel; check
    :func:`use`): the same start, steps, tie draws, stopping rule and result as
    ``zero_based_skill.fit(..., ties=True)``. Each iteration's skill-weighted vote and agreement
    counts are one hard vote pass (:func:`hard_vote_sums`) over every task's group codes (not
    merged: each task draws its own ties); the agreements are read off the per-combination
    counts. The last vote's fractions are a native pass too (:func:`posteriors`, ``vote``;
    XLA's one-hot contraction took 55 ms at 1,000,000 x 12 x 5 on the 2-core VM, more than
    ten rounds), its labels ``_core.argmax_ties``'s."""
    from . import zero_based_skill as zbs

    agreement, vote = _vote_passes(data)
    return zbs.run(data, key, agreement, vote, ties=True, max_iter=max_iter, tol=tol,
                   lr_init=lr_init, lr_steps_to_reduce=lr_steps_to_reduce,
                   lr_reduce_factor=lr_reduce_factor, eps=eps)


@jax.jit
def wawa_fit(data: Any, key: jax.Array):
    """Wawa with random ties, with the native kernel (a Dense panel; check :func:`use`): the
    same draws and result as ``wawa.fit(..., ties=True)``. The majority vote and each
    annotator's agreement with it are one hard vote pass (the annotators' mask the weights:
    the same fractions as the vote counts'), the skill-weighted vote the post pass."""
    from .wawa import WawaResult

    agreement, vote = _vote_passes(data)
    k1, k2 = jax.random.split(key)
    skills = agreement(data.worker_mask.astype(jnp.float32), k1)
    post, labels = vote(skills, k2)
    return WawaResult(posteriors=post, labels=labels, skills=skills)


def _vote_passes(data: Any):
    """``(agreement(skills, key), vote(skills, key))`` on a Dense panel, every task its own row
    (random ties draw per task): each annotator's agreement with the ``skills``-weighted vote
    (:func:`hard_vote_sums`: its hits read off the per-combination counts), and that vote's
    ``(posteriors, labels)`` (the post pass with a vote table; the labels
    ``_core.argmax_ties``'s), ties at random from ``key``."""
    from ._core import argmax_ties

    p = plan(int(data.labels.shape[1]), int(data.n_classes))
    K = data.n_classes
    rows = every_row(encode(data.labels, p), flags_of(data.task_mask, data.gold))

    def agreement(skills, key):
        C = hard_vote_sums(rows, vote_table(p, skills.astype(jnp.float32), K), K, key)
        counts, _ = counts_from(p, C, K)  # [W, K, L]: answers l of tasks voted k
        hits = jnp.trace(counts, axis1=1, axis2=2)
        n = counts.sum(axis=(1, 2))
        return jnp.where(n > 0, hits / jnp.maximum(n, 1), 0.0).astype(skills.dtype)

    def vote(skills, key):
        post = posteriors(rows, vote_table(p, skills.astype(jnp.float32), K), K, vote=True)
        return post.astype(skills.dtype), argmax_ties(post, True, key)

    return agreement, vote


def ratio_sums(rows: Rows, num: jax.Array, den: jax.Array, n_classes: int
               ) -> tuple[jax.Array, jax.Array]:
    """``(C, C2)``, each ``[n_combos, 8]``, from one pass: per combination, the summed ratios
    ``num / den`` of the rows (each the sum of its table entries; gold rows: their class's
    indicator), and the summed squares of those ratios."""
    _require()
    out = jax.ShapeDtypeStruct((num.shape[0], 16), jnp.float32)
    C = jax.ffi.ffi_call("crowdllm_ds_grouped_ratio", out)(
        rows.codes, rows.flags, rows.weights, rows.n, num, den, K=np.int64(n_classes),
        threads=np.int64(_threads()))
    return C[:, :8], C[:, 8:]


def ratio_values(rows: Rows, num: jax.Array, den: jax.Array, n_classes: int) -> jax.Array:
    """Every task's ratios ``[T, K]`` (padding rows: zeros)."""
    _require()
    out = jax.ShapeDtypeStruct((rows.inverse.shape[0], n_classes), jnp.float32)
    return jax.ffi.ffi_call("crowdllm_ds_grouped_ratio_post", out)(
        rows.codes, rows.flags, rows.n, num, den, rows.inverse, K=np.int64(n_classes),
        threads=np.int64(_threads()))


def every_row(codes: jax.Array, flags: jax.Array) -> Rows:
    """Every task its own row (no merging; padding rows weigh 0)."""
    T = codes.shape[0]
    return Rows(codes=codes, flags=jnp.where(flags == -2, -1, flags).astype(jnp.int8),
                weights=(flags != -2).astype(jnp.float32), n=jnp.full((1,), T, jnp.int32),
                inverse=jnp.arange(T, dtype=jnp.int32))


def _setup(data: Any, merge: bool) -> tuple[Plan, Rows, jax.Array]:
    """The plan, the (merged) rows and the vote table of a fit (once per fit)."""
    p = plan(int(data.labels.shape[1]), int(data.n_classes))
    codes, flags = encode(data.labels, p), flags_of(data.task_mask, data.gold)
    rows = unique(codes, flags) if merge else every_row(codes, flags)
    return p, rows, vote_table(p, data.worker_mask.astype(jnp.float32), data.n_classes)


def _n_answers(counts: jax.Array) -> jax.Array:
    """Every task's posteriors sum to one, so the summed counts are the number of answers, to
    float rounding (XLA's ``(labels >= 0).sum()`` over the int8 panel took 24 ms at 1M x 12)."""
    return jnp.maximum(jnp.round(counts.sum()), 1.0)


def _vote_posteriors(data: Any) -> jax.Array:
    """The start's posteriors (majority vote, gold clamped): the result when no sweep runs."""
    from ._core import vote_posteriors

    return vote_posteriors(data, jnp.float32)


def _row_votes(data: Any, rank: jax.Array) -> jax.Array:
    """:func:`_vote_posteriors` of a Coo crowd's tasks in row order (task t in row ``rank[t]``),
    counted there: not made per task and then moved (a second ``[T, K]`` array at the peak).
    The counts are whole numbers, the same in any order of adding."""
    from ._core import clamp_gold, normalize, task_vote

    counts = task_vote(data, data.worker_mask.astype(jnp.float32), rank)
    return clamp_gold(normalize(counts), to_rows(data.gold, rank))


def _gold_counts(p: Plan, rows: Rows, votes: jax.Array, K: int) -> tuple[jax.Array, jax.Array]:
    """``(counts [W, K, L], class totals [K])`` of the gold tasks alone (a vote pass: their
    posteriors are clamped to their gold class)."""
    gold_rows = rows._replace(weights=rows.weights * (rows.flags >= 0))
    return counts_from(p, sums(gold_rows, votes, K, vote=True)[0], K)


def coo_use(native: str, data: Any, tensor: Any, columns: int | None = None
            ) -> tuple[bool, RowWidth | None]:
    """``(runs native, row width)``: :func:`use` on a Dense panel (width None); a Coo crowd (the
    answers of ``tensor``) runs as rows of its answers' codes (``width``: one row width, or
    tiers of widths, :func:`coo_tiers`) on EBCC's sweep, where its annotators x labels fit
    uint16 codes (the width is None where it does not run). ``columns``: the
    latent columns, as for :func:`use` (EBCC's classes x subtypes; on COO by default the
    classes, a model whose E-step is Dawid-Skene's: :func:`_passes`)."""
    from ._core import Coo

    if not isinstance(data, Coo):
        return use(native, data, columns), None
    from ._core import shared_row_width

    columns = data.n_classes if columns is None else columns
    width = coo_layout(data, tensor, columns)
    on = use(native, data, columns=columns, row_slots=(width, tensor.n_tasks, tensor.n_answers))
    if on and not isinstance(width, tuple):  # inside shared_shapes: the group's (one program)
        width = max(width, shared_row_width(tensor))
    return on, width if on else None


class _Passes(NamedTuple):
    """A fit's passes over its rows, for a model whose E-step is Dawid-Skene's (a Dense panel:
    its merged rows and group tables; a Coo crowd: its tasks as rows of answer codes, on EBCC's
    sweep with one subtype a class, whose E-step is then Dawid-Skene's: a gold task's other
    classes are ruled out, so its log Z is its gold class's score).

    ``vote_counts(gold_only)``: ``(counts [W, K, L], class totals [K])`` of the majority vote's
    posteriors (gold clamped; ``gold_only``: of the gold tasks alone). ``sweep(log_prior,
    log_conf, track)``: one E-step and its sums, ``(counts, class totals, log-likelihood, track,
    largest move)``; ``track`` keeps the last sweep's posteriors (None: a Dense fit that does
    not track them, and then neither are the last two). ``posteriors(log_prior, log_conf)``: an
    E-step's posteriors ``[T, K]``. ``last(log_prior, log_conf, track)``: the posteriors of the
    sweep that left ``track``, under the parameters it used (a Coo crowd's are ``track``).
    ``track``: the start's (the majority vote's posteriors, or None).
    """
    vote_counts: Any
    sweep: Any
    posteriors: Any
    last: Any
    track: Any


def _passes(data: Any, merge: bool, width: RowWidth | None, track: bool,
            rank: jax.Array | None = None) -> _Passes:
    """The passes of a fit on ``data`` (``width``: a Coo crowd's row width, :func:`coo_use`;
    ``track``: the sweeps track the posteriors, as IBCC's stopping rule needs; a Coo crowd's
    always do; ``rank``: its tasks' rows, :func:`coo_rank`, whose order the tracked posteriors
    keep, the others being given back in the tasks' order)."""
    K = data.n_classes
    if width is not None:
        gold_w = (data.gold >= 0).astype(jnp.float32)
        wts = data.task_mask.astype(jnp.float32)
        if rank is None:
            post0 = _vote_posteriors(data)
        else:
            wts, gold_w = (to_rows(x, rank) for x in (wts, gold_w))
            post0 = _row_votes(data, rank)
        rows = ebcc_coo_rows(data, width, rank)

        def coo_vote(gold_only):
            return ebcc_counts(rows, wts * gold_w if gold_only else wts, post0[:, :, None], K)

        def coo_sweep(log_prior, log_conf, z):
            z, ll, counts, psum, dz = ebcc_sweep(rows, wts, log_prior, log_conf, z, 1)
            return counts, psum, ll, z, dz

        def coo_post(log_prior, log_conf):
            return _from_rows(ebcc_posteriors(rows, log_prior, log_conf, 1)[:, :, 0], rank)

        return _Passes(coo_vote, coo_sweep, coo_post, lambda lp, lc, z: _from_rows(z, rank),
                       post0)
    p, rows, votes = _setup(data, merge)
    track0 = C0 = None
    if track:  # the start's posteriors kept in the track buffer
        C0, _, track0, _ = sums_tracked(rows, votes, K, track_buffer(rows, K), vote=True)

    def vote(gold_only):
        if gold_only:  # gold rows' vote posteriors are their gold class
            return _gold_counts(p, rows, votes, K)
        return counts_from(p, sums(rows, votes, K, vote=True)[0] if C0 is None else C0, K)

    def sweep(log_prior, log_conf, tr):
        tab = tables(p, log_prior, log_conf)
        if tr is None:
            C, ll = sums(rows, tab, K)
            return (*counts_from(p, C, K), ll, None, None)
        C, ll, tr, dz = sums_tracked(rows, tab, K, tr)
        return (*counts_from(p, C, K), ll, tr, dz)

    def post(log_prior, log_conf):
        return posteriors(rows, tables(p, log_prior, log_conf), K)

    return _Passes(vote, sweep, post, lambda lp, lc, tr: post(lp, lc), track0)


class _State(NamedTuple):
    params: Any
    used: Any  # the parameters the last E-step used (its posteriors are the result)
    track: Any  # the last E-step's posteriors, where the passes track them (_Passes)


def _em(data: Any, *, merge: bool, max_iter: int, tol: Any, log_params: Any, update: Any,
        prior_term: Any, start_gold: Any = None, width: RowWidth | None = None,
        rank: jax.Array | None = None):
    """EM with the native kernels for a model whose E-step is Dawid-Skene's.

    ``update(counts, psum)``: parameters from the summed counts of the posteriors (the start:
    of the majority-vote posteriors); ``log_params(params)``: ``(log prior [K], log confusion
    [W, K, L])``; ``prior_term(params)``: the log prior density added to the log-likelihood;
    ``start_gold(params, counts, psum)``: the start adjusted by the counts of the gold tasks
    alone (or None); ``width``: a Coo crowd's row width (:func:`coo_use`; None for a Dense
    panel), ``rank``: its tasks' rows (:func:`coo_rank`; None: row t). Returns ``(params,
    posteriors, Loop)``.
    """
    from ._core import iterate

    ps = _passes(data, merge, width, track=False, rank=rank)
    counts0, psum0 = ps.vote_counts(False)
    params0 = update(counts0, psum0)
    n_ans = _n_answers(counts0)
    if start_gold is not None:
        params0 = start_gold(params0, *ps.vote_counts(True))

    def step(st):
        counts, psum, ll, track, _ = ps.sweep(*log_params(st.params), st.track)
        obj = (ll + prior_term(st.params)) / n_ans
        return _State(update(counts, psum), st.params, track), obj

    st, loop = iterate(step, _State(params0, params0, ps.track), max_iter=max_iter, tol=tol)
    if max_iter == 0:  # no E-step ran
        post = _vote_posteriors(data)
    else:  # the last E-step's posteriors
        post = ps.last(*log_params(st.used), st.track)
    return st.params, post, loop


@functools.partial(jax.jit, static_argnames=("max_iter", "init_from_gold", "merge", "width"))
def ds_fit(data: Any, *, max_iter: int = 100, tol: float = 1e-5, smoothing: float = 0.01,
           init_from_gold: bool = False, merge: bool = True, width: RowWidth | None = None,
           rank: jax.Array | None = None):
    """Dawid-Skene with the native kernel: same model, start, stopping rule, objective and
    result as ``dawid_skene.fit`` (check :func:`coo_use` first). On a Dense panel, ``merge``:
    merge identical answer rows first (the default; off only to measure what merging buys); on a
    Coo crowd, ``width``: its row width (:func:`coo_use`), ``rank``: its tasks' rows
    (:func:`coo_rank`; the sweeps run fastest with tasks of one annotator together)."""
    from . import dawid_skene as ds
    from ._fast import _ds_params

    def start_gold(params, counts, psum):  # gold tasks' confusion, where an annotator has any
        log_prior, log_conf = params
        has_gold = counts.sum(axis=(1, 2)) > 0
        return log_prior, jnp.where(has_gold[:, None, None], _ds_params(counts, psum, smoothing)[1],
                                    log_conf)

    update = functools.partial(_ds_params, smoothing=smoothing)
    (log_prior, log_conf), post, loop = _em(
        data, merge=merge, max_iter=max_iter, tol=tol, log_params=lambda q: q, update=update,
        prior_term=lambda q: ds.log_prior_density(data, *q, smoothing),
        start_gold=start_gold if init_from_gold else None, width=width, rank=rank)
    return ds.DSResult(posteriors=post, priors=jnp.exp(log_prior), confusion=jnp.exp(log_conf),
                       objective=loop.objective, history=loop.history, n_iter=loop.n_iter,
                       converged=loop.converged)


@functools.partial(jax.jit, static_argnames=("max_iter", "merge", "width"))
def onecoin_fit(data: Any, *, max_iter: int = 100, tol: float = 1e-5, smoothing: float = 0.01,
                merge: bool = True, width: RowWidth | None = None,
                rank: jax.Array | None = None):
    """One-coin Dawid-Skene with the native kernel: the E-step is Dawid-Skene's with one-coin
    confusion matrices, and the M-step's agreements and answer counts are the diagonal and the
    total of the same summed counts. Same result as ``one_coin.fit``."""
    from . import one_coin as oc
    from ._core import TINY, normalize

    K = data.n_classes

    def update(counts, psum):
        hits = jnp.trace(counts, axis1=1, axis2=2)
        n = counts.sum(axis=(1, 2))
        skills = jnp.where(n + 2 * smoothing > 0,
                           (hits + smoothing) / jnp.maximum(n + 2 * smoothing, TINY), 0.5)
        prior = jnp.maximum(normalize(psum + smoothing), TINY)
        return jnp.log(prior), jnp.clip(skills, TINY, 1 - TINY)

    def prior_term(q):
        log_prior, s = q
        return smoothing * (((jnp.log(s) + jnp.log1p(-s)) * data.worker_mask).sum()
                            + log_prior.sum())

    (log_prior, skills), post, loop = _em(
        data, merge=merge, max_iter=max_iter, tol=tol,
        log_params=lambda q: (q[0], oc.log_confusion(q[1], K)), update=update,
        prior_term=prior_term, width=width, rank=rank)
    return oc.OneCoinResult(posteriors=post, priors=jnp.exp(log_prior), skills=skills,
                            objective=loop.objective, history=loop.history, n_iter=loop.n_iter,
                            converged=loop.converged)


class _VBCarry(NamedTuple):
    nu: jax.Array
    mu: jax.Array
    used_nu: jax.Array
    used_mu: jax.Array
    track: jax.Array
    dz: jax.Array  # the largest move of a class posterior in the sweep that made this carry


@functools.partial(jax.jit, static_argnames=("max_iter", "merge", "width"))
def ibcc_fit(data: Any, *, max_iter: int = 500, tol: float = 1e-7, atol: float = 1e-3,
             alpha: float = 1.0, beta_diag: float = 4.0, beta_off: float = 1.0,
             merge: bool = True, width: RowWidth | None = None,
             rank: jax.Array | None = None):
    """IBCC by mean-field VB with the native kernel. A sweep's q(z) is Dawid-Skene's E-step with
    the tables of E[log rho], E[log pi]; q(rho), q(pi) are the priors plus the summed counts;
    the kernel keeps each distinct row's q(z) to give the largest move of a class posterior
    (the stopping rule). Same start, sweeps, stopping rule, ELBO and result as ``ibcc.fit``.
    ``width``: a Coo crowd's row width (:func:`coo_use`), ``rank``: its tasks' rows
    (:func:`coo_rank`)."""
    from . import ibcc

    K = data.n_classes
    alpha_k = jnp.full((K,), alpha, jnp.float32)
    beta = ibcc.confusion_prior(K, beta_diag, beta_off, jnp.float32)
    # the start: majority-vote q(z) (kept in the track), and the q(rho), q(pi) it implies
    ps = _passes(data, merge, width, track=True, rank=rank)
    counts0, psum0 = ps.vote_counts(False)
    n_ans = _n_answers(counts0)
    nu0, mu0 = alpha_k + psum0, beta[None] + counts0

    def step(st):
        stats = ibcc.dirichlet_stats(st.nu, st.mu)
        counts, psum, ll, track, dz = ps.sweep(stats[0][0], stats[1][0], st.track)
        obj = (ll + ibcc.elbo_params(data, st.nu, st.mu, alpha_k, beta, stats)) / n_ans
        return _VBCarry(alpha_k + psum, beta[None] + counts, st.nu, st.mu, track, dz), obj

    start = _VBCarry(nu0, mu0, nu0, mu0, ps.track, jnp.asarray(jnp.inf, jnp.float32))
    st, loop = ibcc.vb_loop(step, start, lambda new, old: new.dz, max_iter=max_iter, tol=tol,
                            atol=atol)
    # the result is the last sweep's: q(z) from the q(rho), q(pi) it used, and those
    if max_iter == 0:
        post = _vote_posteriors(data)
    else:
        stats = ibcc.dirichlet_stats(st.used_nu, st.used_mu)
        post = ps.last(stats[0][0], stats[1][0], st.track)
    nu, mu = st.used_nu, st.used_mu
    return ibcc.IBCCResult(posteriors=post, nu=nu, mu=mu, priors=nu / nu.sum(),
                           confusion=mu / mu.sum(axis=-1, keepdims=True),
                           objective=loop.objective, history=loop.history, n_iter=loop.n_iter,
                           converged=loop.converged)


@functools.partial(jax.jit, static_argnames=("max_iter", "method", "init_from_gold", "learn_prior",
                                             "merge", "width"))
def mace_fit_restarts(data: Any, keys: jax.Array, *, max_iter: int = 50, tol: float = 1e-5,
                      method: str = "vb", smoothing: float = 0.0, a: float = 0.5, b: float = 0.5,
                      gamma: float = 10.0, default_noise: float = 0.5,
                      init_from_gold: bool = False, learn_prior: bool = False,
                      delta: float = 1.0, merge: bool = True, width: RowWidth | None = None,
                      rank: jax.Array | None = None):
    """MACE's restarts with the native kernel (same starts, sweeps, objective and results as
    ``mace.fit_restarts``). MACE's likelihood is a confusion matrix (``mace.log_confusion``), so
    its E-step is Dawid-Skene's; its expected counts are the diagonal (posterior mass of the
    labels given) and the column sums (answers given) of the summed counts. The rows are merged
    once; the restarts run one after another (``lax.map``), each stopping on its own. ``width``:
    a Coo crowd's row width (:func:`coo_use`; its sweeps carry their posteriors in the state's
    ``posteriors``, in the order of its rows, ``rank``: :func:`coo_rank`)."""
    from . import mace
    from ._core import iterate

    if method not in ("em", "vb"):
        raise ValueError(f"method must be 'em' or 'vb', got {method!r}")
    K = data.n_classes
    kw = dict(method=method, smoothing=smoothing, a=a, b=b, gamma=gamma,
              learn_prior=learn_prior, delta=delta)
    ps = _passes(data, merge, width, track=False, rank=rank)
    # each annotator's answers (and hits on gold tasks) from the vote pass's counts
    counts0, _ = ps.vote_counts(False)
    n_ans = _n_answers(counts0)
    n_given = counts0.sum(axis=(1, 2))
    gold_counts = None
    if init_from_gold:  # gold rows' vote posteriors are their gold class
        counts_g, _ = ps.vote_counts(True)
        gold_counts = (counts_g.sum(axis=(1, 2)), jnp.trace(counts_g, axis1=1, axis2=2))
    n_tasks = data.task_mask.sum()

    def expected(params, track):  # the E-step's counts and log-likelihood under params
        counts, psum, ll, track, _ = ps.sweep(params.log_prior, mace.log_confusion(params), track)
        know_frac = mace._answer_terms(params)[2]
        m, n = jnp.diagonal(counts, axis1=1, axis2=2), counts.sum(axis=1)
        return mace._state(know_frac, m, n, track, psum), ll

    def step(state):
        params, prior_term = mace.m_step(data, state, **kw)
        new, ll = expected(params, state.posteriors)
        return new, (ll + prior_term) / n_ans

    def one(key):
        known, spam, strat = mace.start_counts(n_given, key, K, default_noise=default_noise,
                                               gold_counts=gold_counts)
        state = mace.MaceState(known=known, spam=spam, strategy=strat, posteriors=ps.track,
                               class_sum=jnp.full((K,), n_tasks / K, jnp.float32))
        start = known / jnp.maximum(known + spam, mace.TINY)
        state, loop = iterate(step, state, max_iter=max_iter, tol=tol)
        params, _ = mace.m_step(data, state, **kw)  # the posteriors of the final parameters
        post = ps.posteriors(params.log_prior, mace.log_confusion(params))
        theta, xi = mace._summary(data, state, **kw)
        return mace.MaceResult(posteriors=post, knowing=theta, strategy=xi,
                               objective=loop.objective, history=loop.history,
                               n_iter=loop.n_iter, converged=loop.converged,
                               start_knowing=start, priors=mace._prior_summary(state, **kw))

    return jax.lax.map(one, keys)


# --------------------------------------------------------------------------- GLAD
def decode(codes: jax.Array, p: Plan, n_workers: int) -> jax.Array:
    """The answers ``[T, W]`` (int8, -1 = none) of combination codes ``[T, G]`` (codes out of
    range, as in the inert rows past a merge's count, decode to some answers: mask them)."""
    parts, gi = [], 0
    for _, n, s, off in runs(p):
        combos = np.arange(p.base ** s)
        digits = np.stack([(combos // p.base ** j) % p.base - 1 for j in range(s)], axis=1)
        first = off + p.base ** s * np.arange(n)
        c = jnp.clip(codes[:, gi: gi + n].astype(jnp.int32) - jnp.asarray(first, jnp.int32),
                     0, len(combos) - 1)
        # a gather of short table rows
        parts.append(jnp.asarray(digits.astype(np.int8))[c].reshape(-1, n * s))
        gi += n
    return jnp.concatenate(parts, axis=1)[:, :n_workers]


def _slot_workers(widx: jax.Array | None) -> jax.Array:
    """The GLAD kernels' annotators of the answer slots: ``widx`` (a sparse crowd's, shaped like
    its labels) or none (a dense panel's slot s is annotator s)."""
    return jnp.zeros((0,), jnp.int32) if widx is None else widx.astype(jnp.int32)


def _block_offsets(boff: jax.Array | None) -> jax.Array:
    """The GLAD kernels' block offsets: ``boff`` (a sparse crowd's ragged blocks, ``[T/8 + 1]``,
    :func:`glad_coo_rows`) or none (labels ``[T/8, S, 8]``, every block S slots)."""
    return jnp.zeros((0,), jnp.int32) if boff is None else boff.astype(jnp.int32)


def glad_e(lab_b: jax.Array, flags: jax.Array, weights: jax.Array, n: jax.Array,
           alpha: jax.Array, log_beta: jax.Array, log_prior: jax.Array, p_prev: jax.Array,
           want_post: bool = False, widx: jax.Array | None = None,
           boff: jax.Array | None = None):
    """GLAD's E pass over the first ``n`` rows of the blocked answers ``lab_b [T/8, W, 8]``
    (a sparse crowd's: ``[Z, 8]``, its blocks of 8 rows ragged, block b's slots from
    ``boff[b]`` to ``boff[b + 1]``, and ``widx`` their annotators, :func:`glad_coo_rows`):
    ``(posteriors [T, K] or None, q_t(y_tw)`` shaped like ``lab_b``, weighted log-likelihood,
    weighted Q answer term, weighted class sums ``[K])``; T rows, the weights'. ``p_prev`` (a
    buffer shaped like ``lab_b``, e.g. the last pass's) is reused for the new ``q_t(y_tw)``."""
    _require()
    T = weights.shape[0]
    K = log_prior.shape[0]
    out = (jax.ShapeDtypeStruct((T if want_post else 1, K), jnp.float32),
           jax.ShapeDtypeStruct(lab_b.shape, jnp.float32),
           jax.ShapeDtypeStruct((2 + K,), jnp.float32))
    post, pr, stats = jax.ffi.ffi_call("crowdllm_glad_e", out, input_output_aliases={9: 1})(
        lab_b, _slot_workers(widx), _block_offsets(boff), flags, weights, n, alpha, log_beta,
        log_prior, p_prev, threads=np.int64(_threads()))
    return post if want_post else None, pr, stats[0], stats[1], stats[2:]


def glad_grad(lab_b: jax.Array, weights: jax.Array, n: jax.Array, p_right: jax.Array,
              alpha: jax.Array, log_beta: jax.Array, *, grad: bool = True, q: bool = False,
              widx: jax.Array | None = None, boff: jax.Array | None = None):
    """GLAD's gradient pass: ``(sum_t n_t g_tw beta_t [W], sum_w g_tw x_tw [T], Q answer
    term)`` with ``g = q_t(y_tw) - sigma(x_tw)`` (the priors' terms are added by the caller;
    ``widx``, ``boff``: as for :func:`glad_e`)."""
    _require()
    T, W = weights.shape[0], alpha.shape[0]
    out = (jax.ShapeDtypeStruct((W,), jnp.float32), jax.ShapeDtypeStruct((T,), jnp.float32),
           jax.ShapeDtypeStruct((1,), jnp.float32))
    da, db, qv = jax.ffi.ffi_call("crowdllm_glad_grad", out)(
        lab_b, _slot_workers(widx), _block_offsets(boff), weights, n, p_right, alpha, log_beta,
        threads=np.int64(_threads()),
        mode=np.int64(int(grad) + 2 * int(q)))
    return da, db, qv[0]


def glad_m(lab_b: jax.Array, flags: jax.Array, weights: jax.Array, n: jax.Array,
           p_bufs: tuple[jax.Array, jax.Array, jax.Array], state: Any, q_old: jax.Array,
           worker_mask: jax.Array, log_prior_next: jax.Array,
           g1: tuple[jax.Array, Any] | None = None, *, lr: Any, m_steps: int, mu_alpha: Any,
           mu_beta: Any, max_tries: int = 4, widx: jax.Array | None = None,
           boff: jax.Array | None = None):
    """GLAD's whole M-step in one call, and the next E-step: ``glad.adam_steps`` with
    ``glad.q_grad``'s gradients and Q (the Gaussian priors included), on the rows.

    ``p_bufs``: ``(p0, p1, which)``, two buffers shaped like ``lab_b`` of which ``p[which]``
    holds ``q_t(y_tw)`` (the other is scratch); ``state``: the ``GladState`` before the step
    (its params, optax Adam state and lr scale); ``q_old``: Q there; ``log_prior_next``: the next
    E-step's log class prior; ``g1``: ``(sums, have)``, the first step's gradient sums at
    ``state``'s parameters (``[W + T]``: :func:`glad_grad`'s ``d_alpha`` then ``d_b``, as the
    last call returned them) and 1, or ``have`` 0 (or ``g1`` None) to sum them in a pass.

    Returns ``(params, opt_state, lr scale, tries, p_bufs, e, g1)``: the buffers with the next
    E-step's ``q_t(y_tw)`` (at the returned params and ``log_prior_next``) written into the one
    that was scratch and ``which`` flipped, ``e`` = that E-step's ``(weighted log-likelihood, Q
    answer term, class sums)``, as :func:`glad_e` gives them, and ``g1`` = the gradient sums
    there, for the next call. Each try is ``m_steps`` gradient steps that also step the
    difficulties (a pass each, but the first when ``g1`` is given), then the E pass at the try's
    parameters, which sums Q's answer term with the old ``q_t(y_tw)`` as it writes the new one
    (the Q check: one pass, not a Q pass and an E pass), and the gradient sums at the new
    parameters with the new one (the next M-step's first step). ``widx``, ``boff``: as for
    :func:`glad_e`."""
    from . import glad

    _require()
    T, W = weights.shape[0], state.params.alpha.shape[0]
    K = log_prior_next.shape[0]
    prm, opt = state.params, state.opt_state
    f32 = jnp.float32
    scalars = jnp.stack([jnp.asarray(v, f32) for v in (state.lr_scale, q_old, lr, mu_alpha,
                                                       mu_beta)])
    vec = lambda m: jax.ShapeDtypeStruct((m,), f32)  # noqa: E731
    p_shape = jax.ShapeDtypeStruct(lab_b.shape, f32)
    scalar_i32 = jax.ShapeDtypeStruct((), jnp.int32)
    out = (vec(W), vec(T), scalar_i32, vec(W), vec(T), vec(W), vec(T), vec(3), p_shape,
           p_shape, scalar_i32, vec(2 + K), vec(W + T))
    p0, p1, which = p_bufs
    g1, have = (jnp.zeros((W + T,), f32), 0) if g1 is None else g1
    have = jnp.asarray(have, jnp.int32)
    al, lb, count, ma, mb, va, vb, info, p0, p1, which, stats, g1 = jax.ffi.ffi_call(
        "crowdllm_glad_m", out, input_output_aliases={6: 8, 7: 9})(
        lab_b, _slot_workers(widx), _block_offsets(boff), flags, weights, n, p0, p1,
        which.astype(jnp.int32),
        prm.alpha, prm.log_beta, opt.count, opt.mu.alpha, opt.mu.log_beta, opt.nu.alpha,
        opt.nu.log_beta, scalars, worker_mask.astype(f32), log_prior_next.astype(f32), g1, have,
        threads=np.int64(_threads()), m_steps=np.int64(m_steps), max_tries=np.int64(max_tries),
        b1=np.float32(glad.ADAM_B1), b2=np.float32(glad.ADAM_B2), eps=np.float32(glad.ADAM_EPS),
        alpha_max=np.float32(glad.ALPHA_MAX), log_beta_min=np.float32(glad.LOG_BETA_MIN),
        log_beta_max=np.float32(glad.LOG_BETA_MAX))
    opt = opt._replace(count=count, mu=glad.GladParams(ma, mb), nu=glad.GladParams(va, vb))
    return (glad.GladParams(al, lb), opt, info[0], info[1], (p0, p1, which),
            (stats[0], stats[1], stats[2:]), g1)


def block(x: jax.Array) -> jax.Array:
    """``[T, W] -> [T/8, W, 8]`` (T a multiple of 8): the GLAD kernels' layout."""
    T, W = x.shape
    return x.reshape(T // 8, 8, W).transpose(0, 2, 1)


def unblock(x: jax.Array) -> jax.Array:
    """``[T/8, W, 8] -> [T, W]``."""
    B, W, _ = x.shape
    return x.transpose(0, 2, 1).reshape(B * 8, W)


@functools.partial(jax.jit, static_argnames=("merge",))
def _glad_rows(data: Any, merge: bool) -> Rows:
    return _setup(data, merge)[1]


@functools.partial(jax.jit, static_argnames=("n_workers", "n_classes", "size"))
def _glad_sized(rows: Rows, n_workers: int, n_classes: int, size: int):
    """The first ``size`` rows (a multiple of 8; padded past the panel's), answers decoded and
    blocked, rows past the count inert (no answers, weight 0)."""
    T = rows.codes.shape[0]
    codes, flags, wts = rows.codes, rows.flags, rows.weights
    if size <= T:
        codes, flags, wts = codes[:size], flags[:size], wts[:size]
    else:
        codes = jnp.pad(codes, ((0, size - T), (0, 0)))
        flags = jnp.pad(flags, (0, size - T), constant_values=-1)
        wts = jnp.pad(wts, (0, size - T))
    valid = jnp.arange(size) < rows.n[0]
    lab = decode(codes, plan(n_workers, n_classes), n_workers)
    lab = jnp.where(valid[:, None], lab, -1)
    return block(lab), jnp.where(valid, flags, -1), jnp.where(valid, wts, 0.0)


def glad_rows(data: Any, merge: bool = True):
    """``(answers [S/8, W, 8], gold flags [S], weights [S], n, inverse)``: the distinct rows of a
    Dense panel (every row with ``merge=False``), counted on the host and cut to their size
    bucket ``S`` (a multiple of 8), so a fit compiles once per bucket."""
    from ._core import bucket

    rows = _glad_rows(data, merge)
    size = -(-bucket(int(rows.n[0])) // 8) * 8
    return (*_glad_sized(rows, int(data.labels.shape[1]), data.n_classes, size), rows.n,
            rows.inverse)


def answer_slots(data: Any) -> jax.Array:
    """Each answer's place among its task's answers, ``[A]`` (a Coo crowd's answers are sorted
    by task). A minimum over each task's answers: at 30M answers XLA's ``searchsorted`` of the
    tasks' starts took ~0.9 s, this ~0.15 (session 31)."""
    i = jnp.arange(data.task.shape[0], dtype=jnp.int32)
    first = jax.ops.segment_min(i, data.task, num_segments=data.n_tasks, indices_are_sorted=True)
    return i - first[data.task]


@functools.lru_cache(maxsize=None)
def _sorting_network(width: int) -> tuple[tuple[int, int], ...]:
    """Batcher's odd-even merge sort for ``width`` values: compare-exchange pairs ``(i, j)``,
    ``i < j``, in order (the power-of-two network's, less the pairs past ``width``: those values
    are taken as larger than any, so the pairs never exchange)."""
    n = 1 << max(width - 1, 0).bit_length()
    pairs = []
    p = 1
    while p < n:
        k = p
        while k >= 1:
            for j in range(k % p, n - k, 2 * k):
                for i in range(min(k, n - j - k)):
                    if (i + j) // (2 * p) == (i + j + k) // (2 * p):
                        pairs.append((i + j, i + j + k))
            k //= 2
        p *= 2
    return tuple((a, b) for a, b in pairs if b < width)


def sort_rows(x: jax.Array) -> jax.Array:
    """``jnp.sort(x, axis=1)`` for ``[rows, width]`` integers: rows of at most 32 by a sorting
    network on the columns (XLA's sort of 10M rows of 4 took ~0.55 s, the network ~0.07)."""
    width = x.shape[1]
    if width > 32:
        return jnp.sort(x, axis=1)
    cols = [x[:, i] for i in range(width)]
    for i, j in _sorting_network(width):
        cols[i], cols[j] = jnp.minimum(cols[i], cols[j]), jnp.maximum(cols[i], cols[j])
    return jnp.stack(cols, axis=1)


def glad_coo_use(native: str, data: Any, tensor: Any) -> tuple[bool, GladCooLayout | None]:
    """``(runs native, rows)`` for GLAD: :func:`use` on a Dense panel (rows None); a Coo crowd
    (the answers of ``tensor``) runs as rows of its tasks' answers in ragged blocks
    (:func:`glad_coo_layout`), at most 8 classes."""
    from ._core import Coo

    if not isinstance(data, Coo):
        return use(native, data), None
    why_not = "turned off (native='off')" if check_option(native) == "off" else \
        applies(data, data.task_mask.dtype, columns=data.n_classes, codes=False)
    if why_not is None and data.n_classes > 8:
        why_not = f"{data.n_classes} classes (GLAD's kernels take at most 8)"
    if why_not is not None and native == "on":
        raise ValueError(f"native='on', but the native kernel cannot run: {why_not}")
    return why_not is None, glad_coo_layout(data, tensor) if why_not is None else None


class GladCooLayout(NamedTuple):
    """A sparse crowd's GLAD rows (:func:`glad_coo_layout`): ``rank [T]``, each (padded) task's
    row; ``offsets [ceil(T / 8) + 1]``, where each block of 8 rows starts, in slots (block b
    holds ``offsets[b + 1] - offsets[b]`` slots: its widest task's answers); ``slots``: the
    rows' slots, ``offsets[-1]`` rounded up to a size bucket."""
    rank: np.ndarray
    offsets: np.ndarray
    slots: int


def glad_coo_layout(data: Any, tensor: Any) -> GladCooLayout:
    """The rows of a Coo crowd's tasks for GLAD's kernels: its tasks sorted by their number of
    answers, then by their first annotator (:func:`coo_task_order`: the rows of a block then
    often share an annotator in a slot, whose 8 terms of alpha's gradient are summed in one add),
    the padding tasks after them. Each block of 8 rows is as wide as its widest task, so a few
    busy tasks (control questions many answer) widen only their own blocks: the rows hold
    ``answers + 7 x (blocks where the count changes)`` slots, never mostly empty."""
    from ._core import bucket

    n, T = tensor.n_tasks, -(-data.n_tasks // 8) * 8
    counts = np.bincount(np.asarray(tensor.task), minlength=n)[:n]
    order = coo_task_order(tensor.task, tensor.worker, n)
    offsets = np.zeros(T // 8 + 1, np.int64)
    if n and counts.min() != counts.max():  # by count (a radix sort where counts fit 16 bits)
        c = counts[order]
        by_count = np.argsort(c.astype(np.uint16) if c.max() < 65536 else c, kind="stable")
        order = order[by_count]
        width = np.zeros(T, np.int64)
        width[:n] = c[by_count]
        np.cumsum(width.reshape(-1, 8).max(1), out=offsets[1:])
    elif n:  # every task as many answers: blocks as wide, up to the last with a task
        offsets[:] = int(counts[0]) * np.minimum(np.arange(T // 8 + 1), -(-n // 8))
    rank = _rank_of(order, data.n_tasks)
    slots = bucket(int(offsets[-1]), minimum=8)
    if slots * 8 >= 2**31:
        raise ValueError(f"GLAD's rows: {slots:,} slots of 8 answers, more than its kernels "
                         f"take (2^31 values)")
    return GladCooLayout(rank, offsets.astype(np.int32), slots)


@functools.partial(jax.jit, static_argnames=("slots",))
def glad_coo_rows(data: Any, rank: jax.Array, offsets: jax.Array, slots: int):
    """``(answers [Z, 8], annotators [Z, 8], gold flags [T], weights [T], n)``: a Coo crowd's
    tasks as rows in ragged blocks of 8 (:class:`GladCooLayout`, ``Z = slots``): task t in row
    ``r = rank[t]``, its answers (in the answers' order) in slots ``offsets[r // 8]`` onwards,
    lane ``r % 8``; empty slots: label -1, annotator 0; ``T`` its tasks rounded up to 8, rows
    past its tasks inert."""
    n = data.n_tasks
    T = -(-n // 8) * 8
    row = rank[data.task]
    at = (offsets[row // 8] + answer_slots(data)) * 8 + row % 8
    at = jnp.where(data.weight > 0, at, slots * 8)  # padding answers: dropped

    def put(vals, empty, dtype):
        out = jnp.full((slots * 8,), empty, dtype)
        return out.at[at].set(vals.astype(dtype), mode="drop").reshape(slots, 8)

    flags = jnp.full((T,), -1, jnp.int8).at[rank].set(
        jnp.where(data.task_mask > 0, data.gold, -1).astype(jnp.int8))
    wts = jnp.zeros((T,), jnp.float32).at[rank].set(data.task_mask.astype(jnp.float32))
    return (put(data.label, -1, jnp.int8), put(data.worker, 0, jnp.int32), flags, wts,
            jnp.full((1,), n, jnp.int32))


def glad_fit(data: Any, *, max_iter: int = 100, tol: float = 1e-5, lr: float = 0.1,
             m_steps: int = 5, mu_alpha: float = 1.0, mu_beta: float = 1.0,
             learn_prior: bool = False, init_from_gold: bool = False, merge: bool = True,
             m_step: str = "native", layout: GladCooLayout | None = None):
    """GLAD with the native passes: same model, start, Adam steps, backtracking, stopping rule,
    objective and result as ``glad.fit``.

    Tasks with the same answers and gold start from the same difficulty and get the same
    gradients, so they stay identical: they are merged into one weighted row (the annotators'
    sums weighted by the row's count; a row's difficulty gradient is one task's, so Adam takes
    the same steps). Each pass computes one exp per answer of a distinct row, and a log per row
    where Q or the log-likelihood is wanted (``native/glad.cc``). The M-step (Adam, the Q check
    and the retries) is one native call per iteration (:func:`glad_m`; ``m_step="jax"``: JAX's
    Adam and loop around the passes instead, as before it, to compare against).

    A Coo crowd (``layout``: its rows, :func:`glad_coo_layout`, by default made here) runs as
    rows of its tasks' answers in ragged blocks (:func:`glad_coo_rows`; not merged), each
    answer's alpha gathered by its annotator.
    """
    if m_step not in ("native", "jax"):
        raise ValueError(f"m_step must be 'native' or 'jax', got {m_step!r}")
    opts = dict(max_iter=max_iter, tol=tol, lr=lr, m_steps=m_steps, mu_alpha=mu_alpha,
                mu_beta=mu_beta, learn_prior=learn_prior, init_from_gold=init_from_gold,
                m_step=m_step)
    from ._core import Coo

    if isinstance(data, Coo):
        if layout is None:
            raise ValueError("a Coo crowd needs its rows: layout=glad_coo_layout(data, tensor)")
        rank, boff = jnp.asarray(layout.rank), jnp.asarray(layout.offsets)
        lab_b, widx, flags, wts, n = glad_coo_rows(data, rank, boff, layout.slots)
        res = _glad_fit_rows(lab_b, flags, wts, n, data.worker_mask, data.n_classes, widx=widx,
                             boff=boff, **opts)
        return _glad_cut(res, rank)
    lab_b, flags, wts, n, inverse = glad_rows(data, merge)
    res = _glad_fit_rows(lab_b, flags, wts, n, data.worker_mask, data.n_classes, **opts)
    return _glad_spread(res, inverse, mu_beta)


@jax.jit
def _glad_cut(res: Any, rank: jax.Array):
    """A sparse crowd's rows (its tasks, padded to 8) given back to its tasks (task t's: row
    ``rank[t]``)."""
    return res._replace(posteriors=res.posteriors[rank], betas=res.betas[rank])


@jax.jit
def _glad_spread(res: Any, inverse: jax.Array, mu_beta: float):
    """The rows' posteriors and difficulties given to their tasks (padding tasks: zeros and the
    prior mean's beta, as the XLA path leaves them)."""
    ok, inv = inverse >= 0, jnp.maximum(inverse, 0)
    return res._replace(
        posteriors=jnp.where(ok[:, None], res.posteriors[inv], 0.0),
        betas=jnp.where(ok, res.betas[inv], jnp.exp(jnp.asarray(mu_beta, jnp.float32))))


def _glad_pass_grad(lab_b: jax.Array, wts: jax.Array, n: jax.Array, p_right: jax.Array,
                    prm: Any, wm: jax.Array, mu_alpha: Any, mu_beta: Any,
                    widx: jax.Array | None = None, boff: jax.Array | None = None):
    """``glad.q_grad`` from one gradient pass (rows at or past ``n``: zero)."""
    from . import glad

    da, db, _ = glad_grad(lab_b, wts, n, p_right, prm.alpha, prm.log_beta, widx=widx, boff=boff)
    valid = jnp.arange(wts.shape[0]) < n[0]
    return glad.GladParams((da - (prm.alpha - mu_alpha)) * wm,
                           jnp.where(valid, db - (prm.log_beta - mu_beta), 0.0))


@functools.partial(jax.jit, static_argnames=("n_classes", "max_iter", "m_steps", "learn_prior",
                                             "init_from_gold", "m_step"))
def _glad_fit_rows(lab_b: jax.Array, flags: jax.Array, wts: jax.Array, n: jax.Array,
                   worker_mask: jax.Array, n_classes: int, *, max_iter: int, tol: float,
                   lr: float, m_steps: int, mu_alpha: float, mu_beta: float, learn_prior: bool,
                   init_from_gold: bool, m_step: str = "native", widx: jax.Array | None = None,
                   boff: jax.Array | None = None):
    """GLAD on weighted rows (a GladResult per row: posteriors [T, K], betas [T]). ``m_step``:
    ``native`` (:func:`glad_m`) or ``jax`` (``glad.adam_steps`` around the passes: the path
    :func:`glad_m` replaced, kept to compare against). ``widx``, ``boff``: a sparse crowd's
    annotators of the answer slots and its ragged blocks (:func:`glad_coo_rows`; None: a dense
    panel's ``[T/8, W, 8]``, slot s annotator s)."""
    from . import glad
    from ._core import iterate

    K = n_classes
    T, W = wts.shape[0], worker_mask.shape[0]
    lab = unblock(lab_b) if boff is None else lab_b  # [T, W] or [Z, 8] (setup only)
    answered = lab >= 0
    if boff is None:
        n_ans = jnp.maximum((answered * wts[:, None]).sum(), 1.0)
    else:
        n_ans = jnp.maximum(answered.sum(), 1).astype(jnp.float32)  # rows of tasks weigh 1
    wm = worker_mask

    def prior_density(prm):
        return glad.gaussian_log_priors(prm, wm, wts, mu_alpha, mu_beta)

    alpha = jnp.full((W,), mu_alpha, jnp.float32)
    if init_from_gold:
        if boff is None:
            at_rows = lambda x: x[:, None]  # noqa: E731
        else:  # a slot's row: its block (the offsets at or before it) x 8 + its lane
            starts = jnp.zeros((lab.shape[0],), jnp.int32).at[boff[1:-1]].add(1, mode="drop")
            slot_row = jnp.cumsum(starts)[:, None] * 8 + jnp.arange(8, dtype=jnp.int32)
            at_rows = lambda x: x[slot_row]  # noqa: E731
        gold_at = at_rows(flags)
        on_gold = answered & (gold_at >= 0)
        hit = on_gold & (lab == gold_at)
        if widx is None:
            per_worker = lambda x: (x * wts[:, None]).sum(0)  # noqa: E731
        else:
            slot_worker = (widx if boff is not None else unblock(widx)).reshape(-1)
            per_worker = lambda x: jax.ops.segment_sum(  # noqa: E731
                (x * at_rows(wts)).reshape(-1), slot_worker, num_segments=W)
        alpha = glad.alpha_from_gold(alpha, per_worker(on_gold), per_worker(hit), mu_beta)
    params = glad.GladParams(alpha, jnp.full((T,), mu_beta, jnp.float32))
    log_prior = jnp.full((K,), -jnp.log(K), jnp.float32)
    # the carry: the state, the E-step at its parameters and log prior (log-likelihood, Q's
    # answer term, class sums) and the buffers of q_t(y_tw) that the passes rewrite in place
    # (native: two, glad_m's p_bufs, of which the state's posteriors hold the first and `spare`
    # the second and `which`, then glad_m's g1 and whether it holds one yet; jax: one, the
    # state's posteriors, and no spare). The native M-step's Q check is the next E pass, so
    # each step ends with the E-step at its new parameters, and with the next M-step's first
    # gradient (g1; the first M-step sums its own: the initial E-step is glad_e's).
    p_right, *e = glad_e(lab_b, flags, wts, n, params.alpha, params.log_beta, log_prior,
                         jnp.zeros(lab_b.shape, jnp.float32), widx=widx, boff=boff)[1:]
    state = glad.GladState(params=params, opt_state=glad._optimizer().init(params),
                           log_prior=log_prior, posteriors=p_right,
                           lr_scale=jnp.asarray(1.0, jnp.float32))
    no = jnp.asarray(0, jnp.int32)
    spare = (((jnp.zeros(lab_b.shape, jnp.float32), no), (jnp.zeros((W + T,), jnp.float32), no))
             if m_step == "native" else ())

    def step(carry):
        st, (ll, q_ans, class_sum), spare = carry
        obj = (ll + prior_density(st.params)) / n_ans
        q_old = q_ans + prior_density(st.params)
        log_prior = glad.learned_log_prior(class_sum) if learn_prior else st.log_prior
        if m_step == "native":
            p_bufs, g1 = spare
            prm, opt_state, scale, _, (p0, *p_bufs), e, g1 = glad_m(
                lab_b, flags, wts, n, (st.posteriors, *p_bufs), st, q_old, wm, log_prior, g1,
                lr=lr, m_steps=m_steps, mu_alpha=mu_alpha, mu_beta=mu_beta, widx=widx,
                boff=boff)
            spare = (tuple(p_bufs), (g1, jnp.asarray(1, jnp.int32)))
        else:  # JAX's Adam and loop around the gradient and Q passes (benchmarks, tests)
            p_old = st.posteriors
            prm, opt_state, scale = glad.adam_steps(
                st, q_old, lambda p: glad_grad(lab_b, wts, n, p_old, p.alpha, p.log_beta,
                                               grad=False, q=True, widx=widx, boff=boff)[2]
                + prior_density(p),
                lambda p: _glad_pass_grad(lab_b, wts, n, p_old, p, wm, mu_alpha, mu_beta, widx,
                                          boff),
                lr=lr, m_steps=m_steps)
            p0, *e = glad_e(lab_b, flags, wts, n, prm.alpha, prm.log_beta, log_prior, p_old,
                            widx=widx, boff=boff)[1:]
        return (glad.GladState(params=prm, opt_state=opt_state, log_prior=log_prior,
                               posteriors=p0, lr_scale=scale), tuple(e), tuple(spare)), obj

    (state, _, _), loop = iterate(step, (state, tuple(e), spare), max_iter=max_iter, tol=tol)
    post = glad_e(lab_b, flags, wts, n, state.params.alpha, state.params.log_beta,
                  state.log_prior, state.posteriors, want_post=True, widx=widx, boff=boff)[0]
    return glad.GladResult(posteriors=post, alphas=state.params.alpha,
                           betas=jnp.exp(state.params.log_beta), priors=jnp.exp(state.log_prior),
                           objective=loop.objective, history=loop.history, n_iter=loop.n_iter,
                           converged=loop.converged)


# --------------------------------------------------------------------------- BWA
class _BWACarry(NamedTuple):
    S: jax.Array  # [W, K]: each annotator's squared errors under the current z
    psum: jax.Array  # [K]: sum_t z_tk
    table: Any  # the table(s) the current z came from
    precision: jax.Array  # [W, K]: the v they were built from (ones at the start)


def _ratio_table(bias_num: jax.Array, bias_den: jax.Array, num: jax.Array, den: jax.Array
                 ) -> jax.Array:
    """A sparse crowd's table for the ratio pass (``native/ebcc.cc``, ``ratio_block``), rows as
    :func:`ebcc_coo_rows` codes them (the bias, one row per annotator and label, a zero row):
    the numerators ``num [W, K, L]`` (class k's entry for an answer l of annotator w) in the
    first half of each row, the denominators ``den`` in the second, each half K padded to 8."""
    W, K, L = num.shape
    Kp = -(-K // 8) * 8

    def half(bias, x):
        tab = jnp.concatenate([bias[None], jnp.transpose(x, (0, 2, 1)).reshape(W * L, K),
                               jnp.zeros((1, K), x.dtype)])
        return jnp.pad(tab, ((0, 0), (0, Kp - K)))

    return jnp.concatenate([half(bias_num, num), half(bias_den, den)], axis=1).astype(jnp.float32)


def coo_ratio_sums(rows: EbccRows | EbccTiers, weight: jax.Array, table: jax.Array,
                   n_classes: int) -> jax.Array:
    """One ratio pass over a sparse crowd's rows (:func:`_ratio_table`'s ``table``): per code,
    the summed truths ``num / den`` of the rows that hold it, each weighted (gold rows: their
    class's indicator), then their squares: ``[codes, 2 x K padded to 8]``."""
    _require()
    if isinstance(rows, EbccTiers):
        return sum(coo_ratio_sums(part, w, table, n_classes) for part, w in
                   [(rows.first, weight * rows.keep)]
                   + [(part, weight[idx]) for part, idx in zip(rows.parts, rows.index)])
    out = jax.ShapeDtypeStruct(table.shape, jnp.float32)
    return jax.ffi.ffi_call("crowdllm_ebcc_ratio", out)(
        rows.codes, rows.flags, weight.astype(jnp.float32), table, K=np.int64(n_classes),
        threads=np.int64(_threads()))


def coo_ratio_values(rows: EbccRows | EbccTiers, table: jax.Array, n_classes: int) -> jax.Array:
    """Every row's truths ``num / den``, ``[T, K]`` (:func:`coo_ratio_sums`' table)."""
    _require()
    if isinstance(rows, EbccTiers):
        z = coo_ratio_values(rows.first, table, n_classes)
        for part, idx in zip(rows.parts, rows.index):
            z = z.at[idx].set(coo_ratio_values(part, table, n_classes), indices_are_sorted=True,
                              unique_indices=True)
        return z
    out = jax.ShapeDtypeStruct((rows.codes.shape[0], n_classes), jnp.float32)
    return jax.ffi.ffi_call("crowdllm_ebcc_ratio_post", out)(
        rows.codes, rows.flags, table, K=np.int64(n_classes), threads=np.int64(_threads()))


class _RatioPasses(NamedTuple):
    """BWA's passes (:func:`bwa_fit`): ``tables(bias_num, bias_den, num, den)`` (``num, den [W,
    K, L]``: class k's entry for annotator w's answer l), ``sums(table)``: ``(counts [W, K, L],
    psum [K], counts2 [W, K, L], psq [K])``, the per-annotator and column sums of the truths
    and of their squares, ``values(table)``: the truths ``[T, K]``."""
    tables: Any
    sums: Any
    values: Any


def _ratio_passes(data: Any, merge: bool, width: RowWidth | None,
                  rank: jax.Array | None = None) -> _RatioPasses:
    K = data.n_classes
    if width is not None:  # a sparse crowd: its tasks as rows of answer codes (rank: _passes)
        rows, wts = ebcc_coo_rows(data, width, rank), data.task_mask.astype(jnp.float32)
        if rank is not None:
            wts = to_rows(wts, rank)
        first = rows.first if isinstance(rows, EbccTiers) else rows  # its codes, as every tier's
        Kp = -(-K // 8) * 8

        def coo_sums(table):  # the truths' sums in C's first half, their squares' in its second
            C = coo_ratio_sums(rows, wts, table, K)
            return (*_ebcc_counts_from(first, C, K, K), *_ebcc_counts_from(first, C[:, Kp:], K, K))

        return _RatioPasses(_ratio_table, coo_sums,
                            lambda table: _from_rows(coo_ratio_values(rows, table, K), rank))
    p, rows, _ = _setup(data, merge)

    def dense_tables(bias_num, bias_den, num, den):
        return tables(p, bias_num, num), tables(p, bias_den, den)

    def dense_sums(table):
        C, C2 = ratio_sums(rows, *table, K)
        return (*counts_from(p, C, K), *counts_from(p, C2, K))

    return _RatioPasses(dense_tables, dense_sums, lambda table: ratio_values(rows, *table, K))


@functools.partial(jax.jit, static_argnames=("max_iter", "prior_correction", "merge", "width"))
def bwa_fit(data: Any, *, max_iter: int = 500, tol: float = 1e-7, a_v: float = 15.0,
            lam: float = 1.0, prior_correction: bool = True, merge: bool = True,
            width: RowWidth | None = None, rank: jax.Array | None = None):
    """BWA with the native kernel: same start, updates, objective and result as ``bwa.fit``.

    BWA's truth of a task, ``z_k = (lam mu_k + sum_w v_wk [y_w = k]) / (lam + sum_w v_wk)``
    (sums over the task's answers), is a ratio of two sums of table entries per class (the
    annotator groups' combinations, ``lam mu`` and ``lam`` folded into the first group), so it
    depends on the row's answers only: rows are merged. Per sweep, one ratio pass gives the
    precisions' statistics: the per-annotator sums of ``z`` and of ``z ** 2`` over their answers.
    The start (majority-vote fractions) is the same ratio with vote tables. On a Coo crowd
    (``width``: its row width, :func:`coo_use`; ``rank``: its tasks' rows, :func:`coo_rank`)
    the rows are its tasks' answer codes (:func:`ebcc_coo_rows`), ``lam mu`` and ``lam`` in the bias row, and the pass is
    ``native/ebcc.cc``'s ratio pass.
    """
    from . import bwa
    from ._core import iterate, normalize

    K = data.n_classes
    ps = _ratio_passes(data, merge, width, rank)
    eye = jnp.eye(K, dtype=jnp.float32)
    n_tasks = jnp.maximum(data.task_mask.sum(), 1.0)
    wm = data.worker_mask.astype(jnp.float32)

    def stats(table):  # (hit, sq, psum, psq, counts) of the ratios z
        counts, psum, counts2, psq = ps.sums(table)
        return jnp.diagonal(counts, axis1=1, axis2=2), counts2.sum(axis=2), psum, psq, counts

    # the start: majority-vote fractions, votes_k / answers (a row without answers: uniform, as
    # 1e-30 / K over 1e-30; elsewhere the 1e-30 vanishes in float32)
    tiny = 1e-30
    W = wm.shape[0]
    tab0 = ps.tables(jnp.full((K,), tiny / K), jnp.full((K,), tiny),
                     wm[:, None, None] * eye[None], jnp.broadcast_to(wm[:, None, None], (W, K, K)))
    hit0, sq0, psum0, _, counts0 = stats(tab0)
    n_wk = counts0.sum(axis=1)  # [W, L]: answers with label l (each answered row's z sums to 1)
    n_w = n_wk.sum(axis=1)
    n_ans = jnp.maximum(jnp.round(n_w.sum()), 1.0)
    adj = 4.0 * (1.0 - 1.0 / K) if prior_correction else 1.0
    # sum_t n_t z_tk (1 - z_tk), n_t the task's answers: sums over the answers
    b_v = a_v * adj * (counts0.sum(axis=(0, 2)) - sq0.sum(axis=0)) / n_ans
    b_v = jnp.maximum(b_v, 1e-6)

    def step(st):
        mean = st.psum / n_tasks
        v = bwa.precisions_from(st.S, a_v, b_v, n_w)
        table = ps.tables(lam * mean, jnp.full((K,), lam, jnp.float32), v[:, None, :] * eye[None],
                          jnp.broadcast_to(v[:, :, None], (W, K, K)))
        hit, sq, psum, psq, _ = stats(table)
        S = bwa.sq_error(hit, sq, n_wk)
        dev = (psq - 2 * mean * psum + n_tasks * mean ** 2).sum()
        obj = bwa.log_joint(data.worker_mask, v, S, dev, a_v, b_v, lam, n_w) / n_ans
        return _BWACarry(S, psum, table, v), obj

    start = _BWACarry(bwa.sq_error(hit0, sq0, n_wk), psum0, tab0, jnp.ones((W, K), jnp.float32))
    st, loop = iterate(step, start, max_iter=max_iter, tol=tol)
    z = ps.values(st.table)
    return bwa.BWAResult(posteriors=normalize(jnp.maximum(z, 0.0)), truth=z,
                         precision=st.precision, objective=loop.objective,
                         history=loop.history, n_iter=loop.n_iter,
                         converged=loop.converged)


# --------------------------------------------------------------------------- EBCC
@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["codes", "flags"],
                   meta_fields=["plan", "answer_codes"])
@dataclasses.dataclass(frozen=True)
class EbccRows:
    """The rows as the EBCC sweep reads them (once per fit; the plan is static).

    A dense panel's row has one combination code per group of annotators (``plan``); a sparse
    crowd's (COO, ``answer_codes`` = the number of annotators x labels) has one code per answer
    instead, after the bias (:func:`ebcc_coo_rows`)."""
    plan: Plan | None
    codes: jax.Array  # [T, G] uint16
    flags: jax.Array  # [T] int8: gold class or -1
    answer_codes: int = 0


def ebcc_plan(n_workers: int, n_classes: int, columns: int | None = None) -> Plan | None:
    """EBCC's grouping of a panel's annotators: a table row holds ``columns`` floats (padded,
    see :func:`_width`), not DS's 8, so its groups are smaller, and a group's table and sums stay
    as small as DS's (:data:`MAX_COMBOS` rows of 8). At 5 classes and 10 subtypes: groups of 3
    annotators (216 combinations, 48 KiB a table) instead of 4 (1,296, 284 KiB), so that the
    sweep's gathers and read-add-writes stay in the core's L2 cache (1,000,000 x 12 x 5: 2-18 %
    faster a sweep in session 27's three runs on the 2-core AMD VM, within the host's noise;
    ``benchmarks/ebcc_sweep_native.py``)."""
    combos = MAX_COMBOS if columns is None else MAX_COMBOS * 8 // _width(columns)
    return plan(n_workers, n_classes, max(combos, n_classes + 1))


def ebcc_rows(data: Any, width: RowWidth | None = None, columns: int | None = None
              ) -> EbccRows | EbccTiers:
    """The combination codes and gold flags of a Dense panel's rows (EBCC merges identical rows
    itself, on the host, before preparing the data: no merging here), or of a Coo crowd's tasks
    (:func:`ebcc_coo_rows`: ``width`` slots a row, or tiers of widths). ``columns``: the latent
    columns (classes x subtypes), which size a panel's groups (:func:`ebcc_plan`)."""
    from ._core import Coo

    if isinstance(data, Coo):
        if width is None:
            raise ValueError("COO rows need their width: 1 + the most answers a task has")
        return ebcc_coo_rows(data, width)
    p = ebcc_plan(int(data.labels.shape[1]), int(data.n_classes), columns)
    flags = jnp.where(data.task_mask > 0, data.gold, -1).astype(jnp.int8)
    return EbccRows(p, encode(data.labels, p), flags)


def coo_row_width(task: np.ndarray, n_tasks: int) -> int:
    """The slots a COO row needs: the bias, then the most answers any task has."""
    return 1 + int(np.bincount(np.asarray(task), minlength=max(n_tasks, 1)).max(initial=0))


#: a COO layout: one row width for every task, or tiers ``((width, tasks), ...)`` (ascending
#: widths: a task's row is in the first tier as wide as it needs)
RowWidth = int | tuple[tuple[int, int], ...]


def _tier_list(width: RowWidth, n_tasks: int) -> tuple[tuple[int, int], ...]:
    return ((int(width), n_tasks),) if isinstance(width, (int, np.integer)) else tuple(width)


def coo_slots(width: RowWidth, n_tasks: int) -> int:
    """The slots a sweep reads in a COO layout's rows (``width``: :data:`RowWidth`) of
    ``n_tasks`` tasks: every task's row at the first tier's width (:class:`EbccTiers`), and the
    wider tiers' rows."""
    tiers = _tier_list(width, n_tasks)
    return tiers[0][0] * n_tasks + sum(w * n for w, n in tiers[1:])


#: what one more tier costs a sweep besides its table (:func:`coo_tiers`' ``call_slots``), in
#: empty row slots: an empty slot adds a zero row that stays in cache (``benchmarks/
#: coo_row_width.py``: rows of 6 or 8 slots instead of 4 at 1,000,000 tasks, 0-30 % more a sweep)
TIER_SLOTS = 65_536


def _rounded(width: int) -> int:
    """A row width rounded up to 2, 3, 4, 6, 8, 12, 16, 24, ... (at most 1.5x), so that crowds
    of other widths share a compiled program; empty slots cost little (:data:`TIER_SLOTS`)."""
    if width <= 4:
        return width
    p = 1 << (width - 1).bit_length()
    return p * 3 // 4 if p * 3 // 4 >= width else p


def tier_call_slots(n_codes: int, columns: int) -> int:
    """What one more tier costs a sweep, in empty row slots (:func:`coo_tiers`): a kernel call,
    whose threads each fill a table of sums (``n_codes`` rows of ``columns`` padded to 8) that
    are then added up (10,000 annotators x 5 labels: 0.8-1.3 ms a call on 8 tasks)."""
    return TIER_SLOTS + 2 * n_codes * _width(columns)


def coo_layout(data: Any, tensor: Any, columns: int | None = None) -> RowWidth:
    """The rows of ``tensor``'s answers prepared as the Coo crowd ``data`` (``columns``: the
    latent columns, by default the classes): :func:`coo_tiers` with a tier costed on this
    crowd's table (:func:`tier_call_slots`), the padded tasks in the first tier."""
    columns = data.n_classes if columns is None else columns
    return coo_tiers(tensor.task, tensor.n_tasks,
                     tier_call_slots(2 + data.n_workers * data.n_classes, columns), data.n_tasks)


def coo_tiers(task: np.ndarray, n_tasks: int, call_slots: int = TIER_SLOTS,
              n_rows: int | None = None) -> RowWidth:
    """The rows of a sparse crowd's ``n_tasks`` tasks (``task``: each answer's task; ``n_rows``:
    the prepared data's tasks, the padding included): one width, at least 1 + the most answers a
    task has (:func:`coo_row_width`), where those rows are not mostly empty
    (:data:`MAX_SLOTS_PER_ANSWER`); else tiers ``((width, tasks), ...)``, ascending, so that a
    few busy tasks (control questions everyone answers) do not widen every row. Each task's row
    is in the first tier as wide as it needs; a sweep reads every task's row at the first tier's
    width, then the wider tiers' rows (:class:`EbccTiers`).

    The tiers' candidates: the first tier's width is one of the needed widths' quantiles (50 % ...
    100 %); each tier after it is up to twice as wide as the one before, and as wide as its
    widest task; a tier whose empty slots would cost less than a kernel call (``call_slots``:
    :func:`tier_call_slots`) joins the next. The layout is the candidate with the fewest slots
    (:func:`coo_slots`), a tier counted as ``call_slots``. Its widths are then rounded up
    (:func:`_rounded`), so that crowds of nearby widths share a compiled program (tiers' counts
    are part of the program: a crowd in tiers compiles its own)."""
    T = max(n_tasks if n_rows is None else n_rows, n_tasks, 1)
    need = 1 + np.bincount(np.asarray(task), minlength=T)[:T]
    hist = np.bincount(need)  # tasks per needed width
    at_most = np.cumsum(hist)  # tasks needing at most w slots
    top = len(hist) - 1
    n_answers, n_real = int(np.asarray(task).size), max(n_tasks, 1)
    if top * n_real <= MAX_SLOTS_PER_ANSWER * (n_answers + n_real):
        return _rounded(top)

    def too_empty(tiers):  # as use() counts them (the crowd's own tasks)
        return _mostly_empty(coo_slots(tuple(tiers), n_real), n_real, n_answers)

    best = None
    for w0 in sorted({int(np.searchsorted(at_most, q * T))
                      for q in (.5, .75, .9, .95, .99, .999)} | {top}):
        bounds = [w0]
        while bounds[-1] < top:
            bounds.append(min(2 * bounds[-1], top))
        tiers, lo = [], 0
        for hi in bounds:  # the tier of widths (lo, hi]: as wide as its widest task
            n = int(at_most[hi] - at_most[lo])
            if n:
                tiers.append((int(np.flatnonzero(hist[: hi + 1])[-1]), n))
            lo = hi
        # a tier whose rows cost fewer slots than a call joins the next (unless that leaves the
        # rows too empty for use: the kernel would not take them)
        k = 0
        while k < len(tiers) - 1:
            (w, n), (w2, n2) = tiers[k], tiers[k + 1]
            joined = tiers[:k] + [(w2, n + n2)] + tiers[k + 2:]
            if (w2 - w) * (T if k == 0 else n) < call_slots and not too_empty(joined):
                tiers, k = joined, max(k - 1, 0)
            else:
                k += 1
        if too_empty(tiers):
            continue
        key = coo_slots(tuple(tiers), T) + call_slots * (len(tiers) - 1)
        if best is None or key < best[0]:
            best = key, tuple(tiers)
    if best is None:  # every candidate too empty (use() says so)
        return _rounded(top)
    widths = sorted({_rounded(w) for w, _ in best[1]})
    if len(widths) == 1:
        return widths[0]
    counts = np.bincount(np.searchsorted(widths, need), minlength=len(widths))
    return tuple((w, int(c)) for w, c in zip(widths, counts) if c)


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["first", "keep", "parts", "index"], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class EbccTiers:
    """A sparse crowd's rows in tiers by width (:func:`coo_tiers`). ``first``: every task's row
    at the first tier's width, where ``keep`` (``[T]``, 1 or 0) marks the tasks of the first tier
    (the others' rows are cut short, and weigh 0 there); ``parts[k]``: the rows of the tasks
    ``index[k]`` (ascending) of each wider tier. A sweep runs the kernel once per tier on the same
    table, writes the wider tiers' posteriors over the first's, and adds the tiers' sums."""
    first: EbccRows
    keep: jax.Array
    parts: tuple[EbccRows, ...]
    index: tuple[jax.Array, ...]


def ebcc_coo_rows(data: Any, width: RowWidth, rank: jax.Array | None = None
                  ) -> EbccRows | EbccTiers:
    """A Coo crowd's tasks as rows of ``width`` codes: the bias (code 0), the task's answers
    (``1 + w L + l``) in ascending order, then empty slots (``1 + W L``, a row of zeros).
    ``width`` must be at least 1 + the most answers a task has (:func:`coo_row_width`), or
    tiers of widths (:func:`coo_tiers`: the rows of each tier as wide as that tier). Task t is
    row ``rank[t]`` (``rank``: a permutation of the ``T`` tasks; None: row t), and so are its
    gold flag and, where tiers index rows, its place among them.

    The kernel is fastest when tasks with the same annotators are adjacent (their table rows are
    then in cache, and equal codes in a slot are summed in a register): :func:`coo_rank` puts
    them so (``EBCC`` sorts a sparse crowd's tasks so before it prepares them)."""
    T, W, L = data.n_tasks, data.n_workers, data.n_classes
    slot = 1 + answer_slots(data)
    empty = 1 + W * L
    code = jnp.where(data.weight > 0, 1 + data.worker * L + data.label, empty)
    flags = jnp.where(data.task_mask > 0, data.gold, -1).astype(jnp.int8)
    task = data.task
    if rank is not None:  # everything per row: the answers' rows, the flags
        task = rank[data.task]
        flags = to_rows(flags, rank)

    def rows(n, wide, row):  # n rows of `wide` slots; answer i goes to row row[task_i]
        # padding answers (weight 0, after the last task's) and other tiers' answers: dropped
        codes = jnp.full((n, wide), empty, jnp.int32).at[:, 0].set(0)
        codes = sort_rows(codes.at[row, slot].set(code, mode="drop"))
        return codes.astype(jnp.uint16)

    tiers = _tier_list(width, T)
    first = EbccRows(None, rows(T, tiers[0][0], task), flags, answer_codes=W * L)
    if len(tiers) == 1:
        return first
    need = 1 + jax.ops.segment_sum((data.weight > 0).astype(jnp.int32), data.task, T,
                                   indices_are_sorted=True)
    if rank is not None:
        need = to_rows(need, rank)
    tier = jnp.searchsorted(jnp.asarray([w for w, _ in tiers], jnp.int32), need)
    parts, index = [], []
    for k, (wide, n) in enumerate(tiers[1:], 1):
        idx = jnp.nonzero(tier == k, size=n)[0].astype(jnp.int32)
        row = jnp.full((T,), n, jnp.int32).at[idx].set(jnp.arange(n, dtype=jnp.int32))
        parts.append(EbccRows(None, rows(n, wide, row[task]), flags[idx],
                              answer_codes=W * L))
        index.append(idx)
    return EbccTiers(first, (tier == 0).astype(jnp.float32), tuple(parts), tuple(index))


def to_rows(x: jax.Array, rank: jax.Array) -> jax.Array:
    """A per-task array ``x [T, ...]`` in row order: row ``rank[t]`` holds task t's."""
    return jnp.zeros_like(x).at[rank].set(x, unique_indices=True)


def _from_rows(x: jax.Array, rank: jax.Array | None) -> jax.Array:
    """:func:`to_rows` undone: task t's values from row ``rank[t]`` (None: rows are tasks)."""
    return x if rank is None else x[rank]


def coo_rank(data: Any, tensor: Any) -> jax.Array:
    """The row of each of a Coo crowd's (padded) tasks for the COO sweep: its tasks sorted by
    their first annotator (:func:`coo_task_order`), the padding tasks after them, ``[T]``."""
    return jnp.asarray(_rank_of(coo_task_order(tensor.task, tensor.worker, tensor.n_tasks),
                                data.n_tasks))


def _rank_of(order: np.ndarray, n_rows: int) -> np.ndarray:
    """Each of ``n_rows`` tasks' row, ``[n_rows]`` int32: task ``order[i]`` in row i, the tasks
    ``order`` leaves out (the padding) in their own rows."""
    rank = np.arange(n_rows, dtype=np.int32)
    rank[order] = np.arange(len(order), dtype=np.int32)
    return rank


def coo_fit_args(data: Any, tensor: Any, width: RowWidth | None) -> dict[str, Any]:
    """A native fit's layout arguments (:func:`coo_use`'s ``width``; a Coo crowd's ``rank``
    too, :func:`coo_rank`; a Dense panel's: None)."""
    return {"width": width, "rank": None if width is None else coo_rank(data, tensor)}


def _check_codes(x: np.ndarray, n: int, what: str) -> None:
    """The host passes (``native/order.cc``, ``native/pairs.cc``) index arrays by these codes
    without checks of their own: each in [0, n), else a ValueError naming the array."""
    x = np.asarray(x)
    if x.size and (int(x.min()) < 0 or int(x.max()) >= n):
        raise ValueError(f"{what} codes must lie in [0, {n}); got {int(x.min())}..{int(x.max())}")


#: fewer answers than this fill a dense panel with NumPy (5 ms a million answers; the kernels
#: are not built for that)
DENSE_FILL_MIN = 1 << 20


def dense_fill(dense: np.ndarray, task: np.ndarray, worker: np.ndarray, label: np.ndarray
               ) -> bool:
    """``dense[task, worker] = label`` in one native pass (``native/order.cc``; NumPy's scatter
    took 0.63 s for the 120M answers of a 10,000,000 x 12 panel); False (nothing done) where it
    does not apply: fewer than :data:`DENSE_FILL_MIN` answers, a panel that is not int8 and
    C-ordered, codes not int32, or no kernels. A repeated cell keeps its last answer, as
    NumPy's does. Codes out of range: a ValueError naming the first such answer."""
    arrays = (task, worker, label)
    if (len(task) < DENSE_FILL_MIN or dense.dtype != np.int8 or dense.ndim != 2
            or not dense.flags.c_contiguous or not dense.flags.writeable
            or any(a.dtype != np.int32 or not a.flags.c_contiguous for a in arrays)
            or len({len(a) for a in arrays}) != 1 or not available()):
        return False
    T, W = dense.shape
    bad = _state["lib"].crowdllm_dense_fill(_I64(len(task)), _ptr(task), _ptr(worker),
                                            _ptr(label), _I64(T), _I64(W), _ptr(dense))
    if bad >= 0:
        raise ValueError(f"answer {bad}: task {int(task[bad])}, worker {int(worker[bad])} out "
                         f"of the panel's range [0, {T}) x [0, {W})")
    return True


def coo_task_order(task: np.ndarray, worker: np.ndarray, n_tasks: int,
                   native: bool | None = None) -> np.ndarray:
    """The tasks of a sparse crowd in the order the COO sweep runs fastest: by their first (lowest
    numbered) annotator, ties in their own order (a stable sort; tasks nobody answered last).
    On the 10,000-annotator crowd of ``benchmarks/speed.py`` (tasks that share their first
    annotator share all three), a sweep at 1,000,000 tasks takes ~90 ms instead of ~220.

    ``native`` (None: where the kernels are available): one pass for each task's first
    annotator and a counting sort by it (``native/order.cc``). Else NumPy: a minimum over each
    task's run of answers (sorted by task first where they are not) and its radix sort where
    annotators fit 16 bits: 0.5-1.1 s at 30,000,000 answers against 2.6-3.2 with
    ``np.minimum.at`` and a sort of 32-bit keys (session 31)."""
    task, worker = np.asarray(task), np.asarray(worker)
    if native is None:
        native = available()
    if native:
        _require()
        T = max(int(n_tasks), 0)
        _check_codes(task, T, "task")
        W = int(worker.max(initial=-1)) + 1
        _check_codes(worker, W, "worker")
        order = np.empty(T, np.int64)
        t32 = np.ascontiguousarray(task, dtype=np.int32)
        w32 = np.ascontiguousarray(worker, dtype=np.int32)
        _state["lib"].crowdllm_task_order(_I64(len(t32)), _ptr(t32), _ptr(w32), _I64(T), _I64(W),
                                          _ptr(order))
        return order
    none = np.iinfo(np.int32).max
    first = np.full(max(n_tasks, 1), none, np.int64)
    if task.size:
        from ._core import by_task

        order = by_task(task)
        task, worker = task[order], worker[order]
        starts = np.flatnonzero(np.r_[True, task[1:] != task[:-1]])
        first[task[starts]] = np.minimum.reduceat(worker, starts)
    first = first[:n_tasks]
    if first[first != none].max(initial=0) < 65535:  # 16-bit keys: a radix sort, same order
        first = np.where(first == none, 65535, first).astype(np.uint16)
    return np.argsort(first, kind="stable")


def _ebcc_table(rows: EbccRows, bias: jax.Array, log_table: jax.Array) -> jax.Array:
    """The tables ``[codes, K * M padded to 8]`` of EBCC's E-step: a panel's group tables (bias
    in group 0), or a sparse crowd's bias row, one row per annotator and label, and a zero row."""
    width = _width(log_table.shape[1])
    if rows.plan is not None:
        return tables(rows.plan, bias, log_table, width=width)
    W, KM, L = log_table.shape
    tab = jnp.concatenate([bias[None], jnp.transpose(log_table, (0, 2, 1)).reshape(W * L, KM),
                           jnp.zeros((1, KM), bias.dtype)])
    return jnp.pad(tab, ((0, 0), (0, width - KM))).astype(jnp.float32)


def _ebcc_counts_from(rows: EbccRows, C: jax.Array, n_labels: int, KM: int
                      ) -> tuple[jax.Array, jax.Array]:
    """``(counts [W, K * M, L], column sums [K * M])`` from a pass's per-code sums ``C``."""
    if rows.plan is not None:
        return counts_from(rows.plan, C, n_labels, columns=KM)
    per = C[1: 1 + rows.answer_codes, :KM].reshape(-1, n_labels, KM)  # [W, L, K M]
    return jnp.transpose(per, (0, 2, 1)), C[0, :KM]


def _ebcc_n_codes(rows: EbccRows) -> int:
    return rows.plan.n_combos if rows.plan is not None else 2 + rows.answer_codes


def _width(KM: int) -> int:
    """A table row's floats: the K M columns and at least one more (where the sweep keeps the
    row's log offset, see ``native/ebcc.cc``), in whole vectors of 8."""
    return -(-(KM + 1) // 8) * 8


def ebcc_sweep(rows: EbccRows | EbccTiers, weight: jax.Array, bias: jax.Array,
               log_table: jax.Array, z_prev: jax.Array, n_subtypes: int):
    """One EBCC sweep (``native/ebcc.cc``): the same as :func:`._fast.subtype_sweep`.

    Args:
        weight: ``[T]`` how many tasks each row stands for (0: padding); bias: ``[K * M]``
            (E log tau + E log pi); log_table: ``[W, K * M, L]`` (E log V); z_prev: ``[T, K]``.

    Returns:
        ``(z [T, K], sum_t w_t log Z_t, counts [W, K * M, L], column sums [K * M], dz)``.
        Under ``vmap`` (restarts), the kernel runs once per restart.
    """
    _require()
    if isinstance(rows, EbccTiers):
        z, ll, counts, csum, dz = ebcc_sweep(rows.first, weight * rows.keep, bias, log_table,
                                             z_prev, n_subtypes)
        for part, idx in zip(rows.parts, rows.index):
            zk, llk, ck, sk, dzk = ebcc_sweep(part, weight[idx], bias, log_table, z_prev[idx],
                                              n_subtypes)
            z = z.at[idx].set(zk, indices_are_sorted=True, unique_indices=True)
            ll, counts, csum, dz = ll + llk, counts + ck, csum + sk, jnp.maximum(dz, dzk)
        return z, ll, counts, csum, dz
    KM, L = log_table.shape[1], log_table.shape[2]
    K = KM // n_subtypes
    tab = _ebcc_table(rows, bias, log_table)
    T = rows.codes.shape[0]
    out = (jax.ShapeDtypeStruct((T, K), jnp.float32), jax.ShapeDtypeStruct(tab.shape, jnp.float32),
           jax.ShapeDtypeStruct((2,), jnp.float32))
    z, C, stats = jax.ffi.ffi_call("crowdllm_ebcc_sweep", out, vmap_method="sequential")(
        rows.codes, rows.flags, weight.astype(jnp.float32), tab, z_prev.astype(jnp.float32),
        K=np.int64(K), M=np.int64(n_subtypes), threads=np.int64(_threads()))
    counts, csum = _ebcc_counts_from(rows, C, L, KM)
    return z, stats[0], counts, csum, stats[1]


def ebcc_posteriors(rows: EbccRows | EbccTiers, bias: jax.Array, log_table: jax.Array,
                    n_subtypes: int) -> jax.Array:
    """EBCC's E-step posteriors ``q(z, g)`` of every row, ``[T, K, M]`` (as ``ebcc.e_step``)."""
    _require()
    KM = log_table.shape[1]
    if isinstance(rows, EbccTiers):
        q = ebcc_posteriors(rows.first, bias, log_table, n_subtypes)
        for part, idx in zip(rows.parts, rows.index):
            q = q.at[idx].set(ebcc_posteriors(part, bias, log_table, n_subtypes),
                              indices_are_sorted=True, unique_indices=True)
        return q
    K = KM // n_subtypes
    tab = _ebcc_table(rows, bias, log_table)
    T = rows.codes.shape[0]
    out = jax.ShapeDtypeStruct((T, KM), jnp.float32)
    q = jax.ffi.ffi_call("crowdllm_ebcc_post", out, vmap_method="sequential")(
        rows.codes, rows.flags, tab, K=np.int64(K), M=np.int64(n_subtypes),
        threads=np.int64(_threads()))
    return q.reshape(T, K, n_subtypes)


def ebcc_counts(rows: EbccRows | EbccTiers, weight: jax.Array, q: jax.Array, n_classes: int
                ) -> tuple[jax.Array, jax.Array]:
    """``(counts [W, K * M, L], column sums [K * M])`` of given posteriors ``q [T, K, M]``, each
    row weighted: ``sum_t w_t [y_tw = l] q_t(c)`` and ``sum_t w_t q_t(c)`` (EBCC's start)."""
    _require()
    if isinstance(rows, EbccTiers):
        return _summed_over_tiers(rows, weight, lambda r, w, q: ebcc_counts(r, w, q, n_classes),
                                  q)
    T, K, M = q.shape
    KM = K * M
    out = jax.ShapeDtypeStruct((_ebcc_n_codes(rows), _width(KM)), jnp.float32)
    C = jax.ffi.ffi_call("crowdllm_ebcc_given", out, vmap_method="sequential")(
        rows.codes, weight.astype(jnp.float32), q.reshape(T, KM).astype(jnp.float32),
        K=np.int64(K), M=np.int64(M), threads=np.int64(_threads()))
    return _ebcc_counts_from(rows, C, n_classes, KM)


def _summed_over_tiers(rows: EbccTiers, weight: jax.Array, fn: Any, *per_row: jax.Array
                       ) -> tuple[jax.Array, jax.Array]:
    """``fn(rows, weight, *per_row) -> (counts, column sums)`` over tiers of rows, added up: the
    first tier's rows (every task, the busier ones weighted 0) and each further tier's tasks."""
    parts = [fn(rows.first, weight * rows.keep, *per_row)]
    parts += [fn(part, weight[idx], *(x[idx] for x in per_row))
              for part, idx in zip(rows.parts, rows.index)]
    return sum(c for c, _ in parts), sum(s for _, s in parts)


def ebcc_start_counts(rows: EbccRows | EbccTiers, weight: jax.Array, z: jax.Array,
                      key: jax.Array, n_subtypes: int, row_ids: jax.Array | None = None
                      ) -> tuple[jax.Array, jax.Array]:
    """:func:`ebcc_counts` of EBCC's random start (``ebcc.start``: the class fractions ``z [T,
    K]`` split over ``n_subtypes`` subtypes by Dirichlet(1) draws from ``key``; row ``t`` takes
    the draws of row ``row_ids[t]``), drawn inside the kernel: the ``[T, K, M]`` start is never
    stored. The draws are ``ebcc.start``'s (the same counter hash), their logs the kernel's."""
    _require()
    T, K = z.shape
    if row_ids is None:
        row_ids = jnp.arange(T, dtype=jnp.int32)
    if isinstance(rows, EbccTiers):
        return _summed_over_tiers(
            rows, weight, lambda r, w, z, i: ebcc_start_counts(r, w, z, key, n_subtypes, i),
            z, row_ids)
    KM = K * n_subtypes
    seeds = jax.random.bits(key, (2,), jnp.uint32)  # as _core.hash_uniform draws them
    out = jax.ShapeDtypeStruct((_ebcc_n_codes(rows), _width(KM)), jnp.float32)
    C = jax.ffi.ffi_call("crowdllm_ebcc_start", out, vmap_method="sequential")(
        rows.codes, weight.astype(jnp.float32), z.astype(jnp.float32),
        row_ids.astype(jnp.int32), seeds, K=np.int64(K), M=np.int64(n_subtypes),
        threads=np.int64(_threads()))
    return _ebcc_counts_from(rows, C, K, KM)


# --------------------------------------------------------------------------- special functions
def digamma_gammaln(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(digamma(x), gammaln(x))`` of positive float32 ``x`` (normal numbers), elementwise, as
    one opaque call (``native/special.cc``; the formulas of ``ibcc.digamma_gammaln``)."""
    _require()
    out = (jax.ShapeDtypeStruct(x.shape, jnp.float32), jax.ShapeDtypeStruct(x.shape, jnp.float32))
    return jax.ffi.ffi_call("crowdllm_digamma_gammaln", out, vmap_method="broadcast_all")(
        x.astype(jnp.float32), threads=np.int64(_threads()))


# --------------------------------------------------------------------------- annotator pairs
def pair_statistics(task: np.ndarray, worker: np.ndarray, label: np.ndarray, n_tasks: int,
                    n_workers: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """M-MSR's observed annotator pairs (``native/pairs.cc``), as
    :func:`.mmsr.sparse_pair_statistics` gives them: ``(w, v, agree, common)``, int32, for every
    ordered pair ``w != v`` of annotators who share a task, sorted by ``(v, w)``; an annotator's
    repeated answers on a task count once. One walk over each annotator's tasks on all threads
    instead of a sparse product per class (``benchmarks/mmsr_pairs.py``: 10M tasks x 3 answers
    of 10,000 annotators, 1.6 s against scipy's 11.4; drawn at random, 45M pairs, 2.4 s against
    86.7). The answers in any order (numpy arrays; at most 2**32 - 1 of them)."""
    _require()
    lib = _state["lib"]
    task = np.asarray(task)
    A, T, W = len(task), max(int(n_tasks), 1), max(int(n_workers), 1)
    if A >= 2 ** 32:
        raise ValueError(f"{A:,} answers: the native pair walk takes at most 2**32 - 1")
    _check_codes(task, T, "task")
    _check_codes(worker, W, "worker")
    from ._core import by_task

    order = by_task(task)
    w = np.ascontiguousarray(np.asarray(worker)[order], dtype=np.int32)
    lab = np.ascontiguousarray(np.asarray(label)[order], dtype=np.int32)
    tptr = np.zeros(T + 1, dtype=np.int64)
    np.cumsum(np.bincount(task, minlength=T), out=tptr[1:])
    threads = _threads()
    ent, wptr = np.empty(A, dtype=np.int64), np.zeros(W + 1, dtype=np.int64)
    gstart, glen = np.empty(A, dtype=np.uint32), np.empty(A, dtype=np.uint32)
    lib.crowdllm_pairs_groups(_I64(T), _I64(W), _ptr(tptr), _ptr(w), _ptr(lab), _ptr(ent),
                              _ptr(wptr), _ptr(gstart), _ptr(glen),
                              _ptr(np.empty(threads * W, dtype=np.int64)), _I64(threads))
    del w, lab
    walk = (_ptr(ent), _ptr(wptr), _ptr(gstart), _ptr(glen))
    nnz = np.empty(W, dtype=np.int64)
    total = lib.crowdllm_pairs_count(_I64(W), *walk, _ptr(nnz), _I64(threads))
    colptr = np.zeros(W + 1, dtype=np.int64)
    np.cumsum(nnz, out=colptr[1:])
    row, col, agree, common = (np.empty(total, dtype=np.int32) for _ in range(4))
    lib.crowdllm_pairs_fill(_I64(W), *walk, _ptr(colptr), _ptr(row), _ptr(col), _ptr(agree),
                            _ptr(common), _I64(threads))
    return row, col, agree, common
