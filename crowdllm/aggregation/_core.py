"""What the aggregation kernels share: device-side crowd data, the sums over answers, the EM loop.

Two layouts of the same answers go into every kernel:

* :class:`Coo` - three ``int32[answers]`` arrays plus a weight (``0`` for bucket padding). The
  general form: human crowds are sparse, and repeated (task, worker) answers are allowed.
* :class:`Dense` - an ``int8[tasks, workers]`` matrix of class codes, ``-1`` = no answer. The fast
  path for LLM panels where every model labels every item.

Kernels never look at the layout: they call the sums below (:func:`task_class_sum`,
:func:`worker_confusion`, :func:`task_vote`, :func:`worker_agreement`, :func:`worker_count`),
which dispatch on the layout at trace time. Both layouts give the same answers (tested). The
dense sums take the chunked, one-hot-free path of :mod:`._fast`; the one-hot ``einsum`` versions
stay here as ``_reference_*`` (switch with :func:`use_fast`).

Shapes are padded to size buckets (at most 1/8 larger than needed) so that a second call with a
similar-sized input reuses the compiled kernel instead of compiling again; padded answers have
weight 0, padded tasks and workers are masked out of every statistic. Inside
:func:`shared_shapes`, the crowds of a collection with one class count, layout and similar size
are padded to one shape, so a method compiles once for them all (many datasets, one method).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import math
from typing import Any, Callable, Iterable, Iterator, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ..labels import LabelTensor
from . import _fast, _native

Layout = Literal["auto", "coo", "dense"]

__all__ = [
    "Coo", "Dense", "CrowdData", "prepare", "bucket", "shared_shapes", "task_class_sum",
    "worker_confusion", "task_vote", "task_count", "worker_agreement", "worker_hits",
    "worker_count", "clamp_gold", "iterate", "Loop", "answers_of", "normalize", "safe_log",
    "argmax_ties", "hash_uniform", "tie_flag", "use_fast", "fast_enabled",
]

# Every probability that goes into a log is at least this (crowd-kit clamps at the same value).
TINY = 1e-10


def bucket(n: int, *, minimum: int = 8) -> int:
    """Round ``n`` up to a size bucket: 8 buckets per power of two (at most 12.5 % padding)."""
    n = max(int(n), 1)
    if n <= minimum:
        return minimum
    step = 1 << max(int(math.floor(math.log2(n))) - 3, 0)
    return int(-(-n // step) * step)


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["task", "worker", "label", "weight", "task_mask", "worker_mask", "gold"],
    meta_fields=["n_classes"],
)
@dataclasses.dataclass(frozen=True)
class Coo:
    """Answers in COO form on the device. Padded answers have ``weight == 0``."""

    task: jax.Array  # int32[answers]
    worker: jax.Array  # int32[answers]
    label: jax.Array  # int32[answers]
    weight: jax.Array  # float[answers]
    task_mask: jax.Array  # float[tasks]: 1 for real tasks
    worker_mask: jax.Array  # float[workers]: 1 for real workers
    gold: jax.Array  # int32[tasks]: gold code or -1
    n_classes: int

    @property
    def n_tasks(self) -> int:
        return self.task_mask.shape[0]

    @property
    def n_workers(self) -> int:
        return self.worker_mask.shape[0]


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["labels", "task_mask", "worker_mask", "gold"],
    meta_fields=["n_classes"],
)
@dataclasses.dataclass(frozen=True)
class Dense:
    """Answers as a dense ``[tasks, workers]`` matrix of class codes, ``-1`` where there is none."""

    labels: jax.Array  # int8[tasks, workers]
    task_mask: jax.Array
    worker_mask: jax.Array
    gold: jax.Array
    n_classes: int

    @property
    def n_tasks(self) -> int:
        return self.labels.shape[0]

    @property
    def n_workers(self) -> int:
        return self.labels.shape[1]


CrowdData = Coo | Dense


# set by sharding.sharded: the mesh prepare places its data on (None: the default device)
_MESH: contextvars.ContextVar[Any] = contextvars.ContextVar("crowdllm_mesh", default=None)


def _placed(data: "CrowdData") -> "CrowdData":
    """``data`` as prepared, or inside :func:`.sharding.sharded` split over its mesh."""
    mesh = _MESH.get()
    if mesh is None:
        return data
    from .sharding import shard  # sharding imports this module

    return shard(data, mesh)


def choose_layout(tensor: LabelTensor, layout: Layout = "auto") -> str:
    """``dense`` for panels (no repeats, at least half the cells answered), else ``coo``."""
    if layout not in ("auto", "coo", "dense"):
        raise ValueError(f"layout must be 'auto', 'coo' or 'dense', got {layout!r}")
    if layout != "auto":
        return layout
    if tensor.has_repeats or tensor.n_tasks == 0:
        return "coo"
    return "dense" if tensor.density >= 0.5 else "coo"


#: (tasks, workers, answers) a crowd is padded to, and on the COO layout the row width of the
#: native sweep (``_native.coo_tiers``; 0 on the dense layout, or where not needed). A dense
#: panel's worker axis is its own (no bucket) but inside :func:`shared_shapes` its group's
#: widest; its answers are 0
Shape = tuple[int, int, int, int]

# (n_classes, layout) -> the shapes prepare may pad to, smallest first, and the padding limit;
# set by shared_shapes
_FLOORS: contextvars.ContextVar[tuple[dict[tuple[int, str], list[Shape]], float]] = \
    contextvars.ContextVar("crowdllm_shared_shapes", default=({}, 1.0))


def _own_shape(tensor: LabelTensor, layout: str, width: bool = True) -> Shape:
    """The bucketed shape ``prepare`` gives a crowd (the dense worker axis is exact), and on COO
    its rows' width on the native sweep (``width``; else 0)."""
    if layout == "dense":
        return (bucket(tensor.n_tasks), max(tensor.n_workers, 1), 0, 0)
    row = 0
    if width:
        from ._native import _rounded, coo_row_width

        row = _rounded(coo_row_width(tensor.task, tensor.n_tasks))
    return (bucket(tensor.n_tasks), bucket(tensor.n_workers), bucket(tensor.n_answers), row)


