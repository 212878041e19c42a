"""Run the aggregation kernels over many devices, and over many hosts.

The answers axis is sharded over a one-dimensional :class:`jax.sharding.Mesh` (axis name
``"answers"``): for the COO layout the four per-answer arrays are split across devices, for the
dense layout the task rows are. Everything per worker or per class (masks, parameters) is
replicated. The kernels are unchanged: ``jit`` compiles them for the sharded inputs (GSPMD), so
each device sums over its own answers and the per-worker / per-class statistics
(``segment_sum`` over workers, the confusion counts, the class totals) are combined by
collective sums (``all-reduce``) inserted by the compiler. The sharded fit equals the
single-device fit to float rounding (tested on 4 CPU devices in ``tests/test_sharding.py``).

Multi-host: call :func:`initialize` on every host (the same program, one process per host),
then :func:`shard` builds global arrays from each host's copy of the prepared data and the same
jitted ``fit`` runs across all hosts' devices (on CPU hosts the collectives go over gloo, JAX's
default). Gather per-task results with ``jax.experimental.multihost_utils.process_allgather``.
Tested with two processes of 2 CPU devices each on localhost (``tests/test_multihost.py``):
DS and one-coin DS equal the single-device fit to 1e-5.

The aggregator classes (one process): inside :func:`sharded`, every method's ``fit`` splits its
answers over the local devices (``crowdllm aggregate --shard`` on the command line); every
method but ``ds-bayes`` (and IBCC's NUTS / SVI) and ``llm-judge`` gives its single-device
results to 1e-5 (tested on 4 CPU devices, float64 where the method offers it).

Example:
    >>> from crowdllm.aggregation import _core, dawid_skene, sharding
    >>> with sharding.sharded():                          # all local devices  # doctest: +SKIP
    ...     labels = crowdllm.MACE().fit(tensor).labels_
    >>> mesh = sharding.local_mesh()                      # the kernels  # doctest: +SKIP
    >>> data = sharding.shard(_core.prepare(tensor, layout="coo"), mesh)    # doctest: +SKIP
    >>> res = dawid_skene.fit(data, max_iter=50)          # runs on every device  # doctest: +SKIP

The work divides in both layouts: with the dense layout each device's program holds its
block of task rows (the compiled DS kernel on 4 devices has ``[T/4, W]`` labels and no
all-gather; tested); GLAD and KOS gather one per-task float vector (``T`` values) per
iteration onto every device, as their per-answer formulas index it by task. The native CPU
kernels (:mod:`._native`, used by DS, one-coin DS, GLAD, MACE, BWA and IBCC on one device) need
the whole panel on one device, so sharded data takes the XLA path.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from . import _core
from ._core import Coo, CrowdData, Dense

__all__ = ["AXIS", "local_mesh", "global_mesh", "initialize", "shard", "sharded", "pad_for"]

AXIS = "answers"


def local_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh over ``devices`` (default: every device of this process)."""
    devs = list(jax.local_devices() if devices is None else devices)
    return Mesh(np.array(devs), (AXIS,))


def global_mesh() -> Mesh:
    """A 1-D mesh over every device of every process (after :func:`initialize`)."""
    return Mesh(np.array(jax.devices()), (AXIS,))


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, **kwargs: Any) -> Mesh:
    """Join a multi-host run (``jax.distributed.initialize``) and return the global mesh.

    Every host runs the same program; with no arguments JAX reads the cluster from the
    environment (SLURM, TPU pods, or ``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` /
    ``JAX_PROCESS_ID``).
    """
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id, **kwargs)
    return global_mesh()


