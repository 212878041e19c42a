"""A small **synthetic** annotation run, for the notebook, the docs and the tests.

Nothing here comes from a real model: labels are sampled from a per-model, per-domain
accuracy (errors uniform over the other classes), token counts from the item's length, and a
share of answers is "re-asked" (an unparsable first attempt) to exercise the retry accounting.
The files follow the run-directory contract of ``crowdllm annotate`` (see
:mod:`crowdllm.eval.run`), so every evaluation, cost and report command runs on them.

Example:
    >>> from crowdllm.eval.synthetic import write_synthetic_run  # doctest: +SKIP
    >>> run_dir = write_synthetic_run("/tmp/synth", n_items=60, seed=0)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pyarrow as pa

from ..labels import write_table

__all__ = ["SYNTHETIC_MODELS", "SYNTHETIC_CLASSES", "write_synthetic_run"]

SYNTHETIC_CLASSES = ("background", "purpose", "method", "finding", "other")

#: model name -> (accuracy per domain, mean completion tokens, retry probability, backend)
SYNTHETIC_MODELS: dict[str, dict[str, Any]] = {
    "sim-small-a": {"acc": {"bio": 0.70, "cs": 0.55}, "completion": 3, "retry": 0.15, "backend": "vllm"},
    "sim-small-b": {"acc": {"bio": 0.60, "cs": 0.68}, "completion": 4, "retry": 0.10, "backend": "vllm"},
    "sim-small-c": {"acc": {"bio": 0.64, "cs": 0.62}, "completion": 3, "retry": 0.05, "backend": "vllm"},
    "sim-api-large": {"acc": {"bio": 0.80, "cs": 0.78}, "completion": 2, "retry": 0.0, "backend": "openai"},
}


def write_synthetic_run(path: str | Path, *, n_items: int = 60, seed: int = 0,
                        models: Mapping[str, Mapping[str, Any]] | None = None,
                        n_humans: int = 0, human_acc: float = 0.65,
                        prompt_version: str = "v1") -> Path:
    """Write a synthetic run directory (plus ``gold.csv`` and, with ``n_humans``, ``humans.csv``).

    Args:
        path: the folder to write (created).
        n_items: number of items; half in domain ``bio``, half in ``cs``.
        seed: the random seed (the same seed writes the same files).
        models: the panel (default :data:`SYNTHETIC_MODELS`).
        n_humans: also write ``humans.csv``, 3 answers per item from a pool of this many
            synthetic human workers of accuracy ``human_acc``.
        prompt_version: the prompt version recorded in the ledger.

    Returns:
        The folder.
    """
    rng = np.random.default_rng(seed)
    panel = dict(models or SYNTHETIC_MODELS)
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    k = len(SYNTHETIC_CLASSES)
    tasks = [f"s{i:04d}" for i in range(n_items)]
    domains = ["bio" if i % 2 == 0 else "cs" for i in range(n_items)]
    truth = rng.integers(0, k, size=n_items)
    texts = [f"Synthetic sentence {i} about {d}: " + " ".join(["word"] * int(rng.integers(8, 40)))
             for i, d in enumerate(domains)]

    def noisy(true: int, acc: float) -> int:
        if rng.random() < acc:
            return int(true)
        return int(rng.choice([c for c in range(k) if c != true]))

    ledger_lines, answers = [], []
    for m, spec in panel.items():
        for i, t in enumerate(tasks):
            label = noisy(int(truth[i]), float(spec["acc"][domains[i]]))
            base_prompt = 120 + len(texts[i].split())
            attempts = 2 if rng.random() < float(spec.get("retry", 0.0)) else 1
            att = []
            for a in range(attempts):
                comp = int(spec["completion"]) + (int(rng.integers(5, 15)) if a < attempts - 1 else 0)
                att.append([base_prompt + (40 * a), comp])
            rec = {
                "task": t, "model": m, "prompt_version": prompt_version,
                "raw": SYNTHETIC_CLASSES[label], "label": SYNTHETIC_CLASSES[label],
                "abstained": False, "probs": None,
                "prompt_tokens": sum(p for p, _ in att), "completion_tokens": sum(c for _, c in att),
                "attempts": attempts, "attempt_tokens": att,
                "latency_s": round(0.05 * attempts + 0.002 * sum(c for _, c in att), 4),
                "finish_reason": "stop", "backend": spec.get("backend", "vllm"), "endpoint_model": m,
            }
            ledger_lines.append(json.dumps(rec))
            answers.append((t, m, SYNTHETIC_CLASSES[label]))
    (out / "ledger.jsonl").write_text("\n".join(ledger_lines) + "\n", encoding="utf-8")
    t_col, w_col, l_col = zip(*answers)
    write_table(pa.table({"task": list(t_col), "worker": list(w_col), "label": list(l_col)}),
                out / "answers.parquet")
    write_table(pa.table({"task": tasks, "text": texts, "domain": domains}), out / "items.parquet")
    write_table(pa.table({"task": tasks, "label": [SYNTHETIC_CLASSES[c] for c in truth]}),
                out / "gold.csv")
    (out / "run.json").write_text(json.dumps({
        "synthetic": True,
        "note": "SYNTHETIC data written by crowdllm.eval.synthetic; not from any real model",
        "panel": list(panel), "labels": list(SYNTHETIC_CLASSES),
        "prompt_versions": {m: prompt_version for m in panel},
        "seed": seed}, indent=2), encoding="utf-8")
    if n_humans:
        rows = []
        for i, t in enumerate(tasks):
            for w in rng.choice(n_humans, size=min(3, n_humans), replace=False):
                rows.append((t, f"human{int(w):02d}", SYNTHETIC_CLASSES[noisy(int(truth[i]), human_acc)]))
        ht, hw, hl = zip(*rows)
        write_table(pa.table({"task": list(ht), "worker": list(hw), "label": list(hl)}),
                    out / "humans.csv")
    return out