def _size(shape: Shape, layout: str) -> int:
    """What a fit's run time follows: a panel's cells, a sparse crowd's answers."""
    return shape[0] * shape[1] if layout == "dense" else shape[2]


def _joined(shapes: Iterable[Shape]) -> Shape:
    """The smallest shape that holds each of ``shapes`` (each axis's largest)."""
    return tuple(max(axis) for axis in zip(*shapes))  # type: ignore[return-value]


@contextlib.contextmanager
def shared_shapes(tensors: Iterable[LabelTensor], *, max_pad: float = 4.0
                  ) -> Iterator[dict[tuple[int, str], list[Shape]]]:
    """Pad the crowds of a collection to a few shared shapes, inside the block.

    Each (method, shape) pair compiles once; crowds of different sizes get different size
    buckets, so running a method over many datasets compiles it once per dataset, which on
    small data takes longer than the fit. Here the crowds with one class count and layout are
    sorted by size (answers in the COO layout, cells in the dense one) and cut into groups whose
    shape (the largest bucket of each axis in the group; a panel's worker axis is not bucketed)
    is at most ``max_pad`` times the size of any crowd in it; inside the block, :func:`prepare`
    pads a crowd to its group's shape (on COO, the native sweep's rows as wide as the group's
    widest too), so a method compiles once per group. Padding is inert (zero-weight
    answers, masked tasks and workers): results equal the unpadded fit's, to float rounding.
    It costs run time in proportion (at most ``max_pad`` times), which is small beside a
    compile on small crowds. Any crowd prepared inside the block, in the collection or not, is
    padded to the smallest shared shape that holds it, if that is at most ``max_pad`` times its
    own size. Yields ``{(n_classes, layout): [shape, ...]}``.

        >>> with shared_shapes(tensors):                       # doctest: +SKIP
        ...     labels = {name: MACE().fit(t).labels_ for name, t in zip(names, tensors)}
    """
    if max_pad < 1:
        raise ValueError(f"max_pad must be >= 1, got {max_pad}")
    known, _ = _FLOORS.get()
    own: dict[tuple[int, str], list[Shape]] = {}
    for t in tensors:
        for layout in ("coo", "dense"):
            own.setdefault((max(t.n_classes, 1), layout), []).append(_own_shape(t, layout))
    floors = {key: list(v) for key, v in known.items()}
    for (k, layout), shapes in own.items():
        shapes.sort(key=lambda s: _size(s, layout), reverse=True)
        groups: list[list[Shape]] = []
        for shape in shapes:  # the smallest yet: the group's shape within max_pad of it
            if groups and (_size(_joined(groups[-1] + [shape]), layout)
                           <= max_pad * _size(shape, layout)):
                groups[-1].append(shape)
            else:
                groups.append([shape])
        merged = floors.setdefault((k, layout), [])
        merged += [_joined(g) for g in groups]
        merged.sort(key=lambda s: _size(s, layout))
    token = _FLOORS.set((floors, max_pad))
    try:
        yield floors
    finally:
        _FLOORS.reset(token)


