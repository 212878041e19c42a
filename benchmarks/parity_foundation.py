"""Print the foundation aggregators' parity with crowd-kit 1.4.2 on every dataset in ../shared/data.

Columns: DS posteriors' largest difference and label agreement with crowd-kit's DawidSkene after
the same 20 EM iterations (ours with smoothing=0, float64); then accuracy on gold tasks of ours
(default settings; MV as the expected value under random tie-breaking) beside crowd-kit's
recorded figures (tests/reference/crowdkit_foundation.json).

    python benchmarks/parity_foundation.py [DATA_DIR]
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from crowdllm import DawidSkene, MajorityVote, OneCoinDawidSkene, Wawa, ZeroBasedSkill, read_answers

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT.parent / "shared" / "data"
REF = json.loads((ROOT / "tests" / "reference" / "crowdkit_foundation.json").read_text())["accuracy"]


def main() -> None:
    from crowdkit.aggregation import DawidSkene as CKDS

    warnings.simplefilter("ignore")
    methods = {"mv": MajorityVote, "wawa": Wawa, "zbs": ZeroBasedSkill, "ds": DawidSkene,
               "onecoin-ds": OneCoinDawidSkene}
    head = f"{'dataset':26s} {'DS maxdiff':>10s} {'agree':>6s} " + " ".join(
        f"{m + ' ours/ck':>17s}" for m in methods)
    print(head)
    sums = {m: [0.0, 0.0] for m in methods}
    names = sorted(p.name for p in DATA.iterdir() if (p / "answers.csv").exists())
    for name in names:
        t = read_answers(DATA / name / "answers.csv", gold=DATA / name / "gold.csv")
        g = t.gold >= 0
        ck = CKDS(n_iter=20, tol=-1.0).fit(pd.read_csv(DATA / name / "answers.csv", dtype=str))
        ours = DawidSkene(max_iter=20, tol=-1.0, smoothing=0.0, dtype="float64").fit(t)
        p = ck.probas_.loc[list(t.task_ids), list(t.classes)].to_numpy()
        diff = np.abs(p - ours.probas_).max()
        agree = (p.argmax(1) == ours.probas_.argmax(1)).mean()
        cells = []
        for m, cls in methods.items():
            model = cls().fit(t)
            if m == "mv":
                v = model.votes_[g]
                is_max = v == v.max(1, keepdims=True)
                acc = (is_max[np.arange(len(v)), t.gold[g]] / is_max.sum(1)).mean()
            else:
                acc = (model.label_codes_[g] == t.gold[g]).mean()
            sums[m][0] += acc
            sums[m][1] += REF[name][m]
            cells.append(f"{acc:.4f}/{REF[name][m]:.4f}".rjust(17))
        print(f"{name:26s} {diff:10.1e} {agree:6.4f} " + " ".join(cells), flush=True)
    n = len(names)
    print(f"{'mean':26s} {'':>10s} {'':>6s} " + " ".join(
        f"{sums[m][0] / n:.4f}/{sums[m][1] / n:.4f}".rjust(17) for m in methods))


if __name__ == "__main__":
    main()
