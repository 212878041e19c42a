"""Sharded fits equal single-device fits, on 4 CPU devices.

``XLA_FLAGS=--xla_force_host_platform_device_count=4`` only works if it is set before jax is
imported, so the checks run in a fresh Python process (the script below).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

# what both scripts start with: 4 CPU devices, and a crowd drawn from a one-coin story
PREAMBLE = textwrap.dedent(r'''
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    import jax, numpy as np
    from crowdllm.labels import LabelTensor

    assert jax.device_count() == 4, jax.devices()

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

''')

SCRIPT = PREAMBLE + textwrap.dedent(r'''
    import jax.numpy as jnp
    from crowdllm.aggregation import _core, dawid_skene, one_coin, majority_vote, sharding

    mesh = sharding.local_mesh()
    assert mesh.devices.size == 4

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
    # a dense panel's rows are divided too: each device's program holds a quarter of them, and
    # the label matrix is never gathered whole
    dense = sharding.shard(_core.prepare(panel, layout="dense"), mesh)
    T, W = dense.labels.shape
    hlo = dawid_skene.fit.lower(dense, max_iter=5).compile().as_text()
    assert f"s8[{T // 4},{W}]" in hlo and f"s8[{T},{W}]" not in hlo and "all-gather" not in hlo
    # padding the answers axis to the mesh size changes nothing
    odd = _core.prepare(sparse, layout="coo", pad=False)
    assert odd.task.shape[0] % 4 != 0
    close(dawid_skene.fit(odd, max_iter=10).posteriors,
          dawid_skene.fit(sharding.shard(odd, mesh), max_iter=10).posteriors, "ds padded")
    print("SHARDING OK", checked)
''')

# Every aggregator's class inside sharding.sharded() against the same class on one device (with
# gold in fitting where the method takes it); the command's --shard against no --shard. One crowd
# per method (COO or a dense panel, alternating, so each layout is covered by half of them),
# float64 where the method offers it (float32 for the votes, whose sums are exact). The sharded
# fit is also padded to a larger crowd's shape (shared_shapes: more tasks, annotators and answers
# on COO, more tasks and annotators on a panel), which must change nothing either.
CLASSES_SCRIPT = PREAMBLE + textwrap.dedent(r'''
    import json, math
    from click.testing import CliRunner
    from crowdllm.aggregation import METHODS, _core, get_method, shared_shapes, sharding
    from crowdllm.cli import main

    crowds = {"coo": crowd(301, 40, 3, 3, 0), "dense": crowd(203, 6, 6, 3, 1)}
    binary = {"coo": crowd(301, 40, 3, 2, 2), "dense": crowd(203, 6, 6, 2, 3)}
    larger = {(k, layout): crowd(*size, k, 4 + k)
              for k in (2, 3) for layout, size in [("coo", (420, 70, 3)), ("dense", (250, 9, 9))]}

    placed = []  # the device count and worker axis of every crowd prepare puts on the mesh
    _shard = sharding.shard
    def spy(data, mesh=None):
        out = _shard(data, mesh)
        placed.append((len(jax.tree_util.tree_leaves(out)[0].sharding.device_set),
                       data.worker_mask.shape[0]))
        return out
    sharding.shard = spy

    one_device = sorted(n for n in METHODS if not get_method(n).shardable)
    assert one_device == ["ds-bayes", "llm-judge"], one_device
    names = [n for n in METHODS if n not in one_device]
    for i, name in enumerate(names):
        layout = ("coo", "dense")[i % 2]
        tensor = (binary if name == "kos" else crowds)[layout]
        # fewer restarts than the defaults (10, 40): a restart runs the same kernel
        params = {"layout": layout, **{"mace": {"n_restarts": 3}, "ebcc": {"restarts": 3}}.get(name, {})}
        if "dtype" in get_method(name).__dict__:
            params["dtype"] = "float64"
        # gold clamped in fitting where the method takes it: on the dense layout the gold rows
        # are split over the devices with the answers
        gold = ({t: tensor.classes[0] for t in tensor.task_ids[:15].tolist()}
                if get_method(name).supports_gold else None)
        one = get_method(name, **params).fit(tensor, gold=gold)
        del placed[:]
        with sharding.sharded() as mesh, shared_shapes([tensor, larger[tensor.n_classes, layout]],
                                                       max_pad=math.inf):
            assert mesh.devices.size == 4
            many = get_method(name, **params).fit(tensor, gold=gold)
        # the data really was split, and padded with the larger crowd's annotators
        assert placed and set(placed) == {(4, 9 if layout == "dense" else 72)}, (name, placed)
        np.testing.assert_allclose(many.probas_, one.probas_, rtol=0, atol=1e-5, err_msg=name)
        np.testing.assert_array_equal(many.label_codes_, one.label_codes_, err_msg=name)
        assert many.n_iter_ == one.n_iter_ or "dtype" not in params, (name, many.n_iter_, one.n_iter_)
        if gold is not None:
            assert (many.label_codes_[:15] == 0).all(), name  # the gold tasks were clamped
        print("OK", name, layout, params.get("dtype", "float32"), "gold" if gold else "", flush=True)
    # outside the block nothing is split, and one device changes nothing
    del placed[:]
    get_method("ds").fit(crowds["coo"])
    with sharding.sharded(sharding.local_mesh(jax.devices()[:1])):
        assert not isinstance(_core.prepare(crowds["coo"]).task.sharding, jax.sharding.NamedSharding)
    assert not placed

    runner = CliRunner()
    base = runner.invoke(main, ["aggregate", "example", "--json"])
    split = runner.invoke(main, ["aggregate", "example", "--json", "--shard"])
    assert base.exit_code == 0 and split.exit_code == 0, base.output + split.output
    a, b = json.loads(base.stdout), json.loads(split.stdout)
    assert (a["devices"], b["devices"]) == (1, 4)
    assert [r["label"] for r in a["rows"]] == [r["label"] for r in b["rows"]]
    np.testing.assert_allclose([r["p_0"] for r in b["rows"]], [r["p_0"] for r in a["rows"]],
                               atol=1e-4)
    bad = runner.invoke(main, ["aggregate", "example", "-m", "ds-bayes", "--shard"])
    assert bad.exit_code == 1 and "--shard: method 'ds-bayes' runs on one device" in bad.output
    print("CLASSES OK", len(names))
''')


def _run(script: str) -> str:
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
               JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout


def test_every_aggregator_class_runs_sharded_with_the_same_results():
    out = _run(CLASSES_SCRIPT)
    assert "CLASSES OK 12" in out, out


def test_sharded_equals_single_device():
    assert "SHARDING OK 3" in _run(SCRIPT)