def _shared_shape(tensor: LabelTensor, layout: str) -> Shape:
    """The shape ``prepare`` pads a crowd to: its own buckets, or inside :func:`shared_shapes`
    the smallest shared shape that holds it (within the padding limit)."""
    floors, max_pad = _FLOORS.get()
    shared = floors.get((max(tensor.n_classes, 1), layout), ())
    own = _own_shape(tensor, layout, width=bool(shared))
    for f in shared:
        if all(a >= b for a, b in zip(f, own)) and _size(f, layout) <= max_pad * _size(own, layout):
            return f
    return own


def shared_row_width(tensor: LabelTensor) -> int:
    """Inside :func:`shared_shapes`, the row width of the native COO sweep that ``tensor``'s
    group shares (0 outside, or where the crowd has its own shape)."""
    return _shared_shape(tensor, "coo")[3]


def by_task(task: np.ndarray) -> slice | np.ndarray:
    """The answers' order by task: all of them as they are (``slice(None)``) where ``task`` is
    already in order, as most files are (a copy, not a gather), else a stable argsort."""
    task = np.asarray(task)
    if task.size < 2 or np.all(task[1:] >= task[:-1]):
        return slice(None)
    return np.argsort(task, kind="stable")


def prepare(
    tensor: LabelTensor,
    *,
    layout: Layout = "auto",
    gold: np.ndarray | None = None,
    dtype: Any = jnp.float32,
    pad: bool = True,
) -> CrowdData:
    """Move a label tensor to the device in the chosen layout, padded to size buckets.

    Args:
        tensor: the answers.
        layout: ``auto`` (dense for full panels), ``coo`` or ``dense``.
        gold: ``int32[tasks]`` gold codes to clamp (``-1`` = none); None for no clamping.
        dtype: float dtype of weights and masks (float32, or float64 with x64 enabled).
        pad: pad shapes to buckets (turn off to see the exact shapes, e.g. in tests).

    Inside :func:`.sharding.sharded`, the data is split over the block's mesh (the answers
    axis; :func:`.sharding.shard`), so any aggregator's fit runs on all its devices.
    """
    layout = choose_layout(tensor, layout)
    # inside sharding.sharded the host arrays go to the mesh's devices directly (_placed), not
    # to the default device first
    put = jnp.asarray if _MESH.get() is None else np.asarray
    n_t, n_w, n_a = tensor.n_tasks, tensor.n_workers, tensor.n_answers
    fT, fW, fA, _ = _shared_shape(tensor, layout)  # the buckets, or a shared shape (shared_shapes)
    T = fT if pad else max(n_t, 1)
    W = fW if pad else max(n_w, 1)
    task_mask = np.zeros(T, dtype=dtype)
    task_mask[:n_t] = 1
    g = np.full(T, -1, dtype=np.int32)
    if gold is not None:
        g[:n_t] = gold
    worker_mask = np.zeros(W, dtype=dtype)
    worker_mask[:n_w] = 1
    if layout == "dense":  # the worker axis: its own, or its group's in shared_shapes
        dense = np.full((T, W), -1, dtype=np.int8 if tensor.n_classes <= 127 else np.int16)
        if not _native.dense_fill(dense, tensor.task, tensor.worker, tensor.label):
            dense[tensor.task, tensor.worker] = tensor.label
        return _placed(Dense(labels=put(dense), task_mask=put(task_mask),
                             worker_mask=put(worker_mask), gold=put(g),
                             n_classes=max(tensor.n_classes, 1)))
    A = fA if pad else max(n_a, 1)
    # Sorting by task keeps each task's answers together: segment sums then read and write
    # memory in order. Answers already in task order (as most files are) are copied as they
    # are: three gathers of 30M answers by a sort's permutation took ~1 s (session 31).
    order = by_task(tensor.task)
    task = np.zeros(A, dtype=np.int32)
    worker = np.zeros(A, dtype=np.int32)
    label = np.zeros(A, dtype=np.int32)
    weight = np.zeros(A, dtype=dtype)
    task[:n_a] = tensor.task[order]
    worker[:n_a] = tensor.worker[order]
    label[:n_a] = tensor.label[order]
    weight[:n_a] = 1
    task[n_a:] = max(n_t - 1, 0)  # keep the task index sorted through the padding
    return _placed(Coo(task=put(task), worker=put(worker), label=put(label), weight=put(weight),
                       task_mask=put(task_mask), worker_mask=put(worker_mask), gold=put(g),
                       n_classes=max(tensor.n_classes, 1)))


