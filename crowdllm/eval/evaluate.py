"""The evaluation table: every single annotator and every aggregation method, scored on gold.

One row per system: each annotator (scored on the gold tasks it answered), the pooled single
answers of the crowd (``(any single answer)``: what one answer drawn at random is worth), each
aggregation method (on all gold tasks) and any extra prediction file. Columns: gold tasks
scored, coverage, accuracy, macro / weighted F1, and precision / recall / F1 per class.

An aggregated result *beats* an annotator when its accuracy on the gold tasks that annotator
answered is strictly higher than the annotator's own there (the same tasks for both; for a full
LLM panel that is every gold task). The *best single annotator* is the most accurate annotator
among those that answered at least ``min_coverage`` of the gold tasks; the *reference* is an
annotator named by the user (e.g. a GPT-4 column treated as one more annotator).

Agreement (Cohen's kappa for every pair, Fleiss' kappa, Krippendorff's alpha) is computed on the
same gold tasks when gold covers only part of the tasks.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from typing import Any, Mapping, Sequence

import numpy as np

from ..labels import LabelTensor
from . import agreement
from .metrics import classification_summary

__all__ = ["MethodOutcome", "run_method", "default_methods", "CALLS_MODELS", "Evaluation", "evaluate", "CROWD_ROW",
           "prediction_codes"]

#: name of the row that pools every single answer of the crowd
CROWD_ROW = "(any single answer)"


#: registered methods that call a model (network, GPU, money): run by evaluate/report only when named
CALLS_MODELS = frozenset({"llm-judge"})


def default_methods() -> list[str]:
    """The methods ``evaluate`` and ``report`` run unless told otherwise: every registered one
    except those that call a model (:data:`CALLS_MODELS`, or a class with ``calls_models = True``)."""
    from ..aggregation import METHODS

    return [n for n, cls in METHODS.items()
            if n not in CALLS_MODELS and not getattr(cls, "calls_models", False)]


@dataclasses.dataclass
class MethodOutcome:
    """One aggregator run: class codes per task (None if it failed), the error, the time."""

    name: str
    codes: np.ndarray | None
    error: str | None = None
    seconds: float = 0.0
    warnings: list[str] = dataclasses.field(default_factory=list)
    model: Any = None


def run_method(tensor: LabelTensor, name: str, params: Mapping[str, Any] | None = None, *,
               seed: int = 0) -> MethodOutcome:
    """Fit the registered method ``name`` on ``tensor`` (gold is not used in fitting).

    Any exception is caught and returned as ``error`` (``Type: message``), so a harness that
    runs many methods shows a failure instead of stopping.
    """
    from ..aggregation import get_method

    t0 = time.perf_counter()
    caught: list[warnings.WarningMessage] = []
    try:
        with warnings.catch_warnings(record=True) as caught:  # type: ignore[assignment]
            warnings.simplefilter("always")
            model = get_method(name, dict(params or {}), seed=seed)
            model.fit(tensor)
        codes = np.asarray(model.label_codes_, dtype=np.int32)
        if codes.shape != (tensor.n_tasks,):
            raise ValueError(f"returned {codes.shape} labels for {tensor.n_tasks} tasks")
        return MethodOutcome(name, codes, None, time.perf_counter() - t0,
                             [str(w.message) for w in caught], model)
    except Exception as exc:  # noqa: BLE001 - a harness reports every failure
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return MethodOutcome(name, None, f"{type(exc).__name__}: {msg}"[:300],
                             time.perf_counter() - t0, [str(w.message) for w in caught])


def prediction_codes(tensor: LabelTensor, table: Any, *, name: str = "predictions") -> np.ndarray:
    """Class codes per task of ``tensor`` from a ``task, label`` table (-1 where absent).

    Raises:
        ValueError: a predicted label outside the tensor's classes.
    """
    import pyarrow as pa

    if not isinstance(table, pa.Table):
        from ..labels import read_table

        table = read_table(table)
    missing = [c for c in ("task", "label") if c not in table.column_names]
    if missing:
        raise ValueError(f"{name}: missing column(s) {missing}; found {table.column_names}")
    cls = {str(c): i for i, c in enumerate(tensor.classes.tolist())}
    task = {str(t): i for i, t in enumerate(tensor.task_ids.tolist())}
    out = np.full(tensor.n_tasks, -1, dtype=np.int32)
    for row, (t, lab) in enumerate(zip(table.column("task").to_pylist(),
                                       table.column("label").to_pylist())):
        k = task.get(str(t))
        if k is None or lab is None:
            continue
        code = cls.get(str(lab))
        if code is None:
            raise ValueError(f"{name}: row {row + 1}: label {lab!r} is not one of the classes "
                             f"{tensor.classes.tolist()}")
        out[k] = code
    return out


@dataclasses.dataclass
class Evaluation:
    """The result of :func:`evaluate` (plain Python values, ready for tables and JSON)."""

    classes: list[str]
    gold_tasks: int
    rows: list[dict[str, Any]]
    summaries: dict[str, dict[str, Any]]
    best_annotator: str | None
    reference: str | None
    agreement: dict[str, Any]
    groups: list[dict[str, Any]]
    group_column: str | None
    codes: dict[str, np.ndarray]
    notes: list[str]

    def table(self, *, per_class: bool = True, max_annotators: int | None = None) -> list[dict[str, Any]]:
        """Rows for printing: the top ``max_annotators`` annotators (all when None), then the rest."""
        out = []
        shown = 0
        for r in self.rows:
            if r["kind"] == "annotator":
                keep = (max_annotators is None or shown < max_annotators
                        or r["system"] in (self.best_annotator, self.reference))
                if not keep:
                    continue
                shown += 1
            row = {k: v for k, v in r.items() if per_class or not k.startswith(("P_", "R_", "F1_"))}
            out.append(row)
        return out

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("codes")
        return d


def _mark(flag: bool | None) -> str:
    return "" if flag is None else ("yes" if flag else "no")


def evaluate(
    tensor: LabelTensor,
    *,
    methods: Sequence[str] = (),
    predictions: Mapping[str, np.ndarray] | None = None,
    reference: str | None = None,
    groups: np.ndarray | None = None,
    group_column: str | None = None,
    min_coverage: float = 0.5,
    params: Mapping[str, Mapping[str, Any]] | None = None,
    seed: int = 0,
    annotators: bool = True,
    kappa_workers: int = 30,
) -> Evaluation:
    """Score annotators, aggregation methods and predictions on the tensor's gold tasks.

    Args:
        tensor: answers with gold attached (:meth:`LabelTensor.with_gold`).
        methods: registered aggregation methods to run (failures become rows with ``error``).
        predictions: extra systems, name -> class codes per task (-1 = no prediction).
        reference: an annotator id to compare every aggregated result with.
        groups: a value per task (e.g. its domain) for the per-group breakdown.
        group_column: the name of that column (for headings).
        min_coverage: the share of gold tasks an annotator must have answered to count as the
            best single annotator.
        params: per-method constructor parameters, ``{method: {param: value}}``.
        seed: passed to every method.
        annotators: whether to add a row per annotator.
        kappa_workers: pairwise kappa for at most this many annotators (those with most answers).
    """
    if not tensor.has_gold:
        raise ValueError("no gold labels on the answers' tasks: nothing to evaluate against")
    gold = tensor.gold
    mask = gold >= 0
    n_gold = int(mask.sum())
    classes = [str(c) for c in tensor.classes.tolist()]
    notes: list[str] = []
    if n_gold < tensor.n_tasks:
        notes.append(f"gold covers {n_gold} of {tensor.n_tasks} tasks: every figure is on those "
                     f"{n_gold} tasks")
    if reference is not None and str(reference) not in {str(w) for w in tensor.worker_ids.tolist()}:
        raise ValueError(f"reference annotator {reference!r} is not among the annotators "
                         f"({len(tensor.worker_ids)} of them)")

    dense = agreement.first_answers(tensor)
    codes: dict[str, np.ndarray] = {}
    kinds: dict[str, str] = {}
    extra: dict[str, dict[str, Any]] = {}
    if annotators:
        for j, w in enumerate(tensor.worker_ids.tolist()):
            codes[str(w)] = dense[:, j]
            kinds[str(w)] = "annotator"
    for m in methods:
        out = run_method(tensor, m, (params or {}).get(m), seed=seed)
        name = m if m not in codes else f"{m} (method)"
        kinds[name] = "method"
        extra[name] = {"error": out.error, "seconds": round(out.seconds, 3)}
        if out.codes is not None:
            codes[name] = out.codes
    for name, c in (predictions or {}).items():
        kinds[name] = "prediction"
        codes[name] = np.asarray(c, dtype=np.int32)

    def summary(c: np.ndarray, where: np.ndarray = mask) -> dict[str, Any]:
        return classification_summary(np.where(where, gold, -1), c, classes)

    summaries = {name: summary(c) for name, c in codes.items()}
    crowd = classification_summary(gold[tensor.task][mask[tensor.task]],
                                   tensor.label[mask[tensor.task]], classes)
    summaries[CROWD_ROW] = crowd

    covered = {name: (c >= 0) & mask for name, c in codes.items()}
    best = None
    eligible = [n for n, k in kinds.items() if k == "annotator"
                and summaries[n]["n"] >= max(1, min_coverage * n_gold)]
    if eligible:
        best = max(eligible, key=lambda n: (summaries[n]["accuracy"], summaries[n]["n"]))
    elif annotators:
        notes.append(f"no annotator answered {min_coverage:.0%} of the gold tasks: no best single "
                     f"annotator (lower --min-coverage to name one)")

    def beats(name: str, other: str | None) -> bool | None:
        if other is None or name not in codes or kinds[name] == "annotator":
            return None
        where = covered[other]
        if not where.any():
            return None
        own = float((codes[name][where] == gold[where]).mean())
        return own > float((codes[other][where] == gold[where]).mean())

    rows: list[dict[str, Any]] = []

    def make_row(name: str, kind: str, s: dict[str, Any]) -> dict[str, Any]:
        scored = s["n"] > 0  # an annotator with no gold task answered has no figures, not zeros
        row: dict[str, Any] = {"system": name, "kind": kind, "n": s["n"],
                               "coverage": s["n"] / n_gold if n_gold else 0.0,
                               "accuracy": s["accuracy"] if scored else None,
                               "macro_f1": s["macro_f1"] if scored else None,
                               "weighted_f1": s["weighted_f1"] if scored else None}
        for c in classes:
            row[f"P_{c}"] = s["precision"][c] if scored else None
            row[f"R_{c}"] = s["recall"][c] if scored else None
            row[f"F1_{c}"] = s["f1"][c] if scored else None
        return row

    # most-covering annotators first (for a full panel: all equal), then the most accurate
    ann = sorted((n for n, k in kinds.items() if k == "annotator"),
                 key=lambda n: (-summaries[n]["n"], -summaries[n]["accuracy"], n))
    for n in ann:
        r = make_row(n, "annotator", summaries[n])
        r["note"] = " ".join(x for x in ("best" if n == best else "",
                                         "reference" if n == reference else "") if x)
        rows.append(r)
    rows.append({**make_row(CROWD_ROW, "crowd", crowd), "coverage": None,
                 "note": f"{crowd['n']} single answers pooled"})
    for n, k in kinds.items():
        if k == "annotator":
            continue
        if n not in codes:
            r = {"system": n, "kind": k, "n": 0, "coverage": 0.0, "accuracy": None,
                 "macro_f1": None, "weighted_f1": None}
        else:
            r = make_row(n, k, summaries[n])
        r["beats_best"] = _mark(beats(n, best))
        r["beats_reference"] = _mark(beats(n, reference)) if reference is not None else ""
        r.update(extra.get(n, {}))
        r.setdefault("note", "")
        rows.append(r)

    # agreement among annotators, on gold tasks
    counts = agreement.label_counts(tensor, mask)
    by_answers = np.bincount(tensor.worker, minlength=tensor.n_workers)
    top = np.argsort(-by_answers, kind="stable")[:kappa_workers]
    kworkers = [tensor.worker_ids[i] for i in sorted(top)]
    pairs = agreement.pairwise_kappa(tensor, tasks=mask, workers=kworkers)
    if tensor.n_workers > kappa_workers:
        notes.append(f"pairwise kappa for the {kappa_workers} annotators with most answers "
                     f"(of {tensor.n_workers})")
    agree = {
        "tasks": n_gold,
        "fleiss_kappa": agreement.fleiss_kappa(counts),
        "krippendorff_alpha": agreement.krippendorff_alpha(counts, "nominal"),
        "kappa_workers": [str(w) for w in kworkers],
        "pairs": pairs,
    }
    defined = [p["kappa"] for p in pairs if p["kappa"] is not None]
    agree["mean_pairwise_kappa"] = float(np.mean(defined)) if defined else None

    group_rows: list[dict[str, Any]] = []
    if groups is not None:
        g = np.asarray(groups, dtype=object)
        if g.shape != (tensor.n_tasks,):
            raise ValueError(f"groups must have one value per task ({tensor.n_tasks}), got {g.shape}")
        labels = np.array(["(none)" if v is None else str(v) for v in g], dtype=object)
        for value in sorted(set(labels[mask].tolist())):
            in_g = mask & (labels == value)
            crowd_g = in_g[tensor.task]
            gsys: list[tuple[str, str, np.ndarray | None]] = [
                (n, kinds[n], codes[n]) for n in codes]
            for name, kind, c in gsys:
                where = in_g & (c >= 0)
                group_rows.append({"group": value, "system": name, "kind": kind,
                                   "n": int(where.sum()),
                                   "accuracy": float((c[where] == gold[where]).mean())
                                   if where.any() else None})
            group_rows.append({"group": value, "system": CROWD_ROW, "kind": "crowd",
                               "n": int(crowd_g.sum()),
                               "accuracy": float((tensor.label[crowd_g] == gold[tensor.task[crowd_g]])
                                                 .mean()) if crowd_g.any() else None})
    return Evaluation(classes=classes, gold_tasks=n_gold, rows=rows, summaries=summaries,
                      best_annotator=best, reference=reference, agreement=agree,
                      groups=group_rows, group_column=group_column, codes=codes, notes=notes)


def group_table(ev: Evaluation, systems: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """The per-group breakdown as one row per group, one accuracy column per system.

    Default systems: the best single annotator, the reference, the pooled crowd answers and every
    method and prediction (not every annotator).
    """
    if systems is None:
        systems = [s for s in (ev.best_annotator, ev.reference) if s is not None]
        systems += [CROWD_ROW] + [r["system"] for r in ev.rows
                                  if r["kind"] in ("method", "prediction") and r["system"] in ev.codes]
    systems = list(dict.fromkeys(systems))
    by_group: dict[str, dict[str, Any]] = {}
    for r in ev.groups:
        row = by_group.setdefault(r["group"], {"group": r["group"], "n": 0})
        if r["kind"] == "crowd":
            pass
        elif r["system"] in systems:
            row["n"] = max(row["n"], r["n"])
        if r["system"] in systems:
            row[r["system"]] = r["accuracy"]
    return [{k: row.get(k) for k in ["group", "n", *systems]} for row in by_group.values()]
