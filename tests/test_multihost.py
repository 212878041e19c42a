"""A fit across two processes (two "hosts" of 2 CPU devices each, joined by
``jax.distributed.initialize`` on localhost, collectives over gloo) equals the single-device fit.

Each process runs the script below: it joins the run (:func:`crowdllm.aggregation.sharding.initialize`),
shards the same answers over the global 4-device mesh (each process holds only its own shards),
fits, gathers the posteriors from both processes, and compares them with a fit on one local
device. This is the multi-host path of issue 5 on one machine; a real cluster differs only in the
coordinator address.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(r'''
    import os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    import jax, numpy as np
    from jax.experimental import multihost_utils
    from crowdllm.aggregation import _core, dawid_skene, one_coin, sharding
    from crowdllm.labels import LabelTensor

    pid, port = int(sys.argv[1]), sys.argv[2]
    mesh = sharding.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=pid)
    assert jax.process_count() == 2 and jax.device_count() == 4 and jax.local_device_count() == 2
    assert mesh.devices.size == 4

    rng = np.random.default_rng(0)  # the same answers in both processes
    T, W, K = 1001, 30, 4
    truth = rng.integers(0, K, T)
    acc = rng.uniform(0.35, 0.95, W)
    lab = np.where(rng.random((T, W)) < acc[None], truth[:, None], rng.integers(0, K, (T, W)))
    lab[rng.random((T, W)) < 0.8] = -1
    tensor = LabelTensor.from_dense(lab)
    gold = np.full(tensor.n_tasks, -1, np.int32); gold[:20] = truth[:20]

    def close(a, b, what):
        a, b = np.asarray(a), np.asarray(b)
        assert a.shape == b.shape, (what, a.shape, b.shape)
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=what)

    for g in (None, gold):
        data = _core.prepare(tensor, layout="coo", gold=g)
        sdata = sharding.shard(data, mesh)
        assert len(sdata.task.sharding.device_set) == 4
        assert len(sdata.task.addressable_shards) == 2  # this process holds half of the answers
        n = tensor.n_tasks
        for name, fit in (("ds", dawid_skene.fit), ("one-coin", one_coin.fit)):
            one, many = fit(data, max_iter=30), fit(sdata, max_iter=30)
            assert int(one.n_iter) == int(many.n_iter), name
            post = multihost_utils.process_allgather(many.posteriors, tiled=True)
            close(one.posteriors[:n], post[:n], f"{name} gold={g is not None}")
            if name == "ds":
                close(one.confusion, multihost_utils.process_allgather(many.confusion, tiled=True),
                      "ds confusion")
    # the classes gather their results on one process: sharded() refuses a mesh over both
    try:
        with sharding.sharded(mesh):
            pass
    except ValueError as exc:
        assert "spans processes" in str(exc) and "shard(prepare" in str(exc), exc
    else:
        raise AssertionError("sharded() took a mesh over two processes")
    print("MULTIHOST OK", pid, flush=True)
''')


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_equal_one_device():
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    port = str(_free_port())
    procs = [subprocess.Popen([sys.executable, "-c", SCRIPT, str(i), port], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=600))
    finally:
        for p in procs:
            p.kill()
    for i, (p, (out, err)) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"process {i}: " + out[-3000:] + err[-5000:]
        assert f"MULTIHOST OK {i}" in out
