"""How many programs a method compiles over the real datasets inside ``shared_shapes``.

The parity test modules fit every method on the 21 datasets of ``../shared/data`` inside one
``shared_shapes`` block for the sparse crowds and one for the panels, with no padding limit
(``tests/conftest.py``: ``one_shape_per_class_count``). This counts the entries each method's
jitted fit adds to its cache over those fits: one per program compiled. No timing.

    CROWDLLM_DATA=../shared/data python benchmarks/shared_shape_programs.py
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path


def main() -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from conftest import real_shared_shapes, real_tensors  # the tests' datasets and block

    from crowdllm.aggregation import MACE, MMSR, DawidSkene, _native, mmsr

    methods = {"mace": (MACE, [_native.mace_fit_restarts]),
               "mmsr": (MMSR, [mmsr.fit, mmsr.fit_sparse]),
               "ds": (DawidSkene, [_native.ds_fit])}
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default=",".join(methods))
    a = ap.parse_args()
    tensors = real_tensors()
    print(f"{len(tensors)} datasets")
    with real_shared_shapes(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in a.methods.split(","):
            cls, fns = methods[name]
            before = sum(f._cache_size() for f in fns)
            for t in tensors:
                cls().fit(t)
            print(f"{name:5s} {sum(f._cache_size() for f in fns) - before} programs", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
