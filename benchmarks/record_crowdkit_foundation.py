"""Record crowd-kit 1.4.2's accuracy on gold tasks for MV, Wawa, ZBS, DS and one-coin DS.

crowd-kit's pandas implementations take tens of seconds on the larger datasets, so the test
suite compares against the figures this script records (tests/reference/crowdkit_foundation.json)
instead of re-running crowd-kit every time. Re-run it after changing crowd-kit's version:

    python benchmarks/record_crowdkit_foundation.py [DATA_DIR]
"""

from __future__ import annotations

import json
import sys
import time
import warnings
from pathlib import Path

import pandas as pd
from crowdkit.aggregation import DawidSkene, MajorityVote, OneCoinDawidSkene, Wawa, ZeroBasedSkill

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT.parent / "shared" / "data"
OUT = ROOT / "tests" / "reference" / "crowdkit_foundation.json"

METHODS = {
    "mv": lambda: MajorityVote(),
    "wawa": lambda: Wawa(),
    "zbs": lambda: ZeroBasedSkill(),
    "ds": lambda: DawidSkene(n_iter=100),
    "onecoin-ds": lambda: OneCoinDawidSkene(n_iter=100),
}


def main() -> None:
    import crowdkit

    warnings.simplefilter("ignore")
    out: dict = {"crowdkit_version": getattr(crowdkit, "__version__", "1.4.2"), "accuracy": {},
                 "seconds": {}}
    for ds in sorted(p for p in DATA.iterdir() if (p / "answers.csv").exists()):
        df = pd.read_csv(ds / "answers.csv", dtype=str)
        gold = pd.read_csv(ds / "gold.csv", dtype=str).set_index("task")["label"]
        out["accuracy"][ds.name] = {}
        out["seconds"][ds.name] = {}
        for name, make in METHODS.items():
            t0 = time.perf_counter()
            labels = make().fit_predict(df)
            sec = time.perf_counter() - t0
            common = gold.index.intersection(labels.index)
            acc = float((labels.loc[common].astype(str) == gold.loc[common]).mean())
            out["accuracy"][ds.name][name] = acc
            out["seconds"][ds.name][name] = round(sec, 2)
            print(f"{ds.name:28s} {name:11s} acc={acc:.4f} {sec:7.1f}s", flush=True)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(out, indent=2, sort_keys=True) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
