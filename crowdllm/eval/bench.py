r"""The aggregator benchmark: every registered method over every dataset folder, scored on gold.

A dataset folder holds ``answers.csv`` (``task, worker, label``) and ``gold.csv`` (``task,
label``), the layout of the shared crowd datasets. For each dataset and each method in
:data:`crowdllm.aggregation.METHODS` *as registered when the benchmark runs* (methods added
later are picked up without changing this file) the method is fitted without gold and scored by
accuracy on the gold tasks. A method that raises is recorded as a failure for that dataset (its
message is kept) and the benchmark goes on.

Summary per method: the mean accuracy over the datasets it completed, how many it completed,
and its mean rank. On each dataset the methods are ranked by accuracy (1 = best, ties share the
average rank); a failure ranks last there. The suggested default is the method with the best
mean rank among those that completed every dataset (mean accuracy breaks ties): a rank is not
dominated by the one or two datasets where every method scores far apart.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from ..labels import CrowdDataError, read_answers
from .evaluate import run_method

__all__ = ["BenchResult", "run_bench", "summarize", "merge_results", "average_ranks", "parse_params", "parse_value",
           "DEFAULT_PARAMS"]

#: per-method parameters the benchmark uses unless ``--param`` says otherwise
DEFAULT_PARAMS: dict[str, dict[str, Any]] = {}


def parse_params(specs: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``["ds.max_iter=200", "mace.restarts=5"]`` -> ``{"ds": {"max_iter": 200}, ...}``.

    Values are read as JSON when they parse (numbers, true/false, null, lists), else as strings.
    """
    out: dict[str, dict[str, Any]] = {}
    for spec in specs:
        head, sep, value = spec.partition("=")
        method, dot, key = head.partition(".")
        if not sep or not dot or not method or not key:
            raise ValueError(f"bad --param {spec!r}: expected METHOD.NAME=VALUE")
        out.setdefault(method.strip(), {})[key.strip()] = parse_value(value)
    return out


