"""Hybrid experiments: aggregate subsets of annotators (LLMs only, humans only, both) and compare.

The question "does LLM + human beat either alone?" is one call: name the groups of annotators
(from several answer sources, or by glob patterns over annotator ids), and :func:`subset_table`
aggregates every non-empty union of groups with every method, scoring each on the gold tasks.
A union *beats its parts* when its accuracy is strictly higher than that of every group in it
under the same method.

Example:
    >>> from crowdllm.eval.hybrid import combine, subset_table  # doctest: +SKIP
    >>> tensor, groups = combine({"llm": "runs/panel", "human": "crowd/answers.csv"})
    >>> rows = subset_table(tensor.with_gold("gold.csv"), groups, ["mv", "ds"])
"""

from __future__ import annotations

import fnmatch
import itertools
from typing import Any, Mapping, Sequence

import numpy as np
import pyarrow as pa

from ..labels import CrowdDataError, LabelTensor

__all__ = ["combine", "split_by_patterns", "subset_table"]


def combine(sources: Mapping[str, Any]) -> tuple[LabelTensor, dict[str, list[str]]]:
    """Put the answers of several sources into one tensor; return it and the group of each source.

    Args:
        sources: group name -> answers (a LabelTensor, or a path / run directory / table that
            :func:`crowdllm.eval.run.load_run` or :meth:`LabelTensor.coerce` reads).

    Annotator ids that occur in more than one source are prefixed with ``group:`` so that two
    different people (or a model and a person) never merge. Task ids are matched as strings.
    """
    from .run import load_run

    tensors: dict[str, LabelTensor] = {}
    for name, src in sources.items():
        if isinstance(src, LabelTensor):
            tensors[name] = src
        elif isinstance(src, (str, bytes)) or hasattr(src, "__fspath__"):
            tensors[name] = load_run(src).tensor  # type: ignore[arg-type]
        else:
            tensors[name] = LabelTensor.coerce(src)
    if not tensors:
        raise ValueError("no answer sources given")
    seen: dict[str, int] = {}
    for t in tensors.values():
        for w in {str(x) for x in t.worker_ids.tolist()}:
            seen[w] = seen.get(w, 0) + 1
    parts, groups = [], {}
    for name, t in tensors.items():
        tab = t.to_arrow()
        ids = [str(w) for w in tab.column("worker").to_pylist()]
        ids = [f"{name}:{w}" if seen[w] > 1 else w for w in ids]
        parts.append(pa.table({"task": [str(x) for x in tab.column("task").to_pylist()],
                               "worker": ids,
                               "label": [str(x) for x in tab.column("label").to_pylist()]}))
        groups[name] = list(dict.fromkeys(ids))
    merged = LabelTensor.from_arrow(pa.concat_tables(parts), source="+".join(tensors))
    return merged, groups


def split_by_patterns(tensor: LabelTensor, patterns: Mapping[str, Sequence[str]],
                      rest: str | None = None) -> dict[str, list[str]]:
    """Groups of annotator ids by glob patterns (``{"llm": ["qwen*", "llama*"]}``).

    An annotator goes to the first group whose pattern matches; with ``rest`` given, the
    unmatched ones form that group. A group that matches nobody is an error.
    """
    groups: dict[str, list[str]] = {g: [] for g in patterns}
    left = []
    for w in (str(x) for x in tensor.worker_ids.tolist()):
        for g, pats in patterns.items():
            if any(fnmatch.fnmatchcase(w, p) for p in pats):
                groups[g].append(w)
                break
        else:
            left.append(w)
    empty = [g for g, ws in groups.items() if not ws]
    if empty:
        raise CrowdDataError(f"group(s) {empty} match no annotator")
    if rest is not None and left:
        groups[rest] = left
    return groups


def subset_table(tensor: LabelTensor, groups: Mapping[str, Sequence[str]], methods: Sequence[str],
                 *, params: Mapping[str, Mapping[str, Any]] | None = None, seed: int = 0,
                 unions: bool = True) -> list[dict[str, Any]]:
    """Accuracy on gold of each method on each group and on each union of groups.

    Returns:
        Rows ``subset`` (``a+b``), ``groups`` (how many), ``annotators``, ``method``, ``n`` (the
        gold tasks that every group answered: all rows are scored on these same tasks),
        ``accuracy`` (on those), ``beats_parts`` (``yes``/``no`` for a
        union, empty for one group), ``error``.
    """
    from .evaluate import run_method

    if not tensor.has_gold:
        raise ValueError("hybrid comparison needs gold labels")
    names = list(groups)
    combos = [c for k in range(1, (len(names) if unions else 1) + 1)
              for c in itertools.combinations(names, k)]
    rows: list[dict[str, Any]] = []
    acc_of: dict[tuple[tuple[str, ...], str], float | None] = {}
    gold = tensor.gold
    # every row is scored on the same tasks: gold tasks that every group answered
    answered = gold >= 0
    for g in names:
        sub = tensor.select_workers(list(groups[g]))
        answered = answered & (np.bincount(sub.task, minlength=tensor.n_tasks) > 0)
    if not answered.any():
        raise ValueError("no gold task was answered by every group")
    for combo in combos:
        workers = [w for g in combo for w in groups[g]]
        sub = tensor.select_workers(workers)
        for m in methods:
            out = run_method(sub, m, (params or {}).get(m), seed=seed)
            acc = (float((out.codes[answered] == gold[answered]).mean())
                   if out.codes is not None and answered.any() else None)
            acc_of[(combo, m)] = acc
            beats = ""
            if len(combo) > 1 and acc is not None:
                parts = [acc_of.get(((g,), m)) for g in combo]
                beats = ("yes" if all(p is not None and acc > p for p in parts) else "no")
            rows.append({"subset": "+".join(combo), "groups": len(combo),
                         "annotators": len(workers), "method": m, "n": int(answered.sum()),
                         "accuracy": acc, "beats_parts": beats, "error": out.error})
    return rows
