"""The label tensor: crowd answers as integer codes, plus the vocabularies that map them back.

Every part of crowdllm shares one data structure, :class:`LabelTensor`. It holds the answers in
COO form (three equal-length ``int32`` arrays ``task``, ``worker``, ``label``, one row per
answer), the vocabularies that map the user's task ids, worker ids and label strings to those
codes and back, optional per-answer class probabilities and an optional gold vector. A dense
``[tasks, workers]`` view (``-1`` = no answer) is the fast path for LLM panels, where every
model labels every item.

On disk the answers are long format, ``task, worker, label`` columns (like crowd-kit), in CSV,
Parquet or JSONL. Bad input raises :class:`CrowdDataError` with a message that names the file,
the row and the column.

Example:
    >>> import pyarrow as pa
    >>> t = LabelTensor.from_arrow(pa.table({"task": ["a", "a", "b"], "worker": ["w1", "w2", "w1"],
    ...                                      "label": ["x", "y", "y"]}))
    >>> t.n_tasks, t.n_workers, t.n_classes, t.n_answers
    (2, 2, 2, 3)
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

__all__ = [
    "CrowdDataError",
    "LabelTensor",
    "read_answers",
    "read_gold",
    "read_table",
    "write_table",
]

DuplicatePolicy = Literal["keep", "first", "last", "error"]
DUPLICATE_POLICIES: tuple[str, ...] = ("keep", "first", "last", "error")


class CrowdDataError(ValueError):
    """Bad crowd input: the message names the file, the row and the column at fault."""


# --------------------------------------------------------------------------------------------
# Reading and writing tables
# --------------------------------------------------------------------------------------------

_FORMATS = {".csv": "csv", ".tsv": "tsv", ".parquet": "parquet", ".pq": "parquet",
            ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl"}


def _format_of(path: Path) -> str:
    fmt = _FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise CrowdDataError(
            f"{path}: unknown file type {path.suffix!r}; use one of "
            + ", ".join(sorted(_FORMATS))
        )
    return fmt


def _row_hint(fmt: str, index: int) -> str:
    """Human description of the 0-based data row ``index`` of a file in format ``fmt``."""
    if fmt in ("csv", "tsv"):
        return f"row {index + 1} (line {index + 2})"
    if fmt == "jsonl":
        return f"row {index + 1} (line {index + 1})"
    return f"row {index + 1}"


def read_table(path: str | os.PathLike[str], *, columns: Sequence[str] | None = None) -> pa.Table:
    """Read a CSV / TSV / Parquet / JSONL file into an Arrow table, every CSV column as a string.

    Strings are kept as written (``"007"`` stays ``"007"``), so the ids and labels a user gets
    back are the ones they gave. Parquet and JSONL keep their own types.

    Raises:
        CrowdDataError: the file is missing, unreadable, empty or of an unknown type.
    """
    import pyarrow.csv as pcsv
    import pyarrow.json as pjson
    import pyarrow.parquet as pq

    p = Path(path)
    fmt = _format_of(p)
    if not p.exists():
        raise CrowdDataError(f"{p}: no such file")
    if p.is_dir():
        raise CrowdDataError(f"{p}: is a folder, expected a {fmt} file")
    if p.stat().st_size == 0:
        raise CrowdDataError(f"{p}: the file is empty (no header, no rows)")
    try:
        if fmt in ("csv", "tsv"):
            with open(p, "rb") as fh:
                header = fh.readline().decode("utf-8", "replace")
            delim = "\t" if fmt == "tsv" else ","
            names = [h.strip().strip('"') for h in header.rstrip("\r\n").split(delim)]
            table = pcsv.read_csv(
                p,
                parse_options=pcsv.ParseOptions(delimiter=delim),
                convert_options=pcsv.ConvertOptions(
                    column_types={n: pa.string() for n in names},
                    strings_can_be_null=False,
                    quoted_strings_can_be_null=False,
                ),
            )
        elif fmt == "parquet":
            table = pq.read_table(p, columns=list(columns) if columns else None)
        else:
            table = pjson.read_json(p)
    except CrowdDataError:
        raise
    except (pa.ArrowInvalid, pa.ArrowException, OSError, UnicodeDecodeError) as exc:
        raise CrowdDataError(f"{p}: could not read it as {fmt}: {exc}") from exc
    return table


def write_table(table: pa.Table, path: str | os.PathLike[str]) -> Path:
    """Write ``table`` to ``path`` (format by extension) atomically: temporary file, then rename.

    A crash or a full disk never leaves a half-written output, and never clobbers the previous
    file until the new one is complete.
    """
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    p = Path(path)
    fmt = _format_of(p)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    os.close(fd)
    try:
        if fmt == "parquet":
            # no dictionary for float columns (a result's probabilities): nearly every value is
            # its own, and trying one costs a third of the write (10M tasks: 1.4 s against 0.9)
            pq.write_table(table, tmp, use_dictionary=[
                f.name for f in table.schema if not pa.types.is_floating(f.type)])
        elif fmt in ("csv", "tsv"):
            pcsv.write_csv(table, tmp, write_options=pcsv.WriteOptions(
                delimiter="\t" if fmt == "tsv" else ","))
        else:
            import json

            with open(tmp, "w", encoding="utf-8") as fh:
                for row in table.to_pylist():
                    fh.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.replace(tmp, p)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return p


# --------------------------------------------------------------------------------------------
# Vocabularies
# --------------------------------------------------------------------------------------------


def _sort_key_values(values: list[Any]) -> list[Any]:
    """Sort label values naturally: numerically when every value is a number (or a numeric string)."""
    def as_number(v: Any) -> float | None:
        if isinstance(v, (bool, np.bool_)):
            return float(v)
        if isinstance(v, (int, float, np.integer, np.floating)):
            return float(v)
        try:
            return float(str(v))
        except ValueError:
            return None

    nums = [as_number(v) for v in values]
    if all(n is not None for n in nums):
        order = sorted(range(len(values)), key=lambda i: (nums[i], str(values[i])))
    else:
        order = sorted(range(len(values)), key=lambda i: str(values[i]))
    return [values[i] for i in order]


def _encode_first_seen(col: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """Integer codes in order of first appearance, and the vocabulary (as a numpy array).

    A chunked column is joined into one array first and encoded with one dictionary: encoding
    chunk by chunk and unifying the dictionaries gives every chunk its own copy of the growing
    dictionary (a 100,000,000-answer Parquet file, read in 763 chunks with 33,333,333 task ids,
    went past 20 GiB in 5 minutes that way; joined, 15 s). Strings are joined as large
    strings, whose offsets do not overflow past 2 GiB of text.

    An integer column in runs of equal values (a file written task by task) is encoded by its
    runs: the first value of each run is hashed, not every answer's, and none is when the ids
    are sorted (see :func:`_run_breaks`)."""
    if isinstance(col, pa.ChunkedArray):
        if pa.types.is_string(col.type):
            col = col.cast(pa.large_string())
        elif pa.types.is_binary(col.type):
            col = col.cast(pa.large_binary())
        col = col.combine_chunks() if col.num_chunks else pa.array([], col.type)
    new = _run_breaks(col)
    if new is None:
        enc = pc.dictionary_encode(col)
        codes = enc.indices.to_numpy(zero_copy_only=False).astype(np.int32, copy=False)
        return codes, _vocab_of(enc.dictionary)
    run = np.zeros(len(col), dtype=np.int32)  # each answer's run
    np.cumsum(new, dtype=np.int32, out=run[1:])
    starts = np.concatenate(([0], np.flatnonzero(new) + 1))
    firsts = col.take(pa.array(starts))
    v = firsts.to_numpy(zero_copy_only=False) if pa.types.is_integer(col.type) else None
    if v is not None and bool((v[1:] > v[:-1]).all()):
        return run, v.astype(object)  # sorted ids: each run is a new value, in order
    enc = pc.dictionary_encode(firsts)
    run_codes = enc.indices.to_numpy(zero_copy_only=False).astype(np.int32, copy=False)
    return run_codes[run], _vocab_of(enc.dictionary)


def _run_breaks(col: pa.Array) -> np.ndarray | None:
    """``[n - 1]`` bools, where an integer column's values differ from the one before (the
    first value of a run is a value's first appearance, if it is one, and the codes of the runs'
    first values, over their runs, are the column's codes), or None when the runs would not pay:
    fewer than two values a run on average (a worker column), or not integers. Text ids spend
    their time making the vocabulary's Python strings, which runs do not change (30M answers,
    10M task ids: 5.0-7.2 s either way, and 0.4 GiB more at the peak by runs); a float column
    has -0.0 and 0.0, equal here and distinct to the dictionary."""
    n = len(col)
    if n < 2 or not pa.types.is_integer(col.type):
        return None
    if col.null_count:  # callers reject empty values first; a null here is not a run
        return None
    new = pc.not_equal(col.slice(1), col.slice(0, n - 1)).to_numpy(zero_copy_only=False)
    return None if int(np.count_nonzero(new)) + 1 > n // 2 else new


def _vocab_of(dictionary: pa.Array) -> np.ndarray:
    """An encoding's distinct values as a numpy object array of Python values (ints and text
    converted whole, without a Python list: 10M text ids, 0.62-0.69 s against 0.80-0.99)."""
    t = dictionary.type
    if pa.types.is_integer(t) and not dictionary.null_count:
        return dictionary.to_numpy(zero_copy_only=False).astype(object)  # Python ints
    if (pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_binary(t)
            or pa.types.is_large_binary(t)):
        return dictionary.to_numpy(zero_copy_only=False)  # str / bytes objects
    return np.asarray(dictionary.to_pylist(), dtype=object)


def _repeats(task: np.ndarray, worker: np.ndarray, n_workers: int, last: bool = False
             ) -> np.ndarray:
    """Which answers repeat the (task, worker) pair of an earlier answer (``last``: of a later
    one). Answers grouped by task (as a file written task by task is, once encoded) with at most
    16 a task are compared with their next few neighbours; others are sorted by pair."""
    n = len(task)
    out = np.zeros(n, dtype=bool)
    if n < 2:
        return out
    if bool((task[1:] >= task[:-1]).all()):
        edges = np.flatnonzero(task[1:] != task[:-1])
        longest = int(np.diff(edges, prepend=-1, append=n - 1).max())
        if longest <= 16:  # a repeat lies within its task's run: fewer than `longest` apart
            for k in range(1, longest):
                same = (worker[k:] == worker[:-k]) & (task[k:] == task[:-k])
                if last:
                    out[:-k] |= same
                else:
                    out[k:] |= same
            return out
    pair = task.astype(np.int64) * max(n_workers, 1) + worker
    order = np.argsort(pair, kind="stable")
    sp = pair[order]
    same = sp[1:] == sp[:-1]
    out[order[:-1][same] if last else order[1:][same]] = True
    return out


def _vocab_array(values: Sequence[Any]) -> np.ndarray:
    arr = np.empty(len(values), dtype=object)
    arr[:] = list(values)
    return arr


# --------------------------------------------------------------------------------------------
# The label tensor
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class LabelTensor:
    """Crowd answers as integer codes plus the vocabularies that map them back.

    Attributes:
        task: ``int32[answers]`` task code of each answer.
        worker: ``int32[answers]`` worker (annotator) code of each answer.
        label: ``int32[answers]`` class code of each answer.
        task_ids: ``[tasks]`` the user's task ids, in order of first appearance.
        worker_ids: ``[workers]`` the user's worker ids, in order of first appearance.
        classes: ``[classes]`` the label values, sorted (numerically when they are numbers).
        gold: ``int32[tasks]`` gold class code per task, ``-1`` where there is none; or None.
        probs: ``float32[answers, classes]`` per-answer class probabilities (LLM log-probs), or None.
        n_duplicates: number of answers that repeat an earlier (task, worker) pair.
        source: where the answers came from (a path), for messages.
    """

    task: np.ndarray
    worker: np.ndarray
    label: np.ndarray
    task_ids: np.ndarray
    worker_ids: np.ndarray
    classes: np.ndarray
    gold: np.ndarray | None = None
    probs: np.ndarray | None = None
    n_duplicates: int = 0
    source: str | None = None

    # ----------------------------------------------------------------------------- sizes
    @property
    def n_tasks(self) -> int:
        return int(len(self.task_ids))

    @property
    def n_workers(self) -> int:
        return int(len(self.worker_ids))

    @property
    def n_classes(self) -> int:
        return int(len(self.classes))

    @property
    def n_answers(self) -> int:
        return int(len(self.task))

    @property
    def density(self) -> float:
        """Answers per (task, worker) cell: 1.0 for a full panel."""
        cells = self.n_tasks * self.n_workers
        return float(self.n_answers / cells) if cells else 0.0

    @property
    def has_gold(self) -> bool:
        return self.gold is not None and bool((self.gold >= 0).any())

    def __repr__(self) -> str:
        g = int((self.gold >= 0).sum()) if self.gold is not None else 0
        return (f"LabelTensor(tasks={self.n_tasks}, workers={self.n_workers}, "
                f"classes={self.n_classes}, answers={self.n_answers}, "
                f"duplicates={self.n_duplicates}, gold={g})")

    # ----------------------------------------------------------------------------- builders
    @classmethod
    def from_arrow(
        cls,
        table: pa.Table,
        *,
        task_col: str = "task",
        worker_col: str = "worker",
        label_col: str = "label",
        duplicates: DuplicatePolicy = "keep",
        classes: Sequence[Any] | None = None,
        source: str | None = None,
        _fmt: str = "table",
    ) -> "LabelTensor":
        """Build from an Arrow table in long format (one row per answer).

        Args:
            table: the answers.
            task_col, worker_col, label_col: column names.
            duplicates: what to do with a (task, worker) pair answered more than once:
                ``keep`` (default: every answer counts, the count is reported in
                ``n_duplicates``), ``first`` / ``last`` (keep one), ``error`` (raise).
            classes: the full label set, in order; labels outside it are an error. Default: the
                labels seen, sorted.
            source: a name for messages (the file path).
        """
        where = source or "input table"
        if duplicates not in DUPLICATE_POLICIES:
            raise ValueError(f"duplicates must be one of {DUPLICATE_POLICIES}, got {duplicates!r}")
        missing = [c for c in (task_col, worker_col, label_col) if c not in table.column_names]
        if missing:
            raise CrowdDataError(
                f"{where}: missing column(s) {', '.join(repr(m) for m in missing)}; "
                f"found {table.column_names}. Name the columns with --task-col/--worker-col/"
                f"--label-col (or task_col=..., worker_col=..., label_col=...)."
            )
        if table.num_rows == 0:
            raise CrowdDataError(f"{where}: no answers (the header is there but there are no rows)")
        cols = {}
        for name in (task_col, worker_col, label_col):
            col = table.column(name)
            if pa.types.is_floating(col.type):
                nan = pc.is_nan(col).to_numpy(zero_copy_only=False)
                nan = nan & ~pc.is_null(col).to_numpy(zero_copy_only=False)
                if nan.any():
                    i = int(np.flatnonzero(nan)[0])
                    raise CrowdDataError(f"{where}: {_row_hint(_fmt, i)}, column {name!r}: value is NaN")
            nulls = pc.is_null(col).to_numpy(zero_copy_only=False)
            if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
                nulls = nulls | (pc.utf8_length(pc.utf8_trim_whitespace(col.fill_null("")))
                                 .to_numpy(zero_copy_only=False) == 0)
            if nulls.any():
                i = int(np.flatnonzero(nulls)[0])
                raise CrowdDataError(
                    f"{where}: {_row_hint(_fmt, i)}, column {name!r}: empty value "
                    f"({int(nulls.sum())} row(s) in all have an empty {name!r})"
                )
            cols[name] = col
        task, task_ids = _encode_first_seen(cols[task_col])
        worker, worker_ids = _encode_first_seen(cols[worker_col])
        raw_label, seen = _encode_first_seen(cols[label_col])
        if classes is None:
            vocab = _vocab_array(_sort_key_values(list(seen)))
        else:
            vocab = _vocab_array(list(classes))
        index = {v: i for i, v in enumerate(vocab.tolist())}
        str_index = {str(v): i for i, v in enumerate(vocab.tolist())}
        remap = np.empty(len(seen), dtype=np.int32)
        for j, v in enumerate(seen.tolist()):
            k = index.get(v, str_index.get(str(v)))
            if k is None:
                i = int(np.flatnonzero(raw_label == j)[0])
                raise CrowdDataError(
                    f"{where}: {_row_hint(_fmt, i)}, column {label_col!r}: label {v!r} is not in "
                    f"the schema {vocab.tolist()}"
                )
            remap[j] = k
        label = remap[raw_label] if len(raw_label) else raw_label

        n_dup = 0
        if len(task):
            later = _repeats(task, worker, len(worker_ids))
            n_dup = int(np.count_nonzero(later))
            if n_dup and duplicates == "error":
                first_dup = int(np.flatnonzero(later)[0])
                raise CrowdDataError(
                    f"{where}: {_row_hint(_fmt, first_dup)}: worker "
                    f"{worker_ids[worker[first_dup]]!r} already answered task "
                    f"{task_ids[task[first_dup]]!r} ({n_dup} repeated (task, worker) answers in "
                    f"all; use duplicates='keep', 'first' or 'last')"
                )
            if n_dup and duplicates in ("first", "last"):
                drop = later if duplicates == "first" else _repeats(task, worker, len(worker_ids),
                                                                    last=True)
                task, worker, label = task[~drop], worker[~drop], label[~drop]
        return cls(
            task=np.ascontiguousarray(task, dtype=np.int32),
            worker=np.ascontiguousarray(worker, dtype=np.int32),
            label=np.ascontiguousarray(label, dtype=np.int32),
            task_ids=task_ids,
            worker_ids=worker_ids,
            classes=vocab,
            n_duplicates=n_dup,
            source=source,
        )

    @classmethod
    def from_frame(cls, df: Any, **kwargs: Any) -> "LabelTensor":
        """Build from a pandas DataFrame (same keywords as :meth:`from_arrow`)."""
        try:
            table = pa.Table.from_pandas(df, preserve_index=False)
        except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
            raise CrowdDataError(f"input DataFrame: could not convert to Arrow: {exc}") from exc
        kwargs.setdefault("source", "input DataFrame")
        return cls.from_arrow(table, **kwargs)

    @classmethod
    def from_arrays(
        cls,
        task: Sequence[Any],
        worker: Sequence[Any],
        label: Sequence[Any],
        **kwargs: Any,
    ) -> "LabelTensor":
        """Build from three equal-length sequences of ids and labels."""
        if not (len(task) == len(worker) == len(label)):
            raise CrowdDataError(
                f"task, worker and label must have the same length, got "
                f"{len(task)}, {len(worker)}, {len(label)}"
            )
        table = pa.table({"task": pa.array(list(task)), "worker": pa.array(list(worker)),
                          "label": pa.array(list(label))})
        kwargs.setdefault("source", "input arrays")
        return cls.from_arrow(table, **kwargs)

    @classmethod
    def from_dense(
        cls,
        labels: np.ndarray,
        *,
        classes: Sequence[Any] | None = None,
        task_ids: Sequence[Any] | None = None,
        worker_ids: Sequence[Any] | None = None,
    ) -> "LabelTensor":
        """Build from a dense ``[tasks, workers]`` array of class codes, ``-1`` for no answer."""
        labels = np.asarray(labels)
        if labels.ndim != 2:
            raise CrowdDataError(f"dense labels must be 2-d [tasks, workers], got shape {labels.shape}")
        n_classes = int(labels.max()) + 1 if labels.size and labels.max() >= 0 else 0
        if classes is None:
            classes = list(range(n_classes))
        elif n_classes > len(classes):
            raise CrowdDataError(f"dense labels use class code {n_classes - 1}, but only "
                                 f"{len(classes)} classes were given")
        t, w = np.nonzero(labels >= 0)
        return cls(
            task=t.astype(np.int32), worker=w.astype(np.int32),
            label=labels[t, w].astype(np.int32),
            task_ids=_vocab_array(list(task_ids) if task_ids is not None else list(range(labels.shape[0]))),
            worker_ids=_vocab_array(list(worker_ids) if worker_ids is not None else list(range(labels.shape[1]))),
            classes=_vocab_array(list(classes)),
            source="dense array",
        )

    @classmethod
    def coerce(cls, data: Any, **kwargs: Any) -> "LabelTensor":
        """Turn whatever the user passed (tensor, path, DataFrame, Arrow table) into a LabelTensor."""
        if isinstance(data, LabelTensor):
            return data
        if isinstance(data, (str, os.PathLike)):
            return read_answers(data, **kwargs)
        if isinstance(data, pa.Table):
            return cls.from_arrow(data, **kwargs)
        if type(data).__module__.startswith("pandas"):
            return cls.from_frame(data, **kwargs)
        raise TypeError(
            f"expected a LabelTensor, a path, a pandas DataFrame or an Arrow table, got {type(data).__name__}"
        )

    # ----------------------------------------------------------------------------- views
    def dense(self, dtype: Any = None) -> np.ndarray:
        """The dense ``[tasks, workers]`` view: class code per cell, ``-1`` where no answer.

        ``int8`` when the classes fit (up to 127), else ``int16``. Repeated (task, worker) answers
        cannot be shown in one cell: apply ``duplicates='first'`` or ``'last'`` first.
        """
        if self.n_duplicates and len(self.task) != len(
            np.unique(self.task.astype(np.int64) * max(self.n_workers, 1) + self.worker)
        ):
            raise CrowdDataError(
                f"{self.source or 'answers'}: {self.n_duplicates} repeated (task, worker) answers "
                f"cannot go into the dense view; load with duplicates='first' or 'last'"
            )
        if dtype is None:
            dtype = np.int8 if self.n_classes <= 127 else np.int16
        out = np.full((self.n_tasks, self.n_workers), -1, dtype=dtype)
        out[self.task, self.worker] = self.label
        return out

    @property
    def has_repeats(self) -> bool:
        """Whether some (task, worker) pair has more than one answer in the tensor as it is now."""
        if not self.n_duplicates:
            return False
        pair = self.task.astype(np.int64) * max(self.n_workers, 1) + self.worker
        return len(np.unique(pair)) != len(pair)

    def gold_labels(self) -> np.ndarray:
        """``int32[tasks]`` gold codes, ``-1`` where there is none (all ``-1`` when no gold)."""
        if self.gold is None:
            return np.full(self.n_tasks, -1, dtype=np.int32)
        return self.gold

    # ----------------------------------------------------------------------------- gold
    def with_gold(
        self,
        gold: Any,
        *,
        task_col: str = "task",
        label_col: str = "label",
    ) -> "LabelTensor":
        """Attach gold labels: a path, an Arrow table / DataFrame with ``task, label``, or a mapping.

        A gold label that no annotator gave is allowed (the class is added to the vocabulary, and a
        warning says so); gold for a task that has no answers is ignored, with a warning.
        """
        if isinstance(gold, LabelTensor):
            raise TypeError("gold must be a path, a table or a mapping task -> label")
        source = "gold"
        fmt = "table"
        if isinstance(gold, (str, os.PathLike)):
            source = str(gold)
            fmt = _format_of(Path(gold))
            gold = read_table(gold)
        if isinstance(gold, Mapping):
            gold = pa.table({task_col: pa.array(list(gold.keys())),
                             label_col: pa.array(list(gold.values()))})
        elif type(gold).__module__.startswith("pandas"):
            if hasattr(gold, "to_frame") and not hasattr(gold, "columns"):  # a Series task -> label
                gold = pa.table({task_col: pa.array(list(gold.index)), label_col: pa.array(list(gold.values))})
            else:
                gold = pa.Table.from_pandas(gold, preserve_index=False)
        if not isinstance(gold, pa.Table):
            raise TypeError(f"unsupported gold type {type(gold).__name__}")
        missing = [c for c in (task_col, label_col) if c not in gold.column_names]
        if missing:
            raise CrowdDataError(f"{source}: missing column(s) {missing}; found {gold.column_names}")
        if gold.num_rows == 0:
            raise CrowdDataError(f"{source}: no gold rows")
        tasks = gold.column(task_col).to_pylist()
        labels = gold.column(label_col).to_pylist()
        for i, (t, lab) in enumerate(zip(tasks, labels)):
            for name, v in ((task_col, t), (label_col, lab)):
                if v is None or (isinstance(v, str) and not v.strip()) or (isinstance(v, float) and np.isnan(v)):
                    raise CrowdDataError(f"{source}: {_row_hint(fmt, i)}, column {name!r}: empty value")
        classes = list(self.classes.tolist())
        cls_index = {str(c): i for i, c in enumerate(classes)}
        new_classes = []
        for lab in labels:
            if str(lab) not in cls_index:
                cls_index[str(lab)] = len(classes)
                classes.append(lab)
                new_classes.append(lab)
        if new_classes:
            warnings.warn(
                f"{source}: gold label(s) {sorted(map(str, new_classes))} were given by no annotator; "
                f"added as class(es) nobody chose",
                stacklevel=2,
            )
        task_index = {str(t): i for i, t in enumerate(self.task_ids.tolist())}
        out = np.full(self.n_tasks, -1, dtype=np.int32)
        unknown = 0
        for i, (t, lab) in enumerate(zip(tasks, labels)):
            k = task_index.get(str(t))
            if k is None:
                unknown += 1
                continue
            code = cls_index[str(lab)]
            if out[k] >= 0 and out[k] != code:
                raise CrowdDataError(
                    f"{source}: {_row_hint(fmt, i)}: task {t!r} has two different gold labels "
                    f"({classes[out[k]]!r} and {lab!r})"
                )
            out[k] = code
        if unknown:
            warnings.warn(f"{source}: {unknown} gold row(s) name tasks that have no answers; ignored",
                          stacklevel=2)
        return dataclasses.replace(self, gold=out, classes=_vocab_array(classes))

    # ----------------------------------------------------------------------------- subsets
    def select_workers(self, workers: Sequence[Any]) -> "LabelTensor":
        """Keep only the answers of the named workers (tasks and classes are kept as they are)."""
        wanted = {str(w) for w in workers}
        known = {str(w) for w in self.worker_ids.tolist()}
        unknown = wanted - known
        if unknown:
            raise CrowdDataError(f"unknown worker(s): {sorted(unknown)}")
        keep_w = np.array([str(w) in wanted for w in self.worker_ids.tolist()], dtype=bool)
        new_code = np.cumsum(keep_w) - 1
        mask = keep_w[self.worker]
        return dataclasses.replace(
            self,
            task=self.task[mask], worker=new_code[self.worker[mask]].astype(np.int32),
            label=self.label[mask],
            worker_ids=self.worker_ids[keep_w],
            probs=self.probs[mask] if self.probs is not None else None,
        )

    # ----------------------------------------------------------------------------- output
    def to_arrow(self) -> pa.Table:
        """Back to long format with the user's ids and labels."""
        return pa.table({
            "task": pa.array(self.task_ids[self.task].tolist()),
            "worker": pa.array(self.worker_ids[self.worker].tolist()),
            "label": pa.array(self.classes[self.label].tolist()),
        })