# --------------------------------------------------------------------------------------------
# Sums over answers. Each has a COO and a dense implementation; both give the same numbers.
# --------------------------------------------------------------------------------------------


def _onehot(data: Dense, dtype: Any) -> jax.Array:
    """``[tasks, workers, classes]`` indicator of the answers (all zeros where none)."""
    lab = data.labels.astype(jnp.int32)
    return (lab[..., None] == jnp.arange(data.n_classes, dtype=jnp.int32)).astype(dtype)


def answers_of(data: CrowdData) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """The answers as flat ``(task, worker, label, weight)`` arrays, whatever the layout.

    For the dense layout, missing cells come back with weight 0 and label 0, so any per-answer
    formula written for COO works on a panel too.
    """
    if isinstance(data, Coo):
        return data.task, data.worker, data.label, data.weight
    T, W = data.labels.shape
    lab = data.labels.astype(jnp.int32).reshape(-1)
    task = jnp.repeat(jnp.arange(T, dtype=jnp.int32), W)
    worker = jnp.tile(jnp.arange(W, dtype=jnp.int32), T)
    weight = (lab >= 0).astype(data.task_mask.dtype)
    return task, worker, jnp.maximum(lab, 0), weight


# The unoptimised dense sums: a float one-hot [tasks, workers, classes] contracted with einsum.
# Kept as the reference the fast versions (``_fast``) are tested against, and used when
# ``use_fast(False)`` is on. At HIGHEST precision, as the fast sums: a float32 contraction on
# a GPU otherwise runs in TF32 (10-bit mantissa; seen on an H200: table sums off by 1.6e-3).
_HIGHEST = jax.lax.Precision.HIGHEST


def _reference_task_class_sum(data: Dense, table: jax.Array) -> jax.Array:
    return jnp.einsum("twl,wkl->tk", _onehot(data, table.dtype), table, precision=_HIGHEST)


def _reference_worker_confusion(data: Dense, post: jax.Array) -> jax.Array:
    return jnp.einsum("tk,twl->wkl", post, _onehot(data, post.dtype), precision=_HIGHEST)


def _reference_task_vote(data: Dense, worker_weight: jax.Array) -> jax.Array:
    return jnp.einsum("twl,w->tl", _onehot(data, worker_weight.dtype), worker_weight,
                      precision=_HIGHEST)


def _reference_worker_agreement(data: Dense, post: jax.Array) -> jax.Array:
    return jnp.einsum("twl,tl->w", _onehot(data, post.dtype), post, precision=_HIGHEST)


_FAST = True


def fast_enabled() -> bool:
    """Whether the dense sums take the chunked fast path (:mod:`._fast`); True by default."""
    return _FAST


@contextlib.contextmanager
def use_fast(enabled: bool):
    """Switch the dense sums between the fast path and the one-hot reference, for a block.

    The switch is read when a kernel is traced, so the jit caches are cleared on entry and exit
    (a kernel compiled on one path is never reused on the other).
    """
    global _FAST
    old = _FAST
    _FAST = bool(enabled)
    jax.clear_caches()
    try:
        yield
    finally:
        _FAST = old
        jax.clear_caches()