def pad_for(data: CrowdData, n: int) -> CrowdData:
    """Pad the answers axis to a multiple of ``n`` with inert entries.

    COO: answers of weight 0 (on the last task, keeping the task index sorted). Dense: task
    rows with no answers, masked out (``task_mask`` 0, no gold).
    """
    xp = np if isinstance(data.task_mask, np.ndarray) else jnp  # host arrays stay on the host
    if isinstance(data, Coo):
        A = data.task.shape[0]
        extra = (-A) % n
        if not extra:
            return data
        last = data.task[-1]
        pad = lambda x, v: xp.concatenate([x, xp.full((extra,), v, x.dtype)])  # noqa: E731
        return Coo(task=pad(data.task, last), worker=pad(data.worker, 0),
                   label=pad(data.label, 0), weight=pad(data.weight, 0),
                   task_mask=data.task_mask, worker_mask=data.worker_mask, gold=data.gold,
                   n_classes=data.n_classes)
    T = data.labels.shape[0]
    extra = (-T) % n
    if not extra:
        return data
    return Dense(labels=xp.pad(data.labels, ((0, extra), (0, 0)), constant_values=-1),
                 task_mask=xp.pad(data.task_mask, (0, extra)),
                 worker_mask=data.worker_mask,
                 gold=xp.pad(data.gold, (0, extra), constant_values=-1),
                 n_classes=data.n_classes)


def _put(x: Any, sharding: NamedSharding) -> jax.Array:
    """A global array from this host's full copy ``x`` (each host supplies its own shards)."""
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


def shard(data: CrowdData, mesh: Mesh | None = None) -> CrowdData:
    """Place ``data`` on ``mesh`` with the answers axis split across its devices.

    COO: ``task``, ``worker``, ``label``, ``weight`` split; masks and gold replicated.
    Dense: the task rows (``labels``, ``task_mask``, ``gold``) split; ``worker_mask``
    replicated. The axis is first padded to a multiple of the mesh size (:func:`pad_for`).
    Kernels then take ``data`` as usual; padding never changes a result, but the padded
    dense rows appear at the end of per-task outputs (cut them with ``[:n_tasks]``).
    """
    mesh = local_mesh() if mesh is None else mesh
    data = pad_for(data, mesh.devices.size)
    split = NamedSharding(mesh, P(AXIS))
    rows = NamedSharding(mesh, P(AXIS, None))
    rep = NamedSharding(mesh, P())
    if isinstance(data, Coo):
        return Coo(task=_put(data.task, split), worker=_put(data.worker, split),
                   label=_put(data.label, split), weight=_put(data.weight, split),
                   task_mask=_put(data.task_mask, rep), worker_mask=_put(data.worker_mask, rep),
                   gold=_put(data.gold, rep), n_classes=data.n_classes)
    return Dense(labels=_put(data.labels, rows), task_mask=_put(data.task_mask, split),
                 worker_mask=_put(data.worker_mask, rep), gold=_put(data.gold, split),
                 n_classes=data.n_classes)


@contextlib.contextmanager
def sharded(mesh: Mesh | None = None) -> Iterator[Mesh]:
    """Inside the block, every aggregator's ``fit`` splits its answers over ``mesh``.

    ``prepare`` (which every aggregator calls but ``ds-bayes``, IBCC's NUTS / SVI and
    ``llm-judge``; ``Aggregator.shardable`` says which) places the data it builds with
    :func:`shard`, so the classes run sharded with no other change and give
    the single-device results to float rounding (tested for every method on 4 CPU devices).
    ``mesh`` defaults to every local device; on one device the block changes nothing (the
    native CPU kernels, which need the whole panel on one device, stay in use). The classes
    gather their results on this process, so the mesh must hold this process's devices only;
    for a multi-host run use the kernels with :func:`initialize` and :func:`shard`.

        >>> with sharding.sharded():                          # all local GPUs  # doctest: +SKIP
        ...     labels = crowdllm.DawidSkene().fit(tensor).labels_
    """
    mesh = local_mesh() if mesh is None else mesh
    others = {d.process_index for d in mesh.devices.flat} - {jax.process_index()}
    if others:
        raise ValueError(
            f"sharding.sharded: the mesh spans processes {sorted(others)} besides this one "
            f"({jax.process_index()}); the aggregator classes gather their results on one "
            f"process: for a multi-host run call a kernel's fit on shard(prepare(...)) instead")
    token = _core._MESH.set(mesh if mesh.devices.size > 1 else None)
    try:
        yield mesh
    finally:
        _core._MESH.reset(token)
