"""The annotation runner: every annotator of a panel labels every item, resumably.

``annotate(items, panel, run_dir)`` does, for each annotator:

1. start its backend (which says whether the labels must be asked as short codes, because two
   labels share a first token for its tokenizer), fix the prompt version;
2. skip every item that the ledger already answers for ``(item, annotator, prompt version)``;
3. ask the others, ``max_in_flight`` at a time; an answer that does not parse as a label is
   asked again with a new seed and a stricter reminder (a doubled token budget when it was cut
   off), at most ``retries`` times, after which the annotator abstains on that item; every
   attempt's tokens count;
4. append each final answer to the ledger as it arrives.

Requests that fail for transient reasons even after the backend's own retries leave the item
unanswered (not in the ledger), so a re-run asks it again; if earlier attempts at that item had
already been answered (and billed), their tokens go to ``spent.jsonl`` so that none is lost. At
the end the run directory gets ``answers.parquet`` (``task, worker, label``, abstentions omitted;
human answers joined), ``probs.parquet`` (``task, worker, p_<label>...``), ``items.parquet`` and
``run.json``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import pyarrow as pa

from ..labels import CrowdDataError, read_table, write_table
from .backends.base import BackendError, Completion, Request, TransientError, label_probs
from .ledger import SPENT_FIELDS, Ledger
from .panel import AnnotatorSpec, Panel
from .schema import (LabelSchema, answer_choices, build_messages, parse_answer, prompt_version,
                     reminder_message)

__all__ = ["Item", "read_items", "annotate", "annotate_async", "export_run", "AnnotatorStats",
           "read_humans", "plan", "load_run"]


@dataclasses.dataclass(frozen=True)
class Item:
    task: str
    text: str
    domain: str | None = None


def read_items(path: str | os.PathLike[str]) -> list[Item]:
    """Items from a CSV/Parquet/JSONL file with ``task`` and ``text`` (and optional ``domain``).

    Task ids are kept as strings. Raises :class:`CrowdDataError` naming the file, row and
    column for a missing column, an empty value or a repeated task id.
    """
    table = read_table(path)
    missing = [c for c in ("task", "text") if c not in table.column_names]
    if missing:
        raise CrowdDataError(f"{path}: missing column(s) {missing}; found {table.column_names}")
    tasks = table.column("task").to_pylist()
    texts = table.column("text").to_pylist()
    domains = (table.column("domain").to_pylist() if "domain" in table.column_names
               else [None] * len(tasks))
    seen: dict[str, int] = {}
    out = []
    for i, (t, x, d) in enumerate(zip(tasks, texts, domains)):
        if t is None or str(t).strip() == "":
            raise CrowdDataError(f"{path}: row {i + 1}, column 'task': empty value")
        if x is None or not isinstance(x, str) or x.strip() == "":
            raise CrowdDataError(f"{path}: row {i + 1}, column 'text': empty value")
        t = str(t)
        if t in seen:
            raise CrowdDataError(f"{path}: row {i + 1}, column 'task': task {t!r} repeats row {seen[t] + 1}")
        seen[t] = i
        out.append(Item(t, x, None if d is None else str(d)))
    if not out:
        raise CrowdDataError(f"{path}: no items")
    return out


def read_humans(path: str | os.PathLike[str], schema: LabelSchema,
                annotator_names: Sequence[str]) -> pa.Table:
    """Human ``task, worker, label`` answers, checked against the schema (as strings)."""
    table = read_table(path)
    missing = [c for c in ("task", "worker", "label") if c not in table.column_names]
    if missing:
        raise CrowdDataError(f"{path}: missing column(s) {missing}; found {table.column_names}")
    names = set(schema.label_names)
    clash = set(annotator_names)
    cols: dict[str, list[str]] = {"task": [], "worker": [], "label": []}
    for i, row in enumerate(table.select(["task", "worker", "label"]).to_pylist()):
        for c in ("task", "worker", "label"):
            if row[c] is None or str(row[c]).strip() == "":
                raise CrowdDataError(f"{path}: row {i + 1}, column {c!r}: empty value")
        lab = str(row["label"])
        if lab not in names:
            raise CrowdDataError(f"{path}: row {i + 1}, column 'label': {lab!r} is not in the "
                                 f"schema {sorted(names)}")
        if str(row["worker"]) in clash:
            raise CrowdDataError(f"{path}: row {i + 1}, column 'worker': {row['worker']!r} is also "
                                 "the name of an LLM annotator of the panel")
        for c in cols:
            cols[c].append(str(row[c]))
    return pa.table(cols)


# --------------------------------------------------------------------------------------------
# Progress and statistics
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class AnnotatorStats:
    name: str
    todo: int = 0
    skipped: int = 0
    done: int = 0
    answered: int = 0
    abstained: int = 0
    failed: int = 0
    reasks: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    started: float | None = None
    finished: float | None = None
    error: str | None = None
    prompt_version: str | None = None
    codes: bool = False
    cached_prompt_tokens: int = 0
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)

    @property
    def wall_s(self) -> float:
        if self.started is None:
            return 0.0
        return (self.finished or time.perf_counter()) - self.started

    def row(self) -> dict[str, Any]:
        w = self.wall_s
        toks = self.prompt_tokens + self.completion_tokens
        return {"annotator": self.name, "asked": self.todo, "skipped": self.skipped,
                "answered": self.answered, "abstained": self.abstained, "failed": self.failed,
                "re-asks": self.reasks, "prompt_tok": self.prompt_tokens,
                "completion_tok": self.completion_tokens, "wall_s": w,
                "items_per_s": (self.done / w) if w > 0 else 0.0,
                "tokens_per_s": (toks / w) if w > 0 else 0.0}


class Progress:
    """One status line per annotator on stderr: redrawn in place on a terminal, else periodic."""

    def __init__(self, stats: list[AnnotatorStats], enabled: bool = True,
                 stream: Any = None, interval: float | None = None):
        self.stats = stats
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.interval = interval or (0.5 if self.tty else 10.0)
        self._drawn = 0

    def line(self, s: AnnotatorStats) -> str:
        total = s.todo
        frac = s.done / total if total else 1.0
        bar = "#" * int(frac * 20)
        w = s.wall_s
        rate = s.done / w if w > 0 else 0.0
        toks = s.prompt_tokens + s.completion_tokens
        state = "error" if s.error else ("done" if s.finished else ("..." if s.started else "wait"))
        return (f"{s.name[:20]:<20} [{bar:<20}] {s.done}/{total} items  {toks} tok  "
                f"{s.reasks} re-asks  {s.abstained} abst  {rate:.2f} it/s  {state}")

    def draw(self, final: bool = False) -> None:
        if not self.enabled:
            return
        lines = [self.line(s) for s in self.stats]
        if self.tty:
            if self._drawn:
                self.stream.write(f"\x1b[{self._drawn}F")
            self.stream.write("".join(f"\x1b[2K{ln}\n" for ln in lines))
            self._drawn = len(lines)
        else:
            self.stream.write("".join(ln + "\n" for ln in lines))
        self.stream.flush()

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            self.draw()


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


def _versions(spec: AnnotatorSpec, schema: LabelSchema) -> dict[bool, str]:
    return {codes: prompt_version(schema, codes=codes, system_extra=spec.system_extra)
            for codes in (False, True)}


def plan(items: Sequence[Item], panel: Panel, run_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """What a run would ask, without calling anything: per annotator, the items still missing
    from the ledger and the prompt of the first one (label names assumed; a tokenizer that
    cannot tell the labels apart by their first token switches to short codes at start-up)."""
    done = Ledger(Path(run_dir) / "ledger.jsonl").done_keys()
    out = []
    for spec in panel.annotators:
        vers = _versions(spec, panel.schema)
        todo = [it for it in items
                if not any((it.task, spec.name, v) in done for v in vers.values())]
        first = todo[0] if todo else (items[0] if items else None)
        out.append({"annotator": spec.name, "backend": spec.backend, "model": spec.model,
                    "prompt_version": vers[False], "requests": len(todo),
                    "max_requests": len(todo) * (1 + spec.retries),
                    "example_messages": build_messages(panel.schema, first.text,
                                                       system_extra=spec.system_extra)
                    if first else []})
    return out


def _token_fields(attempt_tokens: list[list[int]]) -> dict[str, Any]:
    """The token fields of a ledger or spent record from each attempt's [prompt, completion]."""
    return {"prompt_tokens": sum(a for a, _ in attempt_tokens),
            "completion_tokens": sum(b for _, b in attempt_tokens),
            "attempts": len(attempt_tokens), "attempt_tokens": attempt_tokens}