def task_class_sum(data: CrowdData, table: jax.Array) -> jax.Array:
    """``out[t, k] = sum over answers (t, w, l) of table[w, k, l]``: ``[tasks, K]``.

    With ``table`` = log confusion matrices this is the E-step's log-likelihood of each class.
    """
    if isinstance(data, Dense):
        if not _FAST:
            return _reference_task_class_sum(data, table)
        return _fast.task_class_sum(data.labels, data.n_classes, table)
    vals = table[data.worker, :, data.label] * data.weight[:, None].astype(table.dtype)
    return jax.ops.segment_sum(vals, data.task, num_segments=data.n_tasks,
                               indices_are_sorted=True)


def worker_confusion(data: CrowdData, post: jax.Array) -> jax.Array:
    """``out[w, k, l] = sum over answers (t, w, l) of post[t, k]``: ``[workers, K, L]`` counts."""
    K = post.shape[1]
    if isinstance(data, Dense):
        if not _FAST:
            return _reference_worker_confusion(data, post)
        return _fast.worker_confusion(data.labels, data.n_classes, post)
    L = data.n_classes
    vals = post[data.task] * data.weight[:, None].astype(post.dtype)
    flat = jax.ops.segment_sum(vals, data.worker * L + data.label, num_segments=data.n_workers * L)
    return flat.reshape(data.n_workers, L, K).transpose(0, 2, 1)


def task_vote(data: CrowdData, worker_weight: jax.Array, rank: jax.Array | None = None
              ) -> jax.Array:
    """``out[t, l] = sum over answers (t, w, l) of worker_weight[w]``: ``[tasks, L]`` votes.
    ``rank`` (a Coo crowd's): task t's votes in row ``rank[t]`` instead, counted there."""
    if isinstance(data, Dense):
        if rank is not None:
            raise ValueError("rank: a Coo crowd's rows")
        if not _FAST:
            return _reference_task_vote(data, worker_weight)
        return _fast.task_vote(data.labels, data.n_classes, worker_weight)
    L = data.n_classes
    vals = worker_weight[data.worker] * data.weight.astype(worker_weight.dtype)
    row = data.task if rank is None else rank[data.task]
    flat = jax.ops.segment_sum(vals, row * L + data.label, num_segments=data.n_tasks * L,
                               indices_are_sorted=rank is None)
    return flat.reshape(data.n_tasks, L)


def task_count(data: CrowdData, dtype: Any = jnp.float32) -> jax.Array:
    """``[tasks, L]`` answers per class from the real annotators: :func:`task_vote` with the
    annotators' mask as weights (the majority vote's counts). Whole numbers add up exactly in any
    order, so on a dense panel they are one fused pass (:func:`._fast.task_count`)."""
    mask = data.worker_mask.astype(dtype)
    if isinstance(data, Dense) and _FAST:
        return _fast.task_count(data.labels, data.n_classes, mask)
    return task_vote(data, mask)


def vote_posteriors(data: CrowdData, dtype: Any = jnp.float32) -> jax.Array:
    """The majority vote's posteriors (each task's answer shares), gold clamped: where DS,
    one-coin DS, IBCC and their native fits start."""
    return clamp_gold(normalize(task_count(data, dtype)), data.gold)


def worker_agreement(data: CrowdData, post: jax.Array) -> jax.Array:
    """``out[w] = sum over answers (t, w, l) of post[t, l]``: each worker's expected hits."""
    if isinstance(data, Dense):
        if not _FAST:
            return _reference_worker_agreement(data, post)
        return _fast.worker_agreement(data.labels, data.n_classes, post)
    vals = post[data.task, data.label] * data.weight.astype(post.dtype)
    return jax.ops.segment_sum(vals, data.worker, num_segments=data.n_workers)


def worker_hits(data: CrowdData, labels: jax.Array, dtype: Any = jnp.float32) -> jax.Array:
    """``out[w]`` = number of ``w``'s answers equal to ``labels[task]``: what
    :func:`worker_agreement` gives for one-hot posteriors, counted in integers (exact past 2^24
    answers), on a dense panel by a compare-and-count instead of a gather per answer (1,000,000
    x 12 on the 2-core VM: 28-37 ms against 36-56; inside ZBS's iteration, ~35 ms less)."""
    labels = labels.astype(jnp.int32)
    if isinstance(data, Dense):
        # a missing answer (-1) equals no label
        hit = data.labels.astype(jnp.int32) == labels[:, None]
        return hit.sum(axis=0, dtype=jnp.int32).astype(dtype)
    hit = data.label == labels[data.task]  # padding answers weigh 0
    return jax.ops.segment_sum(jnp.where(hit, data.weight, 0).astype(dtype), data.worker,
                               num_segments=data.n_workers)


