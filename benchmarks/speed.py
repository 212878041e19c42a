#!/usr/bin/env python
"""Speed table: our kernels vs crowd-kit vs this machine's memory-bandwidth floor.

Examples (run one heavy job at a time on a shared machine; prefix with ``nice``):

    # the headline check: DS, 50 iterations, dense 1,000,000 x 12 x 5, crowd-kit at 100,000
    python benchmarks/speed.py ds --n 1000000 --crowdkit-n 100000
    # every EM / VB kernel, exactly 50 iterations on 1,000,000 x 12 x 5: native vs XLA vs floor
    python benchmarks/speed.py iters --n 1000000
    # every aggregator at given sizes (each in its own process: peak RSS per method)
    python benchmarks/speed.py table --sizes 10000,100000 --kind dense
    python benchmarks/speed.py table --sizes 1000000 --kind coo --methods ds,mv
    # the sparse human crowd (10,000 annotators, 3 answers per task), crowd-kit beside ours
    python benchmarks/speed.py table --sizes 10000,100000,1000000,10000000 --kind coo
    # all of it, JSON saved
    python benchmarks/speed.py all --out speed.json

Progress lines go to stderr, tables to stdout. See ``crowdllm/eval/speed.py``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from crowdllm.eval import speed  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=["ds", "iters", "table", "all"])
    ap.add_argument("--n", type=int, default=1_000_000, help="items for the DS check")
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--crowdkit-n", type=int, default=100_000,
                    help="items at which to time crowd-kit (0: skip); scaled linearly to --n")
    ap.add_argument("--reference", action="store_true",
                    help="also time the one-hot einsum reference path")
    ap.add_argument("--sizes", default="10000,100000,1000000")
    ap.add_argument("--kind", default="dense", choices=["dense", "coo"])
    ap.add_argument("--methods", default="",
                    help="comma-separated (table default: all but llm-judge; iters default: "
                         + ",".join(speed.ITERATION_METHODS) + ")")
    ap.add_argument("--crowdkit-max", type=int, default=100_000,
                    help="table: time crowd-kit's same method on the same data up to this many items")
    ap.add_argument("--crowdkit-timeout", type=float, default=600,
                    help="table: stop crowd-kit after this many seconds (printed as a lower bound)")
    ap.add_argument("--table-repeats", type=int, default=1, help="table: timed fits after the first")
    ap.add_argument("--timeout", type=float, default=1800, help="table: seconds per method and size")
    ap.add_argument("--out", help="write the figures as JSON here")
    a = ap.parse_args(argv)
    res: dict = {"machine": speed.machine()}
    print(f"machine: {res['machine']}", flush=True)
    if a.what in ("ds", "all"):
        res["ds"] = speed.ds_check(n=a.n, n_iter=a.iters, repeats=a.repeats,
                                   crowdkit_n=a.crowdkit_n or None, reference=a.reference)
    if a.what in ("iters", "all"):
        methods = tuple(m for m in a.methods.split(",") if m) or speed.ITERATION_METHODS
        res["iters"] = speed.iteration_table(n=a.n, n_iter=a.iters, repeats=a.repeats,
                                             methods=methods)
    if a.what in ("table", "all"):
        from crowdllm.aggregation import METHODS
        methods = [m for m in a.methods.split(",") if m] or \
            [m for m in METHODS if m not in ("llm-judge", "ds-bayes")]
        sizes = [int(s) for s in a.sizes.split(",")]
        speed.print_header()
        res["table"] = speed.method_table(methods, sizes, a.kind, repeats=a.table_repeats,
                                          timeout=a.timeout, crowdkit_max=a.crowdkit_max,
                                          crowdkit_timeout=a.crowdkit_timeout)
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
