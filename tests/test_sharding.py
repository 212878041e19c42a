"""Sharded fits equal single-device fits, on 4 CPU devices.

``XLA_FLAGS=--xla_force_host_platform_device_count=4`` only works if it is set before jax is
imported, so the checks run in a fresh Python process (the script below).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(r'''
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    import jax, jax.numpy as jnp, numpy as np
    from crowdllm.aggregation import _core, dawid_skene, one_coin, majority_vote, sharding
    from crowdllm.labels import LabelTensor

    assert jax.device_count() == 4, jax.devices()
    mesh = sharding.local_mesh()
    assert mesh.devices.size == 4

    def crowd(n_tasks, n_workers, per_task, n_classes, seed):
        rng = np.random.default_rng(seed)
        truth = rng.integers(0, n_classes, n_tasks)
        acc = rng.uniform(0.35, 0.95, n_workers)
        t, w, l = [], [], []
        for i in range(n_tasks):
            for j in rng.choice(n_workers, per_task, replace=False):
                lab = truth[i] if rng.random() < acc[j] else rng.integers(0, n_classes)
                t.append(i); w.append(int(j)); l.append(int(lab))
        return LabelTensor.from_arrays(t, w, l)

    sparse = crowd(301, 40, 3, 4, 0)     # human-crowd shape: COO
    panel = crowd(203, 6, 6, 3, 1)       # LLM-panel shape: every worker answers (dense)
    gold = np.full(panel.n_tasks, -1, np.int32); gold[:15] = 0

    def close(a, b, what):
        a, b = np.asarray(a), np.asarray(b)
        assert a.shape == b.shape, (what, a.shape, b.shape)
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=what)

    checked = 0
    for tensor, layout, g in [(sparse, "coo", None), (panel, "coo", gold), (panel, "dense", gold)]:
        data = _core.prepare(tensor, layout=layout, gold=g)
        sdata = sharding.shard(data, mesh)
        n = tensor.n_tasks
        # the per-answer (or per-task-row) arrays really are split over the 4 devices
        arr = sdata.task if layout == "coo" else sdata.labels
        assert len(arr.sharding.device_set) == 4 and not arr.sharding.is_fully_replicated
        shapes = {s.data.shape for s in arr.addressable_shards}
        assert len(shapes) == 1 and next(iter(shapes))[0] * 4 == arr.shape[0], shapes

        one = dawid_skene.fit(data, max_iter=30)
        many = dawid_skene.fit(sdata, max_iter=30)
        assert int(one.n_iter) == int(many.n_iter)
        close(one.posteriors[:n], many.posteriors[:n], f"ds posteriors {layout}")
        close(one.confusion, many.confusion, f"ds confusion {layout}")
        close(one.history, many.history, f"ds objective {layout}")

        one = one_coin.fit(data, max_iter=30)
        many = one_coin.fit(sdata, max_iter=30)
        close(one.posteriors[:n], many.posteriors[:n], f"one-coin {layout}")

        key = jax.random.key(0)
        one = majority_vote.fit(data, key, False)
        many = majority_vote.fit(sdata, key, False)
        close(one.posteriors[:n], many.posteriors[:n], f"mv {layout}")
        np.testing.assert_array_equal(np.asarray(one.labels[:n]), np.asarray(many.labels[:n]))
        checked += 1

    # the statistics are combined by collective sums: the compiled COO kernel has all-reduces
    sdata = sharding.shard(_core.prepare(sparse, layout="coo"), mesh)
    hlo = dawid_skene.fit.lower(sdata, max_iter=5).compile().as_text()
    assert "all-reduce" in hlo
    # padding the answers axis to the mesh size changes nothing
    odd = _core.prepare(sparse, layout="coo", pad=False)
    assert odd.task.shape[0] % 4 != 0
    close(dawid_skene.fit(odd, max_iter=10).posteriors,
          dawid_skene.fit(sharding.shard(odd, mesh), max_iter=10).posteriors, "ds padded")
    print("SHARDING OK", checked)
''')


def test_sharded_equals_single_device():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
               JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "SHARDING OK 3" in proc.stdout
