"""Reading what an annotation run (or any answers folder) left on disk, for evaluation and cost.

A run directory written by ``crowdllm annotate`` holds:

* ``ledger.jsonl``: one JSON object per line per (item, model, prompt version) final answer, with
  ``task``, ``model``, ``prompt_version``, ``raw``, ``label`` (or null), ``abstained``, ``probs``,
  ``prompt_tokens`` and ``completion_tokens`` (totals over all attempts), ``attempts``,
  ``attempt_tokens`` (``[prompt, completion]`` per attempt, retries included), ``latency_s``,
  ``finish_reason``, ``backend``, ``endpoint_model``;
* ``answers.parquet`` (``task, worker, label``), optionally ``probs.parquet``;
* ``items.parquet`` (``task, text``, optional ``domain`` or other columns);
* ``run.json`` (panel, schema, prompt version).

Anything else that :func:`crowdllm.labels.read_answers` reads works too (an ``answers.csv``
folder such as the bundled datasets, or a single answers file): it simply has no ledger, so no
cost. Item columns for per-group breakdowns are looked for in ``items.{parquet,csv,jsonl}`` and
``texts.csv``.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from ..labels import CrowdDataError, LabelTensor, read_answers, read_table

__all__ = ["Run", "load_run", "read_ledger", "worker_name", "LEDGER_REQUIRED"]

#: keys every ledger record must have (the rest are optional for cost purposes)
LEDGER_REQUIRED = ("task", "model", "prompt_tokens", "completion_tokens")
_ITEM_FILES = ("items.parquet", "items.csv", "items.jsonl", "texts.csv")


def worker_name(model: str, prompt_version: Any, n_versions: int) -> str:
    """The annotator id of a (model, prompt version): the model alone when only one version ran."""
    if n_versions <= 1 or prompt_version in (None, ""):
        return str(model)
    return f"{model}@{prompt_version}"


def _check_count(path: Path, line: int, key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or value != int(value):
        raise CrowdDataError(f"{path}: line {line}, field {key!r}: expected a non-negative integer, "
                             f"got {value!r}")
    return int(value)


def read_ledger(path: str | Path, unique: bool = True) -> list[dict[str, Any]]:
    """Read and check ``ledger.jsonl``; a repeated (task, model, prompt_version) keeps its first record.

    With ``unique=False`` every record is kept: the reading of ``spent.jsonl`` (tokens of
    attempts that ended without a final answer; one item may have several, from several runs).

    An incomplete last line (no newline, not JSON: the writer died mid-write) is ignored with a
    warning, as :mod:`crowdllm.inference.ledger` does.

    Raises:
        CrowdDataError: a line that is not a JSON object, a missing required field, a token count
            that is not a non-negative integer, or ``attempt_tokens`` that is not a list of pairs.
    """
    p = Path(path)
    if not p.exists():
        raise CrowdDataError(f"{p}: no such file")
    records: dict[tuple[str, str, str], dict[str, Any]] = {}
    repeated = 0
    with open(p, encoding="utf-8") as fh:
        lines = fh.readlines()
    for line_no, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            if line_no == len(lines) and not line.endswith("\n"):
                # a torn last line (the writer died mid-write): not a final answer yet
                warnings.warn(f"{p}: line {line_no}: incomplete last line ignored", stacklevel=2)
                continue
            raise CrowdDataError(f"{p}: line {line_no}: not valid JSON ({exc.msg})") from None
        if not isinstance(rec, dict):
            raise CrowdDataError(f"{p}: line {line_no}: expected a JSON object")
        for key in LEDGER_REQUIRED:
            if rec.get(key) is None:
                raise CrowdDataError(f"{p}: line {line_no}: missing field {key!r}")
        for key in ("prompt_tokens", "completion_tokens"):
            rec[key] = _check_count(p, line_no, key, rec[key])
        rec["attempts"] = _check_count(p, line_no, "attempts", rec.get("attempts", 1))
        at = rec.get("attempt_tokens")
        if at is not None:
            if not isinstance(at, list) or not all(
                    isinstance(x, (list, tuple)) and len(x) == 2 for x in at):
                raise CrowdDataError(f"{p}: line {line_no}, field 'attempt_tokens': expected a "
                                     f"list of [prompt_tokens, completion_tokens] pairs")
            rec["attempt_tokens"] = [[_check_count(p, line_no, "attempt_tokens", a),
                                      _check_count(p, line_no, "attempt_tokens", b)] for a, b in at]
        lat = rec.get("latency_s")
        if lat is not None and (not isinstance(lat, (int, float)) or not np.isfinite(lat) or lat < 0):
            raise CrowdDataError(f"{p}: line {line_no}, field 'latency_s': expected a "
                                 f"non-negative number, got {lat!r}")
        rec["_line"] = line_no
        key = (str(rec["task"]), str(rec["model"]), str(rec.get("prompt_version") or ""))
        if not unique:
            key = key + (line_no,)
        if key in records:
            repeated += 1
            continue
        records[key] = rec
    if repeated:
        warnings.warn(f"{p}: {repeated} repeated (task, model, prompt_version) record(s); the first "
                      f"of each was kept (as the ledger's own reader does)", stacklevel=2)
    return list(records.values())


@dataclasses.dataclass
class Run:
    """What was read from a run directory (or an answers folder / file)."""

    path: Path
    tensor: LabelTensor
    items: pa.Table | None = None
    ledger: list[dict[str, Any]] | None = None
    info: dict[str, Any] = dataclasses.field(default_factory=dict)
    #: ``spent.jsonl``: tokens billed for attempts that ended without a final answer
    spent: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    @property
    def has_ledger(self) -> bool:
        return bool(self.ledger)

    def models_of_workers(self) -> dict[str, tuple[str, str]]:
        """Map each annotator id that came from the ledger to its (model, prompt_version).

        An annotator matches a model when its id is the model name, ``model@prompt_version``,
        or the ``endpoint_model``; annotators that match none (e.g. human workers) are absent.
        Where ``run.json`` names each model's current prompt version (``prompt_versions``), a
        model's annotator id maps to that version.
        """
        if not self.ledger:
            return {}
        current = self.info.get("prompt_versions") if isinstance(self.info, dict) else None
        if isinstance(current, dict) and current:
            keys = {(str(r["model"]), str(r.get("prompt_version") or "")) for r in self.ledger}
            named = {str(m): (str(m), str(v)) for m, v in current.items() if (str(m), str(v)) in keys}
            found = {str(w): named[str(w)] for w in self.tensor.worker_ids.tolist() if str(w) in named}
            if found:
                return found
        versions: dict[str, set[str]] = {}
        for r in self.ledger:
            versions.setdefault(str(r["model"]), set()).add(str(r.get("prompt_version") or ""))
        names: dict[str, tuple[str, str]] = {}
        for r in self.ledger:
            m, v = str(r["model"]), str(r.get("prompt_version") or "")
            for cand in (worker_name(m, v, len(versions[m])), f"{m}@{v}", m,
                         str(r.get("endpoint_model") or m)):
                names.setdefault(cand, (m, v))
        return {str(w): names[str(w)] for w in self.tensor.worker_ids.tolist() if str(w) in names}

    def item_column(self, column: str, extra: list[pa.Table] | None = None) -> np.ndarray:
        """Values of an item column (e.g. ``domain``) per task of the tensor (None where absent).

        Looks in the run's items table, then in ``extra`` tables (e.g. the gold file); the first
        table holding ``task`` and ``column`` wins.
        """
        for table in [t for t in [self.items, *(extra or [])] if t is not None]:
            if column in table.column_names and "task" in table.column_names:
                lookup = {str(t): v for t, v in zip(table.column("task").to_pylist(),
                                                    table.column(column).to_pylist())}
                out = np.empty(self.tensor.n_tasks, dtype=object)
                out[:] = [lookup.get(str(t)) for t in self.tensor.task_ids.tolist()]
                return out
        where = [n for n in _ITEM_FILES if (self.path / n).exists()] if self.path.is_dir() else []
        raise CrowdDataError(f"no item column {column!r} found (looked in "
                             f"{', '.join(where) or 'no items file'}"
                             f"{' and the gold file' if extra else ''}); pass --items FILE")


def _answers_from_ledger(ledger: list[dict[str, Any]], source: str) -> LabelTensor:
    versions: dict[str, set[str]] = {}
    for r in ledger:
        versions.setdefault(str(r["model"]), set()).add(str(r.get("prompt_version") or ""))
    rows = [(str(r["task"]), worker_name(str(r["model"]), str(r.get("prompt_version") or ""),
                                         len(versions[str(r["model"])])), r["label"])
            for r in ledger if r.get("label") is not None and not r.get("abstained")]
    if not rows:
        raise CrowdDataError(f"{source}: the ledger has no answered records")
    t, w, lab = zip(*rows)
    return LabelTensor.from_arrow(pa.table({"task": list(t), "worker": list(w), "label": list(lab)}),
                                  source=source)


def load_run(path: str | Path, *, items: str | Path | None = None) -> Run:
    """Read a run directory, an answers folder or an answers file.

    Args:
        path: the run directory (or any folder / file :func:`read_answers` reads).
        items: an items table to use instead of the folder's own (``task`` plus columns).
    """
    p = Path(path)
    ledger = None
    spent: list[dict[str, Any]] = []
    info: dict[str, Any] = {}
    item_table = None
    if p.is_dir():
        if (p / "ledger.jsonl").exists():
            ledger = read_ledger(p / "ledger.jsonl")
        if (p / "spent.jsonl").exists():
            spent = read_ledger(p / "spent.jsonl", unique=False)
        if (p / "run.json").exists():
            try:
                info = json.loads((p / "run.json").read_text(encoding="utf-8"))
            except json.JSONDecodeError as exc:
                raise CrowdDataError(f"{p / 'run.json'}: not valid JSON ({exc.msg})") from None
        has_answers = any((p / n).exists() for n in ("answers.parquet", "answers.csv",
                                                     "answers.jsonl", "labels.parquet"))
        if has_answers:
            tensor = read_answers(p)
        elif ledger:
            tensor = _answers_from_ledger(ledger, str(p / "ledger.jsonl"))
        else:
            raise CrowdDataError(f"{p}: folder has no answers file and no ledger.jsonl")
        for name in _ITEM_FILES:
            if (p / name).exists():
                item_table = read_table(p / name)
                break
    elif p.exists():
        tensor = read_answers(p)
    else:
        raise CrowdDataError(f"{p}: no such file or folder")
    if items is not None:
        item_table = read_table(items)
        if "task" not in item_table.column_names:
            raise CrowdDataError(f"{items}: missing column 'task'; found {item_table.column_names}")
    return Run(path=p, tensor=tensor, items=item_table, ledger=ledger, info=info, spent=spent)