async def _ask_item(item: Item, spec: AnnotatorSpec, backend: Any, schema: LabelSchema,
                    codes: bool, version: str, ledger: Ledger, stats: AnnotatorStats) -> None:
    choices = answer_choices(schema, codes)
    base = build_messages(schema, item.text, codes=codes, system_extra=spec.system_extra)
    messages = base
    max_tokens = spec.max_tokens
    attempt_tokens: list[list[int]] = []
    latency = 0.0
    label = None
    comp: Completion | None = None
    for attempt in range(spec.retries + 1):
        req = Request(messages=messages, choices=choices, max_tokens=max_tokens,
                      temperature=spec.temperature,
                      seed=spec.seed + 1_000_003 * attempt,
                      logprobs=spec.logprobs)
        try:
            comp = await backend.complete(req)
        except (TransientError, BackendError) as exc:
            if attempt_tokens:  # earlier attempts were answered and billed: keep their tokens
                Ledger(ledger.path.parent / "spent.jsonl", fields=SPENT_FIELDS).append({
                    "task": item.task, "model": spec.name, "prompt_version": version,
                    **_token_fields(attempt_tokens), "latency_s": round(latency, 4),
                    "error": str(exc), "backend": spec.backend,
                    "endpoint_model": comp.endpoint_model if comp is not None else None})
            if isinstance(exc, BackendError):
                raise
            stats.failed += 1
            stats.done += 1
            stats.error = stats.error or str(exc)
            return  # not final: a re-run asks again
        attempt_tokens.append([comp.prompt_tokens, comp.completion_tokens])
        stats.prompt_tokens += comp.prompt_tokens
        stats.completion_tokens += comp.completion_tokens
        latency += comp.latency_s
        label = parse_answer(comp.text, schema, codes=codes)
        if label is not None:
            break
        if attempt < spec.retries:
            stats.reasks += 1
            truncated = comp.finish_reason == "length"
            if truncated:
                max_tokens *= 2
            messages = base + reminder_message(schema, comp.text, codes=codes, truncated=truncated)
    assert comp is not None
    probs = None
    if label is not None:
        p = label_probs(comp.first_logprobs, choices)
        if p is not None:
            probs = {name: float(v) for name, v in zip(schema.label_names, p)}
    record = {
        "task": item.task, "model": spec.name, "prompt_version": version, "raw": comp.text,
        "label": label, "abstained": label is None, "probs": probs,
        **_token_fields(attempt_tokens), "latency_s": round(latency, 4), "finish_reason": comp.finish_reason,
        "backend": spec.backend, "endpoint_model": comp.endpoint_model,
    }
    ledger.append(record)
    stats.done += 1
    if label is None:
        stats.abstained += 1
    else:
        stats.answered += 1