def parse_value(text: str) -> Any:
    """A ``--param`` value: JSON when it parses (numbers, true/false, null, lists), else the text."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def average_ranks(acc: np.ndarray) -> np.ndarray:
    """Ranks per row (1 = highest), ties sharing their average rank; NaN (failure) ranks last."""
    acc = np.asarray(acc, dtype=np.float64)
    ranks = np.zeros_like(acc)
    for i, row in enumerate(acc):
        score = np.where(np.isnan(row), -np.inf, row)
        for j, s in enumerate(score):
            higher = (score > s).sum()
            equal = (score == s).sum()
            ranks[i, j] = higher + (equal + 1) / 2.0
    return ranks


@dataclasses.dataclass
class BenchResult:
    """Accuracy per (dataset, method), failures, times and the per-method summary."""

    datasets: list[str]
    methods: list[str]
    accuracy: dict[str, dict[str, float | None]]
    errors: dict[str, dict[str, str]]
    seconds: dict[str, dict[str, float]]
    info: dict[str, dict[str, Any]]
    skipped: dict[str, str]
    summary: list[dict[str, Any]]
    suggested: str | None
    params: dict[str, dict[str, Any]]

    def table(self, fmt: str = "{:.4f}") -> list[dict[str, Any]]:
        """Rows: one per dataset (accuracy per method, ``FAIL`` for a failure, ``n/r`` for a cell
        that no merged run covered), then mean, completed, mean rank and rank (by mean rank)."""
        rows: list[dict[str, Any]] = []
        for d in self.datasets:
            row: dict[str, Any] = {"dataset": d}
            for m in self.methods:
                a = self.accuracy[d].get(m)
                err = self.errors.get(d, {}).get(m)
                row[m] = (("n/r" if err == "not run" else "FAIL") if err is not None
                          else (fmt.format(a) if a is not None else ""))
            rows.append(row)
        by = {s["method"]: s for s in self.summary}
        for label, key, f in (("mean accuracy", "mean_accuracy", fmt), ("completed", "completed", "{}"),
                              ("mean rank", "mean_rank", "{:.2f}"), ("rank", "rank", "{}"),
                              ("time (s)", "seconds", "{:.1f}")):
            rows.append({"dataset": label, **{m: ("" if by[m][key] is None else f.format(by[m][key]))
                                              for m in self.methods}})
        return rows

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _dataset_files(folder: Path) -> tuple[Path, Path] | str:
    answers = next((folder / n for n in ("answers.csv", "answers.parquet", "answers.jsonl")
                    if (folder / n).exists()), None)
    gold = next((folder / n for n in ("gold.csv", "gold.parquet", "gold.jsonl")
                 if (folder / n).exists()), None)
    if answers is None:
        return "no answers file"
    if gold is None:
        return "no gold file"
    return answers, gold


def run_bench(folders: Sequence[str | Path], *, methods: Sequence[str] | None = None,
              params: Mapping[str, Mapping[str, Any]] | None = None, seed: int = 0,
              progress: Callable[[str], None] | None = None,
              share_shapes: bool = True) -> BenchResult:
    """Run every method (default: all registered) on every dataset folder.

    Folders without ``answers`` or ``gold`` are skipped (listed in ``skipped`` with the reason),
    as are folders whose files cannot be read (the error is kept).

    ``share_shapes`` (default): the datasets are read first and fitted inside
    :func:`~crowdllm.aggregation.shared_shapes`, so those with one class count and similar
    sizes (at most 4x apart) are padded to one shape and each method compiles once per such
    group instead of once per dataset. ``CROWDLLM_COMPILE_CACHE=off crowdllm bench
    ../shared/data/*/ -m mace,mmsr``: 101 s against 144 s with ``--own-shapes`` (MACE 59.5 s
    against 85.4 s), the same accuracy on all 21 datasets (2-core Intel host, session 13). A
    dataset's time then includes the padding, and a group's compile falls on its first dataset.
    """
    from ..aggregation import METHODS, shared_shapes

    names = list(methods) if methods else list(METHODS)
    unknown = [m for m in names if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; registered: {', '.join(METHODS)}")
    merged = {m: {**DEFAULT_PARAMS.get(m, {}), **dict((params or {}).get(m, {}))} for m in names}
    stray = sorted(set(params or {}) - set(names))
    if stray:
        raise ValueError(f"--param names method(s) not being run: {stray}")
    datasets: list[str] = []
    tensors: list[Any] = []
    acc: dict[str, dict[str, float | None]] = {}
    errors: dict[str, dict[str, str]] = {}
    secs: dict[str, dict[str, float]] = {}
    info: dict[str, dict[str, Any]] = {}
    skipped: dict[str, str] = {}
    seen: set[str] = set()
    for folder in folders:
        f = Path(folder)
        name = f.name or str(f)
        while name in seen:
            name += "'"
        files = _dataset_files(f) if f.is_dir() else "not a folder"
        if isinstance(files, str):
            skipped[name] = files
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                tensor = read_answers(files[0]).with_gold(files[1])
        except (CrowdDataError, OSError) as exc:
            skipped[name] = f"unreadable: {exc}"
            continue
        if not tensor.has_gold:
            skipped[name] = "no gold label names a task that has answers"
            continue
        seen.add(name)
        datasets.append(name)
        tensors.append(tensor)
        info[name] = {"tasks": tensor.n_tasks, "workers": tensor.n_workers,
                      "answers": tensor.n_answers, "classes": tensor.n_classes,
                      "gold_tasks": int((tensor.gold >= 0).sum())}
    with shared_shapes(tensors if share_shapes else []):
        for name, tensor in zip(datasets, tensors):
            mask = tensor.gold >= 0
            acc[name], errors[name], secs[name] = {}, {}, {}
            for m in names:
                if progress:
                    progress(f"{name}: {m}")
                out = run_method(tensor, m, merged[m], seed=seed)
                secs[name][m] = round(out.seconds, 3)
                if out.codes is None:
                    acc[name][m] = None
                    errors[name][m] = out.error or "failed"
                else:
                    acc[name][m] = float((out.codes[mask] == tensor.gold[mask]).mean())
    if not datasets:
        raise ValueError("no dataset folder with answers and gold among the arguments"
                         + (f" (skipped: {skipped})" if skipped else ""))
    return summarize(datasets, names, acc, errors, secs, info, skipped, merged)


def summarize(datasets: list[str], names: list[str], acc: dict[str, dict[str, float | None]],
              errors: dict[str, dict[str, str]], secs: dict[str, dict[str, float]],
              info: dict[str, dict[str, Any]], skipped: dict[str, str],
              params: dict[str, dict[str, Any]]) -> BenchResult:
    """Mean accuracy, completed count, mean rank, rank and the suggested default from the grid.

    A (dataset, method) cell that is missing or None counts as a failure there.
    """
    grid = np.array([[np.nan if acc[d].get(m) is None else acc[d][m] for m in names]
                     for d in datasets])
    ranks = average_ranks(grid)
    summary = []
    for j, m in enumerate(names):
        col = grid[:, j]
        ok = ~np.isnan(col)
        summary.append({"method": m, "mean_accuracy": float(col[ok].mean()) if ok.any() else None,
                        "completed": int(ok.sum()), "datasets": len(datasets),
                        "mean_rank": float(ranks[:, j].mean()),
                        "seconds": float(sum(secs.get(d, {}).get(m, 0.0) for d in datasets))})
    order = sorted(range(len(names)), key=lambda j: (summary[j]["mean_rank"],
                                                      -(summary[j]["mean_accuracy"] or 0.0)))
    for r, j in enumerate(order, start=1):
        summary[j]["rank"] = r
    complete = [summary[j] for j in order if summary[j]["completed"] == len(datasets)]
    suggested = complete[0]["method"] if complete else None
    return BenchResult(datasets=datasets, methods=names, accuracy=acc, errors=errors,
                       seconds=secs, info=info, skipped=skipped, summary=summary,
                       suggested=suggested, params=params)


def merge_results(results: Sequence[BenchResult | Mapping[str, Any]]) -> BenchResult:
    """Combine benchmark results (e.g. the JSON of runs over different methods) into one table.

    Datasets and methods are the union, in order of first appearance; a later result's cell
    replaces an earlier one's; a cell no result has counts as a failure ("not run").
    """
    datasets: list[str] = []
    names: list[str] = []
    acc: dict[str, dict[str, float | None]] = {}
    errors: dict[str, dict[str, str]] = {}
    secs: dict[str, dict[str, float]] = {}
    info: dict[str, dict[str, Any]] = {}
    skipped: dict[str, str] = {}
    params: dict[str, dict[str, Any]] = {}
    for r in results:
        d = r.to_dict() if isinstance(r, BenchResult) else dict(r)
        for ds in d["datasets"]:
            if ds not in datasets:
                datasets.append(ds)
        names += [m for m in d["methods"] if m not in names]
        for ds in d["datasets"]:
            for m in d["methods"]:
                acc.setdefault(ds, {})[m] = d["accuracy"][ds].get(m)
                secs.setdefault(ds, {})[m] = d["seconds"][ds].get(m, 0.0)
                errors.setdefault(ds, {}).pop(m, None)
                if m in d["errors"].get(ds, {}):
                    errors[ds][m] = d["errors"][ds][m]
            info[ds] = d["info"][ds]
        skipped.update({k: v for k, v in d.get("skipped", {}).items() if k not in datasets})
        params.update(d.get("params", {}))
    for ds in datasets:
        for m in names:
            if m not in acc[ds]:
                acc[ds][m] = None
                errors.setdefault(ds, {})[m] = "not run"
    return summarize(datasets, names, acc, errors, secs, info, skipped, params)