def _parquet_columns(path: Path, wanted: Sequence[str]) -> list[str] | None:
    """For a Parquet file that has every one of ``wanted``: just those (a run's file may hold
    long texts beside them). Otherwise None: the whole file is read, so that a missing column's
    error can list the ones there are."""
    if _format_of(path) != "parquet":
        return None
    import pyarrow.parquet as pq

    try:
        names = pq.read_schema(path).names
    except (pa.ArrowException, OSError):
        return None  # read_table says what is wrong with the file
    return list(dict.fromkeys(wanted)) if all(w in names for w in wanted) else None


def read_answers(
    path: str | os.PathLike[str],
    *,
    task_col: str = "task",
    worker_col: str = "worker",
    label_col: str = "label",
    duplicates: DuplicatePolicy = "keep",
    gold: Any = None,
    classes: Sequence[Any] | None = None,
) -> LabelTensor:
    """Read long-format answers (CSV, TSV, Parquet or JSONL) into a :class:`LabelTensor`.

    ``path`` may also be a folder holding ``answers.{csv,parquet,jsonl}`` (the layout of the
    bundled datasets and of ``crowdllm annotate`` run directories).
    """
    p = Path(path)
    if p.is_dir():
        for name in ("answers.parquet", "answers.csv", "answers.jsonl", "labels.parquet"):
            if (p / name).exists():
                p = p / name
                break
        else:
            raise CrowdDataError(f"{path}: folder has no answers.parquet, answers.csv or answers.jsonl")
    table = read_table(p, columns=_parquet_columns(p, (task_col, worker_col, label_col)))
    tensor = LabelTensor.from_arrow(
        table, task_col=task_col, worker_col=worker_col, label_col=label_col,
        duplicates=duplicates, classes=classes, source=str(p), _fmt=_format_of(p),
    )
    # Arrow's allocator keeps the pages it freed for its own next use: hand them back, or a
    # large file's read stays in the process's memory through the fit (100,000,000 answers:
    # ~3 GiB of the command's peak)
    del table
    pa.default_memory_pool().release_unused()
    if gold is not None:
        tensor = tensor.with_gold(gold)
    return tensor


def read_gold(path: str | os.PathLike[str], *, task_col: str = "task",
              label_col: str = "label") -> dict[Any, Any]:
    """Read a ``task, label`` gold file into a dict (checked for empty values and conflicts)."""
    p = Path(path)
    fmt = _format_of(p)
    table = read_table(p)
    missing = [c for c in (task_col, label_col) if c not in table.column_names]
    if missing:
        raise CrowdDataError(f"{p}: missing column(s) {missing}; found {table.column_names}")
    if table.num_rows == 0:
        raise CrowdDataError(f"{p}: no gold rows")
    out: dict[Any, Any] = {}
    for i, (t, lab) in enumerate(zip(table.column(task_col).to_pylist(),
                                     table.column(label_col).to_pylist())):
        if t is None or lab is None or str(lab).strip() == "" or str(t).strip() == "":
            col = task_col if (t is None or str(t).strip() == "") else label_col
            raise CrowdDataError(f"{p}: {_row_hint(fmt, i)}, column {col!r}: empty value")
        if t in out and out[t] != lab:
            raise CrowdDataError(f"{p}: {_row_hint(fmt, i)}: task {t!r} has two different gold labels")
        out[t] = lab
    return out