async def _run_annotator(spec: AnnotatorSpec, items: Sequence[Item], panel: Panel,
                         ledger: Ledger, stats: AnnotatorStats, run_dir: Path,
                         done: set[tuple[str, str, str]], backend_factory: Callable[..., Any] | None,
                         lock: asyncio.Lock | None) -> None:
    vers = _versions(spec, panel.schema)
    pending = [it for it in items if not any((it.task, spec.name, v) in done for v in vers.values())]
    if not pending:
        # fully answered already: the version in the ledger is the one that counts
        for codes, v in vers.items():
            if any((it.task, spec.name, v) in done for it in items):
                stats.prompt_version, stats.codes = v, codes
                break
        stats.skipped = len(items)
        stats.started = stats.finished = time.perf_counter()
        return
    if lock is not None:
        await lock.acquire()  # offline engines: one model in memory at a time
    backend = (backend_factory or AnnotatorSpec.build_backend)(spec, run_dir / "logs")
    try:
        stats.started = time.perf_counter()
        codes = await backend.start({False: panel.schema.label_names,
                                     True: answer_choices(panel.schema, True)})
        version = vers[codes]
        stats.prompt_version, stats.codes = version, codes
        todo = [it for it in items if (it.task, spec.name, version) not in done]
        stats.todo = len(todo)
        stats.skipped = len(items) - len(todo)
        stats.started = time.perf_counter()  # throughput counts from the first request
        queue: asyncio.Queue[Item] = asyncio.Queue()
        for it in todo:
            queue.put_nowait(it)

        async def worker() -> None:
            while True:
                try:
                    it = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                await _ask_item(it, spec, backend, panel.schema, codes, version, ledger, stats)

        n = max(1, min(int(getattr(backend, "max_in_flight", 8)), len(todo)))
        await asyncio.gather(*(worker() for _ in range(n)))
        stats.finished = time.perf_counter()
    except BackendError as exc:
        stats.error = str(exc)
        stats.finished = time.perf_counter()
    finally:
        try:
            await backend.close()
        finally:
            stats.metrics = dict(getattr(backend, "metrics", {}) or {})
            if lock is not None:
                lock.release()


