r"""What an annotation run cost: tokens and money per model and for the whole panel, retries apart.

Each ledger record carries the prompt and completion tokens of every attempt (``attempt_tokens``;
the first attempt, then the re-asks after an answer that did not parse). A model is priced in one
of two ways:

* **API** (per-million-token prices :math:`\pi_p, \pi_c`):
  :math:`\text{cost} = (T_p \pi_p + T_c \pi_c) / 10^6`;
* **self-hosted** (a GPU-hour price :math:`h`, the number of GPUs :math:`g` and a measured
  throughput): the GPU time is :math:`s = T_p / r_p + T_c / r_c` seconds (or
  :math:`(T_p + T_c) / r` with one combined rate), and :math:`\text{cost} = g\,h\,s / 3600`.
  Without a throughput, the records' own ``latency_s`` is used as the GPU time (requests one at a
  time: an upper bound when the server batched them).

Retries are the tokens of attempts after the first; their cost is reported separately (and is
included in the totals).

The default price table is :data:`DEFAULT_PRICES` below, an editable Python dict; a TOML file
(``--prices``) overrides or adds entries, e.g.::

    currency = "USD"

    [default]                      # any model that no entry matches
    gpu_hour = 2.0                 # $ per GPU-hour
    gpus = 1

    [models."gpt-4o"]              # API prices, $ per million tokens
    prompt_per_m = 2.50
    completion_per_m = 10.00

    [models."Qwen/*"]              # glob patterns match model names (first exact, then globs)
    gpu_hour = 2.0
    prompt_tokens_per_s = 20000    # measured prefill throughput
    completion_tokens_per_s = 1500 # measured decode throughput

``crowdllm cost --write-prices FILE`` writes the defaults as such a file, to edit.

Example:
    >>> from crowdllm.eval.cost import PriceTable, ledger_cost
    >>> prices = PriceTable.from_dict({"models": {"m": {"prompt_per_m": 1.0, "completion_per_m": 2.0}}})
    >>> rec = {"task": "a", "model": "m", "prompt_tokens": 1000, "completion_tokens": 10,
    ...        "attempts": 1, "attempt_tokens": [[1000, 10]]}
    >>> ledger_cost([rec], prices)[0]["cost"]
    0.00102
"""

from __future__ import annotations

import dataclasses
import fnmatch
import itertools
import tomllib
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from ..labels import CrowdDataError, LabelTensor

__all__ = ["DEFAULT_PRICES", "Price", "PriceTable", "load_prices", "ledger_cost", "worker_costs",
           "cost_accuracy_frontier", "pareto_front", "prices_toml"]

#: The editable default price table. API prices are list prices in USD per million tokens as
#: recalled at the time of writing (check your provider's page before quoting a figure); local
#: models default to one GPU at ``gpu_hour`` dollars an hour (a rented H100-class GPU).
DEFAULT_PRICES: dict[str, Any] = {
    "currency": "USD",
    "default": {"gpu_hour": 2.00, "gpus": 1},
    "models": {
        "gpt-4o": {"prompt_per_m": 2.50, "completion_per_m": 10.00},
        "gpt-4o-mini": {"prompt_per_m": 0.15, "completion_per_m": 0.60},
        "gpt-4.1": {"prompt_per_m": 2.00, "completion_per_m": 8.00},
        "gpt-4.1-mini": {"prompt_per_m": 0.40, "completion_per_m": 1.60},
        "gpt-4.1-nano": {"prompt_per_m": 0.10, "completion_per_m": 0.40},
        "gpt-4": {"prompt_per_m": 30.00, "completion_per_m": 60.00},
        "gpt-3.5-turbo": {"prompt_per_m": 0.50, "completion_per_m": 1.50},
        "claude-3-5-sonnet*": {"prompt_per_m": 3.00, "completion_per_m": 15.00},
        "claude-3-5-haiku*": {"prompt_per_m": 0.80, "completion_per_m": 4.00},
    },
}

_FIELDS = {"prompt_per_m", "completion_per_m", "gpu_hour", "gpus", "tokens_per_s",
           "prompt_tokens_per_s", "completion_tokens_per_s"}