def worker_count(data: CrowdData, dtype: Any = jnp.float32) -> jax.Array:
    """``out[w]`` = number of answers of worker ``w``."""
    if isinstance(data, Dense):
        return (data.labels >= 0).sum(axis=0).astype(dtype)
    return jax.ops.segment_sum(data.weight.astype(dtype), data.worker, num_segments=data.n_workers)


# --------------------------------------------------------------------------------------------
# Small numerics
# --------------------------------------------------------------------------------------------


def safe_log(x: jax.Array) -> jax.Array:
    """``log(max(x, 1e-10))``: never -inf, never NaN for x >= 0."""
    return jnp.log(jnp.maximum(x, TINY))


def normalize(x: jax.Array, axis: int = -1) -> jax.Array:
    """Rows scaled to sum to one; an all-zero row becomes uniform (never NaN)."""
    s = x.sum(axis=axis, keepdims=True)
    n = x.shape[axis]
    return jnp.where(s > 0, x / jnp.where(s > 0, s, 1), 1.0 / n)


def clamp_gold(post: jax.Array, gold: jax.Array) -> jax.Array:
    """Replace the posterior of every task with a gold label by that label's indicator."""
    onehot = jax.nn.one_hot(jnp.maximum(gold, 0), post.shape[1], dtype=post.dtype)
    return jnp.where((gold >= 0)[:, None], onehot, post)


def tie_flag(ties: str) -> jax.Array:
    """The traced form of a tie policy: True for ``random``, False for ``lowest``.

    Kernels take the flag as an array, so switching policy does not compile the kernel again.
    """
    if ties not in ("random", "lowest"):
        raise ValueError(f"ties must be 'random' or 'lowest', got {ties!r}")
    return jnp.asarray(ties == "random")


def _fmix32(h: jax.Array) -> jax.Array:
    """MurmurHash3's 32-bit finaliser: a bijection of uint32 that mixes every input bit."""
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def hash_uniform(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32,
                 rows: jax.Array | None = None) -> jax.Array:
    """Uniform numbers in (0, 1) from a counter hashed with two words drawn from ``key``:
    element ``i`` (row-major) gets ``fmix32(fmix32(i * 0x9E3779B9 + s0) ^ s1)``, its top 23 bits.

    For draws made on every iteration or restart over every task: ``jax.random`` (threefry)
    took 0.74 s for 20M numbers on the 2-core VM (EBCC's random start: tasks x K x M per
    restart), 76 ms for the 1M x 5 of one random tie-break; a counter hash is one fused
    elementwise pass. Good enough for random starts and tie-breaks (tested: restarts differ,
    ties go every way), not a general-purpose generator. With ``rows``, the counter of element
    ``[i, ...]`` is that of element ``[rows[i], ...]`` of a larger array.
    """
    s = jax.random.bits(key, (2,), jnp.uint32)
    n = int(np.prod(shape))
    if rows is None:
        i = jax.lax.iota(jnp.uint32, n)
    else:
        per_row = n // shape[0]
        i = (rows.astype(jnp.uint32)[:, None] * jnp.uint32(per_row)
             + jax.lax.iota(jnp.uint32, per_row)[None]).reshape(-1)
    h = _fmix32(_fmix32(i * jnp.uint32(0x9E3779B9) + s[0]) ^ s[1])
    return _unit(h, dtype).reshape(shape)


def _unit(h: jax.Array, dtype: Any) -> jax.Array:
    """A uint32 hash as a uniform number in (0, 1): its top 23 bits, plus 1/2, over 2^23 (the
    native EBCC start, ``native/ebcc.cc``, draws its numbers the same way)."""
    return ((h >> 9).astype(dtype) + 0.5) * (1.0 / (1 << 23))