def _write_run_json(run_dir: Path, panel: Panel, items_path: str | None,
                    stats: list[AnnotatorStats] | None, extra: dict[str, Any]) -> None:
    path = run_dir / "run.json"
    old: dict[str, Any] = {}
    if path.exists():
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
        except ValueError:
            old = {}
    versions = dict(old.get("prompt_versions", {}))
    codes = dict(old.get("codes", {}))
    for s in stats or []:
        if s.prompt_version:
            versions[s.name] = s.prompt_version
            codes[s.name] = s.codes
    doc = {"items": items_path, "panel": panel.public_dict(), "schema": panel.schema.to_dict(),
           "labels": panel.schema.label_names, "prompt_versions": versions, "codes": codes,
           **{k: v for k, v in old.items() if k not in ("items", "panel", "schema", "labels",
                                                       "prompt_versions", "codes")},
           **extra}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=2, default=str), encoding="utf-8")
    os.replace(tmp, path)


async def annotate_async(items: Sequence[Item], panel: Panel, run_dir: str | os.PathLike[str], *,
                         items_path: str | None = None, humans: str | None = None,
                         progress: bool = True, progress_stream: Any = None,
                         backend_factory: Callable[..., Any] | None = None) -> list[AnnotatorStats]:
    """Run the panel over ``items`` into ``run_dir`` (see the module docstring)."""
    rd = Path(run_dir)
    rd.mkdir(parents=True, exist_ok=True)
    ledger = Ledger(rd / "ledger.jsonl")
    items_table = pa.table({"task": [it.task for it in items], "text": [it.text for it in items],
                            **({"domain": [it.domain for it in items]}
                               if any(it.domain is not None for it in items) else {})})
    write_table(items_table, rd / "items.parquet")
    if humans is not None:
        write_table(read_humans(humans, panel.schema, [a.name for a in panel.annotators]),
                    rd / "humans.parquet")
    _write_run_json(rd, panel, items_path, None, {})
    done = ledger.done_keys()
    stats = [AnnotatorStats(a.name) for a in panel.annotators]
    bar = Progress(stats, enabled=progress, stream=progress_stream)
    ticker = asyncio.create_task(bar.run()) if progress else None
    offline_lock = asyncio.Lock()
    before = await asyncio.to_thread(_server_counters, panel)
    t0 = time.perf_counter()
    try:
        await asyncio.gather(*(
            _run_annotator(spec, items, panel, ledger, st, rd, done, backend_factory,
                           offline_lock if spec.backend == "vllm" else None)
            for spec, st in zip(panel.annotators, stats)))
    finally:
        if ticker is not None:
            ticker.cancel()
        bar.draw(final=True)
    wall = time.perf_counter() - t0
    after = await asyncio.to_thread(_server_counters, panel)
    run_extra = {"last_run": {"wall_s": wall, "stats": [s.row() for s in stats],
                              "errors": {s.name: s.error for s in stats if s.error},
                              "server_counters": _delta(before, after),
                              "engine_metrics": {s.name: s.metrics for s in stats if s.metrics}}}
    _write_run_json(rd, panel, items_path, stats, run_extra)
    export_run(rd)
    return stats


def annotate(items: Sequence[Item], panel: Panel, run_dir: str | os.PathLike[str],
             **kwargs: Any) -> list[AnnotatorStats]:
    """Synchronous wrapper of :func:`annotate_async`."""
    return asyncio.run(annotate_async(items, panel, run_dir, **kwargs))


# --------------------------------------------------------------------------------------------
# vLLM server counters (prefix cache, tokens) for the summary
# --------------------------------------------------------------------------------------------

_COUNTERS = ("vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total",
             "vllm:prompt_tokens_total", "vllm:generation_tokens_total",
             "vllm:request_success_total")


def scrape_counters(root: str, timeout: float = 5.0) -> dict[str, float] | None:
    """Sum the vLLM Prometheus counters at ``root``/metrics (None if there is no such page)."""
    import urllib.request

    try:
        with urllib.request.urlopen(root.rstrip("/") + "/metrics", timeout=timeout) as resp:  # noqa: S310
            text = resp.read().decode("utf-8", "replace")
    except (OSError, ValueError):
        return None
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in _COUNTERS:
            try:
                out[name] = out.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
            except (IndexError, ValueError):
                continue
    return out or None


def _server_counters(panel: Panel) -> dict[str, dict[str, float]]:
    roots = sorted({(u[:-3] if u.rstrip("/").endswith("/v1") else u).rstrip("/")
                    for a in panel.annotators if a.backend == "openai" for u in a.base_url})
    out = {}
    for r in roots:
        c = scrape_counters(r.rstrip("/").removesuffix("/v1"))
        if c:
            out[r] = c
    return out


