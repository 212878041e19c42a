"""Record crowd-kit 1.4.2's GLAD, MACE, M-MSR and KOS accuracies on the shared datasets.

crowd-kit's GLAD and MACE are slow (minutes per dataset, ~12 min for GLAD on trec2011), so the
parity tests (``tests/test_classical_parity.py``) compare against the figures this script
writes to ``tests/reference/crowdkit_classical.json`` instead of running crowd-kit each time.

Accuracy is measured on the gold tasks that have at least one answer: the fraction whose
predicted label equals the gold label (labels compared as strings, as read from the CSV files).
Each run is crowd-kit's default configuration (``GLAD()``, ``MACE()`` = VB with 10 restarts,
``MMSR()``, ``KOS()``), in a child process with a time limit; a run that raises records the
error message, one that times out records ``"timeout"``. Results are saved after every run and
runs already recorded are skipped, so the script can be stopped and resumed.

Usage::

    nice -n 10 python benchmarks/record_crowdkit_classical.py            # all datasets
    python benchmarks/record_crowdkit_classical.py --methods mmsr kos --datasets dog
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("CROWDLLM_DATA", ROOT.parent / "shared" / "data"))
OUT = ROOT / "tests" / "reference" / "crowdkit_classical.json"
METHODS = ("mmsr", "kos", "mace", "glad")


def load(name: str):
    import pandas as pd

    df = pd.read_csv(DATA / name / "answers.csv", dtype=str, keep_default_na=False)
    gold = pd.read_csv(DATA / name / "gold.csv", dtype=str, keep_default_na=False)
    return df[["task", "worker", "label"]], gold.set_index("task")["label"]


def accuracy(pred, gold) -> tuple[float, int]:
    common = gold.index.intersection(pred.index)
    p = pred.loc[common].astype(str)
    g = gold.loc[common].astype(str)
    return float((p.values == g.values).mean()), int(len(common))


def _run(method: str, name: str, queue) -> None:
    try:
        import crowdkit
        from crowdkit.aggregation import GLAD, KOS, MACE, MMSR

        df, gold = load(name)
        model = {"glad": GLAD, "mace": MACE, "mmsr": MMSR, "kos": KOS}[method]()
        t0 = time.perf_counter()
        pred = model.fit_predict(df)
        seconds = time.perf_counter() - t0
        acc, n = accuracy(pred, gold)
        queue.put({"accuracy": acc, "n_gold": n, "seconds": round(seconds, 2),
                   "crowdkit": crowdkit.__version__ if hasattr(crowdkit, "__version__") else "1.4.2"})
    except Exception as exc:  # recorded, not hidden: the test reads it
        queue.put({"error": f"{type(exc).__name__}: {exc}"})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", nargs="*", default=list(METHODS))
    ap.add_argument("--datasets", nargs="*", default=None)
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per run")
    ap.add_argument("--redo", action="store_true", help="rerun runs already recorded")
    args = ap.parse_args()
    names = args.datasets or [p.name for p in DATA.iterdir() if (p / "answers.csv").exists()]
    names = sorted(names, key=lambda n: (DATA / n / "answers.csv").stat().st_size)
    results = json.loads(OUT.read_text()) if OUT.exists() else {}
    ctx = mp.get_context("fork")
    for name in names:
        for method in args.methods:
            entry = results.setdefault(method, {})
            if name in entry and not args.redo and entry[name].get("error") != "timeout":
                continue
            queue = ctx.Queue()
            proc = ctx.Process(target=_run, args=(method, name, queue))
            t0 = time.perf_counter()
            proc.start()
            proc.join(args.timeout)
            if proc.is_alive():
                proc.kill()
                proc.join()
                rec = {"error": "timeout", "seconds": args.timeout}
            else:
                rec = queue.get() if not queue.empty() else {"error": f"exit code {proc.exitcode}"}
            entry[name] = rec
            print(f"{method:5s} {name:28s} {rec} ({time.perf_counter() - t0:.0f} s)", flush=True)
            OUT.parent.mkdir(parents=True, exist_ok=True)
            tmp = OUT.with_suffix(".tmp")
            tmp.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
            tmp.replace(OUT)


if __name__ == "__main__":
    sys.exit(main())
