#!/usr/bin/env python
"""XLA compile seconds per method and dataset: one default fit of each method on each real
dataset in ../shared/data (what the parity tests do), with JAX's persistent cache off, so every
program is compiled. The test suite is bound by this (one program per method and dataset shape).

    python benchmarks/compile_time.py --methods ds,mace,ibcc --datasets li_quiz_pokemon,dog
    PYTHONPATH=/path/to/other/checkout python benchmarks/compile_time.py   # another tree's code
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import time
import warnings
from pathlib import Path

if not os.environ.get("PYTHONPATH"):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402

import crowdllm  # noqa: E402

from crowdllm.aggregation import get_method  # noqa: E402
from crowdllm.eval import speed  # noqa: E402
from crowdllm.labels import LabelTensor  # noqa: E402

DATA = Path(os.environ.get("CROWDLLM_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
EVENT = "/jax/core/compile/backend_compile_duration"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--methods", default="ds,onecoin-ds,glad,mace,mmsr,bwa,ibcc,ebcc")
    ap.add_argument("--datasets", default=None, help="comma-separated; default every dataset")
    ap.add_argument("--data", default=str(DATA))
    args = ap.parse_args()
    jax.config.update("jax_enable_compilation_cache", False)
    seconds: collections.Counter = collections.Counter()
    count: collections.Counter = collections.Counter()

    def listen(event: str, duration: float, **_: object) -> None:
        if event == EVENT:
            seconds[0] += duration
            count[0] += 1

    jax.monitoring.register_event_duration_secs_listener(listen)
    root = Path(args.data)
    names = args.datasets.split(",") if args.datasets else sorted(
        p.name for p in root.iterdir() if (p / "answers.csv").exists())
    tensors = {n: LabelTensor.coerce(root / n / "answers.csv") for n in names}
    print(f"machine: {speed.machine()}")
    print(f"code: {Path(crowdllm.__file__).resolve().parent}")
    print("| method | dataset | tasks x annotators | compile s | programs | fit s (with compile) |")
    print("| --- | --- | --- | ---: | ---: | ---: |")
    totals = {}
    for method in args.methods.split(","):
        tot_c = tot_w = 0.0
        for name, t in tensors.items():
            c0, n0 = seconds[0], count[0]
            t0 = time.perf_counter()
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    get_method(method).fit(t)
            except ValueError as e:  # e.g. KOS on a multi-class dataset
                print(f"| {method} | {name} | {t.n_tasks} x {t.n_workers} | - | - | {e} |")
                continue
            wall = time.perf_counter() - t0
            c = seconds[0] - c0
            tot_c, tot_w = tot_c + c, tot_w + wall
            print(f"| {method} | {name} | {t.n_tasks} x {t.n_workers} | {c:.2f} | "
                  f"{count[0] - n0} | {wall:.2f} |", flush=True)
        totals[method] = (tot_c, tot_w)
    print("\n| method | compile s, all datasets | fit s, all datasets |\n| --- | ---: | ---: |")
    for method, (c, w) in totals.items():
        print(f"| {method} | {c:.1f} | {w:.1f} |")


if __name__ == "__main__":
    main()
