"""A pytest plugin that logs every XLA compile of a test run, to see where the suite's time goes.

    CROWDLLM_COMPILE_LOG=/tmp/compiles.jsonl PYTHONPATH=benchmarks \
        bash tests/run.sh -p compile_log
    python benchmarks/compile_log.py /tmp/compiles.jsonl     # summary tables

Each line of the log is one backend compile (or persistent-cache hit): the test that ran it, the
function, its argument shapes and the seconds. JAX writes these messages at DEBUG level unless
``jax_log_compiles`` is on; the plugin lowers only its three loggers' levels and keeps their
messages out of the test output.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import re
import sys

_LOGGERS = ("jax._src.interpreters.pxla", "jax._src.dispatch", "jax._src.compiler")
_state = {"test": "<collect>", "shapes": "", "fh": None}


class _Handler(logging.Handler):
    def emit(self, record):
        msg = record.getMessage()
        fh = _state["fh"]
        if msg.startswith("Compiling "):
            _state["shapes"] = msg.split(" with global shapes and types ", 1)[-1].split(
                ". Argument mapping", 1)[0]
            return
        m = re.match(r"Finished (XLA compilation|tracing) of (.*) in ([0-9.]+) sec", msg) or \
            re.match(r"Finished (tracing) (.*) for jit in ([0-9.]+) sec", msg)
        if m:
            kind = "compile" if m.group(1).startswith("XLA") else "trace"
            row = {"test": _state["test"], "kind": kind, "fun": m.group(2),
                   "s": float(m.group(3)), "pid": os.getpid()}
            if kind == "compile":
                row["shapes"] = _state["shapes"]
            fh.write(json.dumps(row) + "\n")
        elif msg.startswith("Persistent compilation cache hit"):
            fh.write(json.dumps({"test": _state["test"], "kind": "hit",
                                 "fun": msg.split("'")[1], "pid": os.getpid()}) + "\n")


def pytest_configure(config):
    path = os.environ.get("CROWDLLM_COMPILE_LOG")
    if not path:
        return
    _state["fh"] = open(path, "a", buffering=1)
    handler = _Handler()
    for name in _LOGGERS:
        lg = logging.getLogger(name)
        lg.setLevel(logging.DEBUG)
        lg.addHandler(handler)
        lg.propagate = False


def pytest_runtest_setup(item):
    _state["test"] = item.nodeid


def summarise(path: str, top: int = 30) -> None:
    rows = [json.loads(line) for line in open(path)]
    comp = [r for r in rows if r["kind"] == "compile"]
    print(f"{len(comp)} compiles, {sum(r['s'] for r in comp):.0f} s; "
          f"{sum(r['s'] for r in rows if r['kind'] == 'trace'):.0f} s tracing; "
          f"{sum(r['kind'] == 'hit' for r in rows)} cache hits")
    by_file = collections.Counter()
    by_fun = collections.Counter()
    for r in comp:
        by_file[r["test"].split("::")[0]] += r["s"]
        by_fun[r["fun"]] += r["s"]
    print("\ncompile s per test file")
    for k, v in by_file.most_common(top):
        print(f"{v:8.1f}  {k}")
    print("\ncompile s per function")
    for k, v in by_fun.most_common(top):
        print(f"{v:8.1f}  {k}")
    # the same function and shapes compiled more than once: what a shared program would save
    groups = collections.defaultdict(list)
    for r in comp:
        groups[(r["fun"], r["shapes"])].append(r["s"])
    again = sorted(((sum(v) - v[0], k, len(v)) for k, v in groups.items() if len(v) > 1),
                   reverse=True)
    print(f"\nsame function and shapes compiled again: {sum(a for a, _, _ in again):.0f} s")
    for s, (fun, shapes), n in again[:top]:
        print(f"{s:8.1f}  x{n}  {fun}  {shapes[:150]}")


if __name__ == "__main__":
    summarise(sys.argv[1], *(int(a) for a in sys.argv[2:]))