def _delta(before: dict[str, dict[str, float]], after: dict[str, dict[str, float]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for root, a in after.items():
        b = before.get(root, {})
        d = {k: v - b.get(k, 0.0) for k, v in a.items()}
        q = d.get("vllm:prefix_cache_queries_total", 0.0)
        if q > 0:
            d["prefix_cache_hit_rate"] = d.get("vllm:prefix_cache_hits_total", 0.0) / q
        out[root] = d
    return out


# --------------------------------------------------------------------------------------------
# Export: ledger -> answers.parquet / probs.parquet
# --------------------------------------------------------------------------------------------


def export_run(run_dir: str | os.PathLike[str]) -> dict[str, int]:
    """Write ``answers.parquet`` and ``probs.parquet`` from the ledger (atomically).

    Only records of the run's items and of each annotator's current prompt version count
    (older versions stay in the ledger for cost accounting). Human answers from
    ``humans.parquet`` are appended to ``answers.parquet``.
    """
    rd = Path(run_dir)
    meta = json.loads((rd / "run.json").read_text(encoding="utf-8"))
    labels: list[str] = meta["labels"]
    versions: dict[str, str] = meta.get("prompt_versions", {})
    order = [a["name"] for a in meta["panel"]["annotators"]]
    item_tasks = read_table(rd / "items.parquet").column("task").to_pylist()
    pos = {t: i for i, t in enumerate(item_tasks)}
    rank = {n: i for i, n in enumerate(order)}
    recs = [r for r in Ledger(rd / "ledger.jsonl").records()
            if r["model"] in versions and r["prompt_version"] == versions[r["model"]]
            and str(r["task"]) in pos]
    recs.sort(key=lambda r: (pos[str(r["task"])], rank.get(r["model"], len(rank))))
    answered = [r for r in recs if not r["abstained"] and r["label"] is not None]
    cols = {"task": [str(r["task"]) for r in answered], "worker": [r["model"] for r in answered],
            "label": [r["label"] for r in answered]}
    n_humans = 0
    if (rd / "humans.parquet").exists():
        h = read_table(rd / "humans.parquet")
        n_humans = h.num_rows
        for c in cols:
            cols[c] += [str(v) for v in h.column(c).to_pylist()]
    write_table(pa.table({c: pa.array(v, type=pa.string()) for c, v in cols.items()}),
                rd / "answers.parquet")
    with_probs = [r for r in answered if r.get("probs")]
    pcols: dict[str, Any] = {"task": pa.array([str(r["task"]) for r in with_probs], type=pa.string()),
                             "worker": pa.array([r["model"] for r in with_probs], type=pa.string())}
    for lab in labels:
        pcols[f"p_{lab}"] = pa.array([float(r["probs"].get(lab, 0.0)) for r in with_probs],
                                     type=pa.float64())
    write_table(pa.table(pcols), rd / "probs.parquet")
    return {"answers": len(answered), "abstained": len(recs) - len(answered),
            "humans": n_humans, "probs": len(with_probs)}


def load_run(run_dir: str | os.PathLike[str], **kwargs: Any) -> Any:
    """The run's answers as a :class:`~crowdllm.labels.LabelTensor` with per-answer probabilities.

    ``probs`` is ``float32[answers, classes]``: an LLM answer's per-class probabilities from
    ``probs.parquet`` where it has them (renormalised over the tensor's classes), else a point
    mass on its label (humans, and answers without log-probs). Extra keyword arguments go to
    :func:`~crowdllm.labels.read_answers`.
    """
    import dataclasses as _dc

    import numpy as np

    from ..labels import read_answers

    rd = Path(run_dir)
    tensor = read_answers(rd, **kwargs)
    classes = [str(c) for c in tensor.classes.tolist()]
    probs = np.zeros((tensor.n_answers, tensor.n_classes), dtype=np.float32)
    probs[np.arange(tensor.n_answers), tensor.label] = 1.0
    if (rd / "probs.parquet").exists():
        table = read_table(rd / "probs.parquet")
        cols = [f"p_{c}" for c in classes]
        have = [c for c in cols if c in table.column_names]
        lookup = {}
        for row in table.to_pylist():
            vec = np.array([row.get(c) or 0.0 for c in cols], dtype=np.float64)
            if vec.sum() > 0 and np.isfinite(vec).all() and have:
                lookup[(str(row["task"]), str(row["worker"]))] = vec / vec.sum()
        tasks = [str(t) for t in tensor.task_ids.tolist()]
        workers = [str(w) for w in tensor.worker_ids.tolist()]
        for i, (t, w) in enumerate(zip(tensor.task, tensor.worker)):
            vec = lookup.get((tasks[t], workers[w]))
            if vec is not None:
                probs[i] = vec
    return _dc.replace(tensor, probs=probs)
