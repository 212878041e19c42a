#!/usr/bin/env python
"""Time the native kernels' row merge (``_native.unique``: one hash pass per fit) on the
synthetic dense panel (N x 12 x 5) and on a panel that agrees (80 % of its tasks answered by
every annotator as annotator 0 answered them), median and minimum of 9 runs.

    python benchmarks/merge_speed.py --n 1000000
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from crowdllm.aggregation import _native  # noqa: E402
from crowdllm.eval import speed  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--repeats", type=int, default=9)
    args = ap.parse_args()
    if not _native.available():
        sys.exit(f"the native kernels are unavailable: {_native.why_unavailable()}")
    labels, _ = speed.dense_panel(args.n)
    data = speed.dense_data(labels)
    lab = np.asarray(data.labels)
    agree = np.random.default_rng(0).random(lab.shape[0]) < 0.8
    agreeing = dataclasses.replace(data, labels=jnp.asarray(np.where(agree[:, None], lab[:, :1], lab)))
    p = _native.plan(int(lab.shape[1]), int(data.n_classes))
    encode = jax.jit(lambda d: (_native.encode(d.labels, p), _native.flags_of(d.task_mask, d.gold)))
    merge = jax.jit(_native.unique)
    print(f"machine: {speed.machine()}")
    print(f"row merge, {args.n:,} x {lab.shape[1]} x {data.n_classes}, {args.repeats} runs")
    print(f"{'panel':10s} {'distinct rows':>14s} {'median ms':>10s} {'min ms':>8s}")
    for name, d in (("synthetic", data), ("agreeing", agreeing)):
        codes, flags = encode(d)
        rows = jax.block_until_ready(merge(codes, flags))
        ts = [speed._timed(lambda: jax.block_until_ready(merge(codes, flags)))
              for _ in range(args.repeats)]
        print(f"{name:10s} {int(rows.n[0]):14,d} {np.median(ts) * 1e3:10.1f} {min(ts) * 1e3:8.1f}")


if __name__ == "__main__":
    main()
