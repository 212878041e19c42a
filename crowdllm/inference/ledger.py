"""The append-only ledger: one JSON line per (item, annotator, prompt version) final answer.

``RUN_DIR/ledger.jsonl`` is the run's source of truth. Each record is appended as soon as its
answer is final (after any re-asks), with one ``write(2)`` of one whole line on a file opened
with ``O_APPEND``, under an exclusive ``flock``: a process killed at any point (Ctrl-C, kill -9,
a crashed server) loses nothing already written, and several processes appending to the same
ledger never interleave their lines. Reading tolerates a torn last line (a machine that lost
power mid-write) by ignoring any line that is not complete JSON, and a writer that finds the
file not ending in a newline starts a fresh line first. Records are keyed by
``(task, model, prompt_version)``; the first record of a key wins, so a duplicate appended by
two racing processes is ignored on read.

Record fields (the contract with the evaluation and cost code):
``task, model, prompt_version, raw, label, abstained, probs, prompt_tokens, completion_tokens,
attempts, attempt_tokens, latency_s, finish_reason, backend, endpoint_model``.

``RUN_DIR/spent.jsonl`` (same writer, fields :data:`SPENT_FIELDS`) keeps the tokens of attempts
that ended without a final answer: an item whose re-ask failed for good on transport (or on a
permanent backend error) after earlier attempts had already been answered and billed. The item
stays unanswered (a re-run asks it again); its spent tokens are not lost, so the ledger's token
total plus ``spent.jsonl``'s equals what the servers reported.
"""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path
from typing import Any, Iterator

__all__ = ["Ledger", "LEDGER_FIELDS", "SPENT_FIELDS", "record_key"]

LEDGER_FIELDS = ("task", "model", "prompt_version", "raw", "label", "abstained", "probs",
                 "prompt_tokens", "completion_tokens", "attempts", "attempt_tokens",
                 "latency_s", "finish_reason", "backend", "endpoint_model")

#: fields of a ``spent.jsonl`` record: tokens billed for an item that got no final answer
SPENT_FIELDS = ("task", "model", "prompt_version", "prompt_tokens", "completion_tokens",
                "attempts", "attempt_tokens", "latency_s", "error", "backend", "endpoint_model")


def record_key(rec: dict[str, Any]) -> tuple[str, str, str]:
    """The identity of a record: ``(task, model, prompt_version)``, task as a string."""
    return (str(rec["task"]), str(rec["model"]), str(rec["prompt_version"]))


class Ledger:
    """Append-only JSON-lines ledger at ``path`` (created on first append)."""

    def __init__(self, path: str | os.PathLike[str], fsync: bool = False,
                 fields: tuple[str, ...] = LEDGER_FIELDS):
        self.path = Path(path)
        self.fsync = fsync
        self.fields = fields

    def append(self, record: dict[str, Any]) -> None:
        """Append one record as one line, atomically with respect to other writers."""
        missing = [f for f in self.fields if f not in record]
        if missing:
            raise ValueError(f"ledger record misses field(s) {missing}")
        line = (json.dumps(record, ensure_ascii=False, allow_nan=False) + "\n").encode("utf-8")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                size = os.fstat(fd).st_size
                if size:
                    with open(self.path, "rb") as fh:
                        fh.seek(size - 1)
                        if fh.read(1) != b"\n":
                            line = b"\n" + line  # a torn line before us: start a new one
                written = 0
                while written < len(line):
                    written += os.write(fd, line[written:])
                if self.fsync:
                    os.fsync(fd)
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def iter_records(self) -> Iterator[dict[str, Any]]:
        """Every complete, well-formed record in file order (duplicates included)."""
        if not self.path.exists():
            return
        with open(self.path, "rb") as fh:
            for raw in fh:
                if not raw.endswith(b"\n"):
                    break  # torn tail
                try:
                    rec = json.loads(raw)
                except ValueError:
                    continue
                if isinstance(rec, dict) and all(k in rec for k in ("task", "model", "prompt_version")):
                    yield rec

    def records(self) -> list[dict[str, Any]]:
        """The records with one per key (the first written wins), in file order."""
        seen: set[tuple[str, str, str]] = set()
        out = []
        for rec in self.iter_records():
            k = record_key(rec)
            if k not in seen:
                seen.add(k)
                out.append(rec)
        return out

    def done_keys(self) -> set[tuple[str, str, str]]:
        """Keys already answered (abstentions included: they are final)."""
        return {record_key(r) for r in self.iter_records()}