@dataclasses.dataclass(frozen=True)
class Price:
    """How one model is priced (API per-million prices, or GPU-hours and throughput)."""

    prompt_per_m: float | None = None
    completion_per_m: float | None = None
    gpu_hour: float | None = None
    gpus: float = 1.0
    tokens_per_s: float | None = None
    prompt_tokens_per_s: float | None = None
    completion_tokens_per_s: float | None = None
    entry: str = "default"

    @property
    def is_api(self) -> bool:
        return self.prompt_per_m is not None or self.completion_per_m is not None

    @property
    def has_throughput(self) -> bool:
        return self.tokens_per_s is not None or (
            self.prompt_tokens_per_s is not None and self.completion_tokens_per_s is not None)

    def describe(self, currency: str = "USD") -> str:
        """A short human description (shown in the cost table's ``pricing`` column)."""
        if self.is_api:
            return (f"api {self.entry}: {self.prompt_per_m or 0:g}/{self.completion_per_m or 0:g} "
                    f"{currency} per M tokens")
        if self.gpu_hour is None:
            return "no price"
        gpus = f"{self.gpus:g}x" if self.gpus != 1 else ""
        if self.tokens_per_s is not None:
            rate = f"{self.tokens_per_s:g} tok/s"
        elif self.has_throughput:
            rate = f"{self.prompt_tokens_per_s:g}+{self.completion_tokens_per_s:g} tok/s"
        else:
            rate = "measured latency"
        return f"gpu {self.entry}: {gpus}{self.gpu_hour:g} {currency}/h at {rate}"

    def cost(self, prompt_tokens: float, completion_tokens: float,
             latency_s: float | None = None) -> float | None:
        """Money for these tokens (None when the price cannot be computed)."""
        if self.is_api:
            return ((prompt_tokens * (self.prompt_per_m or 0.0)
                     + completion_tokens * (self.completion_per_m or 0.0)) / 1e6)
        if self.gpu_hour is None:
            return None
        if self.tokens_per_s is not None:
            seconds = (prompt_tokens + completion_tokens) / self.tokens_per_s
        elif self.has_throughput:
            seconds = (prompt_tokens / self.prompt_tokens_per_s  # type: ignore[operator]
                       + completion_tokens / self.completion_tokens_per_s)  # type: ignore[operator]
        elif latency_s is not None:
            seconds = latency_s
        else:
            return None
        return self.gpus * self.gpu_hour * seconds / 3600.0


def _price_from(entry: Mapping[str, Any], name: str, where: str) -> Price:
    if not isinstance(entry, Mapping):
        raise CrowdDataError(f"{where}: entry {name!r} must be a table of fields")
    unknown = set(entry) - _FIELDS
    if unknown:
        raise CrowdDataError(f"{where}: entry {name!r}: unknown field(s) {sorted(unknown)}; "
                             f"known: {sorted(_FIELDS)}")
    vals: dict[str, float] = {}
    for k, v in entry.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not np.isfinite(v) or v < 0:
            raise CrowdDataError(f"{where}: entry {name!r}, field {k!r}: expected a non-negative "
                                 f"number, got {v!r}")
        if k.endswith("_per_s") and v == 0:
            raise CrowdDataError(f"{where}: entry {name!r}, field {k!r}: a throughput must be > 0")
        vals[k] = float(v)
    return Price(entry=name, **vals)


@dataclasses.dataclass
class PriceTable:
    """Prices by model name (exact names first, then glob patterns in order), plus a default."""

    models: dict[str, Price]
    default: Price | None
    currency: str = "USD"

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "price table",
                  base: "PriceTable | None" = None) -> "PriceTable":
        """Build from a dict shaped like :data:`DEFAULT_PRICES`, on top of ``base`` if given."""
        unknown = set(d) - {"currency", "default", "models"}
        if unknown:
            raise CrowdDataError(f"{where}: unknown top-level key(s) {sorted(unknown)}; "
                                 f"expected currency, [default], [models.\"NAME\"]")
        models = dict(base.models) if base else {}
        for name, entry in (d.get("models") or {}).items():
            models[str(name)] = _price_from(entry, str(name), where)
        default = base.default if base else None
        if "default" in d:
            default = _price_from(d["default"], "default", where) if d["default"] else None
        currency = str(d.get("currency", base.currency if base else "USD"))
        return cls(models=models, default=default, currency=currency)

    def price_of(self, model: str, endpoint_model: str | None = None) -> Price | None:
        """The price entry for a model (its name, then its endpoint name; exact, then globs)."""
        names = [model] + ([endpoint_model] if endpoint_model and endpoint_model != model else [])
        for n in names:
            if n in self.models:
                return self.models[n]
        for n in names:
            for pattern, price in self.models.items():
                if fnmatch.fnmatchcase(n, pattern):
                    return price
        return self.default


