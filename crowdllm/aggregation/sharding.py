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

Example:
    >>> from crowdllm.aggregation import _core, dawid_skene, sharding
    >>> mesh = sharding.local_mesh()                      # all local devices  # doctest: +SKIP
    >>> data = sharding.shard(_core.prepare(tensor, layout="coo"), mesh)    # doctest: +SKIP
    >>> res = dawid_skene.fit(data, max_iter=50)          # runs on every device  # doctest: +SKIP

Known limit: on the dense layout, the chunked fast sums (``_fast``) walk the task axis with
``lax.scan``; when that axis is sharded the compiler gathers the label rows onto each device,
which is correct but does not divide the work. For dense panels beyond one device use the COO
layout (``prepare(..., layout="coo")``), whose sums partition cleanly. The native CPU kernel
(:mod:`._native`, DawidSkene / OneCoinDawidSkene / IBCC on one device) is not used for data
sharded over several devices: their classes take the XLA path there.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ._core import Coo, CrowdData, Dense

__all__ = ["AXIS", "local_mesh", "global_mesh", "initialize", "shard", "pad_for"]

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
    if isinstance(data, Coo):
        A = data.task.shape[0]
        extra = (-A) % n
        if not extra:
            return data
        last = data.task[-1]
        pad = lambda x, v: jnp.concatenate([x, jnp.full((extra,), v, x.dtype)])  # noqa: E731
        return Coo(task=pad(data.task, last), worker=pad(data.worker, 0),
                   label=pad(data.label, 0), weight=pad(data.weight, 0),
                   task_mask=data.task_mask, worker_mask=data.worker_mask, gold=data.gold,
                   n_classes=data.n_classes)
    T = data.labels.shape[0]
    extra = (-T) % n
    if not extra:
        return data
    return Dense(labels=jnp.pad(data.labels, ((0, extra), (0, 0)), constant_values=-1),
                 task_mask=jnp.pad(data.task_mask, (0, extra)),
                 worker_mask=data.worker_mask,
                 gold=jnp.pad(data.gold, (0, extra), constant_values=-1),
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