def pair_uniform(key: jax.Array, a: jax.Array, b: jax.Array, dtype: Any = jnp.float32
                 ) -> jax.Array:
    """Uniform numbers in (0, 1), one per element of ``a`` and ``b`` (broadcast together), each
    a hash of its pair ``(a, b)`` of integer ids and two words drawn from ``key``.

    The number of a pair depends on nothing else: not on the array's shape or on where in it
    the pair sits, so a crowd padded to a larger shape, laid out densely or as COO, or split
    over devices draws the same number for each (task, annotator) pair. The same hash as
    :func:`hash_uniform` (not a general-purpose generator), chained over the two ids.
    """
    s = jax.random.bits(key, (2,), jnp.uint32)
    a, b = jnp.broadcast_arrays(a.astype(jnp.uint32), b.astype(jnp.uint32))
    h = _fmix32(_fmix32(a * jnp.uint32(0x9E3779B9) + s[0]) ^ (b * jnp.uint32(0x7FEB352D)) ^ s[1])
    return _unit(h, dtype)


def argmax_ties(scores: jax.Array, random_ties: jax.Array | bool, key: jax.Array,
                rtol: float = 1e-6) -> jax.Array:
    """Row-wise argmax with an explicit tie policy.

    ``random_ties=False`` (``lowest``): the lowest class code among the maxima. ``True``
    (``random``): uniformly at random among the maxima (values within ``rtol`` of the row
    maximum), from ``key``; the choice depends on the key, the task and the class code only,
    never on the order of columns in a file.
    """
    lowest = jnp.argmax(scores, axis=-1).astype(jnp.int32)
    m = scores.max(axis=-1, keepdims=True)
    is_max = scores >= m - rtol * jnp.maximum(jnp.abs(m), 1.0)
    noise = hash_uniform(key, scores.shape)
    rand = jnp.argmax(jnp.where(is_max, noise, -1.0), axis=-1).astype(jnp.int32)
    return jnp.where(random_ties, rand, lowest)


# --------------------------------------------------------------------------------------------
# The iteration driver shared by every EM / VB kernel
# --------------------------------------------------------------------------------------------


class Loop(NamedTuple):
    """What :func:`iterate` returns besides the final state."""

    n_iter: jax.Array  # int32: iterations run
    converged: jax.Array  # bool: stopped because the objective changed by less than tol
    objective: jax.Array  # the last objective value
    history: jax.Array  # [max_iter] objective per iteration; entries past n_iter repeat the last


def iterate(
    step: Callable[[Any], tuple[Any, jax.Array]],
    state: Any,
    *,
    max_iter: int,
    tol: float | jax.Array,
    converged: Callable[[jax.Array, jax.Array], jax.Array] | None = None,
) -> tuple[Any, Loop]:
    """Run ``state, objective = step(state)`` until the objective gains less than ``tol``.

    The stopping rule is crowd-kit's: stop after the first iteration whose objective exceeds
    the previous one by less than ``tol`` (the first iteration always runs), or after
    ``max_iter`` iterations. ``max_iter`` is static (it sizes the history); ``tol`` is traced.
    ``converged(prev, obj)`` replaces that rule where a method has another (ZBS: skills settle).
    Written with ``lax.while_loop``, so it runs inside ``jit`` and under ``disable_jit`` alike.
    """
    max_iter = int(max_iter)
    _, obj0 = jax.eval_shape(step, state)
    dtype = obj0.dtype
    hist0 = jnp.zeros((max(max_iter, 1),), dtype=dtype)

    def cond(carry):
        _, _, i, done, _ = carry
        return (i < max_iter) & ~done

    def body(carry):
        st, prev, i, _, hist = carry
        st, obj = step(st)
        obj = obj.astype(dtype)
        done = (obj - prev) < tol if converged is None else converged(prev, obj)
        hist = hist.at[i].set(obj)
        return st, obj, i + 1, done, hist

    carry = (state, jnp.asarray(-jnp.inf, dtype), jnp.asarray(0, jnp.int32),
             jnp.asarray(False), hist0)
    st, obj, n, done, hist = jax.lax.while_loop(cond, body, carry)
    last = jnp.where(n > 0, obj, jnp.asarray(0, dtype))
    hist = jnp.where(jnp.arange(hist.shape[0]) < n, hist, last)
    return st, Loop(n_iter=n, converged=done, objective=last, history=hist)