def load_prices(path: str | Path | None = None) -> PriceTable:
    """The default price table, overridden by the TOML file at ``path`` when given."""
    table = PriceTable.from_dict(DEFAULT_PRICES, "DEFAULT_PRICES")
    if path is None:
        return table
    p = Path(path)
    if not p.exists():
        raise CrowdDataError(f"{p}: no such file")
    try:
        d = tomllib.loads(p.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise CrowdDataError(f"{p}: not valid TOML ({exc})") from None
    return PriceTable.from_dict(d, str(p), base=table)


def prices_toml(d: Mapping[str, Any] = DEFAULT_PRICES) -> str:
    """A price dict as TOML text (for ``crowdllm cost --write-prices``)."""
    def entry(fields: Mapping[str, Any]) -> list[str]:
        return [f"{k} = {float(v)!r}" for k, v in fields.items()]

    lines = ["# crowdllm price table: $ per million tokens (API) or $ per GPU-hour (self-hosted).",
             "# Fields: prompt_per_m, completion_per_m, gpu_hour, gpus, tokens_per_s,",
             "#         prompt_tokens_per_s, completion_tokens_per_s. Model keys may be globs.",
             f'currency = "{d.get("currency", "USD")}"', ""]
    if d.get("default"):
        lines += ["[default]", *entry(d["default"]), ""]
    for name, fields in (d.get("models") or {}).items():
        lines += [f'[models."{name}"]', *entry(fields), ""]
    return "\n".join(lines)


def _split_tokens(rec: Mapping[str, Any]) -> tuple[int, int, int | None, int | None]:
    """(prompt, completion, retry_prompt, retry_completion); retries None when unknown."""
    p, c = int(rec["prompt_tokens"]), int(rec["completion_tokens"])
    at = rec.get("attempt_tokens")
    if at:
        rp = sum(a for a, _ in at[1:])
        rc = sum(b for _, b in at[1:])
        return p, c, rp, rc
    if int(rec.get("attempts", 1)) <= 1:
        return p, c, 0, 0
    return p, c, None, None


def ledger_cost(ledger: Sequence[Mapping[str, Any]], prices: PriceTable,
                by: Callable[[Mapping[str, Any]], Any] | None = None,
                spent: Sequence[Mapping[str, Any]] = ()) -> list[dict[str, Any]]:
    """Tokens and money per model (and prompt version), then a ``panel`` total row.

    Args:
        ledger: records as read by :func:`crowdllm.eval.run.read_ledger`.
        prices: the price table.
        by: the grouping key of a record (default: ``(model, prompt_version)``).
        spent: ``spent.jsonl`` records (``Run.spent``): attempts billed without a final answer.
            Their tokens and cost are added to the model's totals and, since they bought no
            answer, to its retry columns; they count as attempts, not as items.

    Returns:
        Rows with ``model``, ``prompt_version``, ``pricing``, ``items``, ``answered``,
        ``abstained``, ``attempts``, ``retried_items``, ``prompt_tokens``, ``completion_tokens``,
        ``retry_prompt_tokens``, ``retry_completion_tokens``, ``cost``, ``retry_cost``,
        ``cost_per_item``; cost fields are None where no price applies; the last row is the
        panel total (its cost is None if any model's is).
    """
    key = by or (lambda r: (str(r["model"]), str(r.get("prompt_version") or "")))
    groups: dict[Any, list[Mapping[str, Any]]] = {}
    for r in ledger:
        groups.setdefault(key(r), []).append(r)
    lost: dict[Any, list[Mapping[str, Any]]] = {}
    for r in spent:
        lost.setdefault(key(r), []).append(r)
        groups.setdefault(key(r), [])
    rows = []
    for k, recs in groups.items():
        first = recs[0] if recs else lost[k][0]
        model = str(first["model"])
        price = prices.price_of(model, first.get("endpoint_model"))
        row: dict[str, Any] = {
            "model": model, "prompt_version": str(first.get("prompt_version") or ""),
            "pricing": price.describe(prices.currency) if price else "no price",
            "items": len(recs),
            "answered": sum(1 for r in recs if r.get("label") is not None and not r.get("abstained")),
            "abstained": sum(1 for r in recs if r.get("abstained") or r.get("label") is None),
            "attempts": sum(int(r.get("attempts", 1)) for r in recs + lost.get(k, [])),
            "retried_items": sum(1 for r in recs if int(r.get("attempts", 1)) > 1),
            "prompt_tokens": 0, "completion_tokens": 0,
            "retry_prompt_tokens": 0, "retry_completion_tokens": 0,
            "cost": 0.0, "retry_cost": 0.0,
        }
        # spent attempts: all of their tokens are overhead (no answer came of them)
        wasted = [(r, int(r["prompt_tokens"]), int(r["completion_tokens"]))
                  for r in lost.get(k, [])]
        for r, p, c, rp, rc in ([(r, *_split_tokens(r)) for r in recs]
                                + [(r, p, c, p, c) for r, p, c in wasted]):
            row["prompt_tokens"] += p
            row["completion_tokens"] += c
            if rp is None or row["retry_prompt_tokens"] is None:
                row["retry_prompt_tokens"] = row["retry_completion_tokens"] = None
            else:
                row["retry_prompt_tokens"] += rp
                row["retry_completion_tokens"] += rc
            lat = r.get("latency_s")
            cost = price.cost(p, c, lat) if price else None
            if cost is None or row["cost"] is None:
                row["cost"] = row["retry_cost"] = None
                continue
            row["cost"] += cost
            assert price is not None  # a cost was computed
            if rp is None or rc is None or row["retry_cost"] is None:
                row["retry_cost"] = None
            elif price.is_api or price.has_throughput:
                row["retry_cost"] += price.cost(rp, rc, None) or 0.0
            elif p + c:  # measured latency covers all attempts: split it by token share
                row["retry_cost"] += cost * (rp + rc) / (p + c)
        row["cost_per_item"] = (row["cost"] / row["items"]
                                if row["cost"] is not None and row["items"] else None)
        rows.append(row)
    rows.sort(key=lambda r: (r["model"], r["prompt_version"]))
    total: dict[str, Any] = {"model": "panel", "prompt_version": "", "pricing": "",
                             "items": len({str(r["task"]) for r in ledger})}
    for f in ("answered", "abstained", "attempts", "retried_items", "prompt_tokens",
              "completion_tokens", "retry_prompt_tokens", "retry_completion_tokens", "cost",
              "retry_cost"):
        vals = [r[f] for r in rows]
        total[f] = None if any(v is None for v in vals) else sum(vals)
    total["cost_per_item"] = (total["cost"] / total["items"]
                              if total["cost"] is not None and total["items"] else None)
    return rows + [total]


def worker_costs(cost_rows: Sequence[Mapping[str, Any]],
                 models_of_workers: Mapping[str, tuple[str, str]]) -> dict[str, float | None]:
    """The cost of each annotator id, from :func:`ledger_cost` rows and a worker -> model map."""
    by_key = {(r["model"], r["prompt_version"]): r["cost"] for r in cost_rows if r["model"] != "panel"}
    return {w: by_key.get(mv) for w, mv in models_of_workers.items()}


def pareto_front(costs: Sequence[float], accs: Sequence[float]) -> np.ndarray:
    """Boolean mask of the points no other point beats (cost <= and accuracy >=, one strictly)."""
    c = np.asarray(costs, dtype=np.float64)
    a = np.asarray(accs, dtype=np.float64)
    better_or_eq = (c[None, :] <= c[:, None]) & (a[None, :] >= a[:, None])
    strictly = (c[None, :] < c[:, None]) | (a[None, :] > a[:, None])
    return ~(better_or_eq & strictly).any(axis=1)


def cost_accuracy_frontier(
    tensor: LabelTensor, costs: Mapping[str, float | None], methods: Sequence[str], *,
    params: Mapping[str, Mapping[str, Any]] | None = None, seed: int = 0,
    max_subsets: int = 127, min_size: int = 1,
) -> list[dict[str, Any]]:
    """Accuracy (on gold tasks) and cost of every panel subset under every method.

    Subsets are taken among the annotators that have a cost, smallest first, up to
    ``max_subsets`` of them (all of them for a panel of up to 7 models). The cost of a subset is
    the sum of its members' costs (what running only those models would have cost).

    Returns:
        Rows ``subset`` (``a+b+...``), ``size``, ``method``, ``cost``, ``accuracy``,
        ``accuracy_per_cost``, ``error`` (a method failure, else None), and ``frontier`` (on the
        Pareto front of cost vs accuracy over all rows).
    """
    from .evaluate import run_method

    if not tensor.has_gold:
        raise ValueError("the cost-accuracy frontier needs gold labels")
    workers = [w for w in tensor.worker_ids.tolist() if costs.get(str(w)) is not None]
    if not workers:
        raise ValueError("no annotator has a cost (does the ledger match the answers' workers?)")
    gold = tensor.gold
    mask = gold >= 0
    rows = []
    n_sub = 0
    for size in range(min_size, len(workers) + 1):
        for subset in itertools.combinations(workers, size):
            if n_sub >= max_subsets:
                break
            n_sub += 1
            sub = tensor.select_workers(list(subset))
            cost = float(sum(costs[str(w)] for w in subset))  # type: ignore[misc]
            for m in methods:
                out = run_method(sub, m, (params or {}).get(m), seed=seed)
                acc = (float((out.codes[mask] == gold[mask]).mean())
                       if out.codes is not None else None)
                rows.append({"subset": "+".join(map(str, subset)), "size": size, "method": m,
                             "cost": cost, "accuracy": acc,
                             "accuracy_per_cost": (acc / cost if acc is not None and cost > 0
                                                   else None),
                             "error": out.error})
    ok = [i for i, r in enumerate(rows) if r["accuracy"] is not None]
    front = pareto_front([rows[i]["cost"] for i in ok], [rows[i]["accuracy"] for i in ok])
    for r in rows:
        r["frontier"] = False
    for i, f in zip(ok, front):
        rows[i]["frontier"] = bool(f)
    return rows
