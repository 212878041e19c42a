r"""Agreement between annotators: Cohen's kappa (pairs), Fleiss' kappa and Krippendorff's alpha.

**Cohen's kappa** for two annotators who labelled the same items, with confusion counts
:math:`C_{jk}` over :math:`n` items:

.. math::
    p_o = \frac{1}{n}\sum_k C_{kk}, \qquad
    p_e = \frac{1}{n^2}\sum_k C_{k\cdot} C_{\cdot k}, \qquad
    \kappa = \frac{p_o - p_e}{1 - p_e}

**Fleiss' kappa** for many annotators, with :math:`n_{ik}` the number of answers of class
:math:`k` on item :math:`i` and :math:`n_i = \sum_k n_{ik} \ge 2` (items with fewer answers
are left out; a varying :math:`n_i` is allowed, and with a constant one this is Fleiss' formula):

.. math::
    P_i = \frac{\sum_k n_{ik}(n_{ik}-1)}{n_i(n_i-1)}, \qquad
    \bar P = \frac{1}{N}\sum_i P_i, \qquad
    p_k = \frac{\sum_i n_{ik}}{\sum_i n_i}, \qquad
    \kappa = \frac{\bar P - \sum_k p_k^2}{1 - \sum_k p_k^2}

**Krippendorff's alpha** from the coincidence matrix of pairable values (units with
:math:`m_u \ge 2` values), for any number of annotators and missing answers:

.. math::
    o_{ck} = \sum_u \frac{n_{uc} n_{uk} - [c = k]\, n_{uc}}{m_u - 1}, \qquad
    n_c = \sum_k o_{ck}, \qquad
    \alpha = 1 - (n - 1)\frac{\sum_{c,k} o_{ck}\,\delta^2_{ck}}{\sum_{c,k} n_c n_k\,\delta^2_{ck}}

with :math:`\delta^2_{ck} = [c \ne k]` (nominal), :math:`(v_c - v_k)^2` (interval),
:math:`((v_c - v_k)/(v_c + v_k))^2` (ratio) or
:math:`(\sum_{g=c}^{k} n_g - (n_c + n_k)/2)^2` (ordinal).

A statistic whose denominator is zero (everyone always chose one class, or no item has two
answers) is undefined: these functions return ``None`` then, never NaN.

References:
    Cohen, J. (1960). A coefficient of agreement for nominal scales. Educational and
    Psychological Measurement 20(1).
    Fleiss, J. L. (1971). Measuring nominal scale agreement among many raters. Psychological
    Bulletin 76(5).
    Krippendorff, K. (2011). Computing Krippendorff's alpha-reliability. Annenberg School for
    Communication, University of Pennsylvania.

Example:
    >>> import numpy as np
    >>> round(cohen_kappa(np.array([0, 1, 1, 0]), np.array([0, 1, 0, 0]), 2), 3)
    0.5
"""

from __future__ import annotations

from itertools import combinations
from typing import Any, Sequence

import numpy as np

from ..labels import LabelTensor
from .metrics import confusion_matrix, valid_pairs

__all__ = ["cohen_kappa", "pairwise_kappa", "kappa_matrix", "label_counts", "fleiss_kappa",
           "krippendorff_alpha", "first_answers"]


def cohen_kappa(a: Any, b: Any, n_classes: int | None = None) -> float | None:
    """Cohen's kappa of two label sequences (codes; positions with a code < 0 are dropped).

    Returns ``None`` when undefined (no items, or chance agreement is 1).
    """
    t, p = valid_pairs(a, b)
    if not len(t):
        return None
    cm = confusion_matrix(t, p, n_classes).astype(np.float64)
    n = cm.sum()
    po = np.trace(cm) / n
    pe = float(cm.sum(axis=1) @ cm.sum(axis=0)) / (n * n)
    if pe >= 1.0 - 1e-15:
        return None
    return float((po - pe) / (1.0 - pe))


def first_answers(tensor: LabelTensor) -> np.ndarray:
    """Dense ``int32[tasks, workers]`` view keeping each (task, worker)'s first answer, -1 if none."""
    out = np.full((tensor.n_tasks, tensor.n_workers), -1, dtype=np.int32)
    # assign in reverse so that the first answer of a repeated pair is the one that stays
    out[tensor.task[::-1], tensor.worker[::-1]] = tensor.label[::-1]
    return out


def pairwise_kappa(tensor: LabelTensor, *, tasks: np.ndarray | None = None,
                   workers: Sequence[Any] | None = None, min_overlap: int = 2) -> list[dict[str, Any]]:
    """Cohen's kappa for every pair of annotators, on the tasks both answered.

    Args:
        tensor: the answers (a repeated (task, worker) pair counts with its first answer).
        tasks: optional boolean mask ``[tasks]`` of the tasks to use (e.g. gold tasks only).
        workers: optional subset of worker ids (default: all).
        min_overlap: pairs that share fewer tasks get ``kappa = None``.

    Returns:
        One dict per unordered pair: ``a``, ``b``, ``n`` (shared tasks), ``agreement`` (observed,
        or None), ``kappa`` (or None).
    """
    dense = first_answers(tensor)
    if tasks is not None:
        dense = dense[np.asarray(tasks, dtype=bool)]
    ids = tensor.worker_ids.tolist()
    if workers is None:
        cols = list(range(len(ids)))
    else:
        index = {str(w): i for i, w in enumerate(ids)}
        missing = [w for w in workers if str(w) not in index]
        if missing:
            raise ValueError(f"unknown annotator(s): {missing}")
        cols = [index[str(w)] for w in workers]
    k = tensor.n_classes
    rows = []
    for i, j in combinations(cols, 2):
        a, b = dense[:, i], dense[:, j]
        both = (a >= 0) & (b >= 0)
        n = int(both.sum())
        kappa = cohen_kappa(a[both], b[both], k) if n >= min_overlap else None
        rows.append({"a": ids[i], "b": ids[j], "n": n,
                     "agreement": float((a[both] == b[both]).mean()) if n else None,
                     "kappa": kappa})
    return rows


def kappa_matrix(pairs: list[dict[str, Any]], workers: Sequence[Any]) -> np.ma.MaskedArray:
    """A symmetric ``[workers, workers]`` masked matrix from :func:`pairwise_kappa` rows.

    The diagonal is 1; an undefined pair is masked (not NaN).
    """
    index = {str(w): i for i, w in enumerate(workers)}
    m = len(workers)
    data = np.zeros((m, m))
    mask = np.ones((m, m), dtype=bool)
    np.fill_diagonal(data, 1.0)
    np.fill_diagonal(mask, False)
    for r in pairs:
        i, j = index.get(str(r["a"])), index.get(str(r["b"]))
        if i is None or j is None or r["kappa"] is None:
            continue
        data[i, j] = data[j, i] = r["kappa"]
        mask[i, j] = mask[j, i] = False
    return np.ma.MaskedArray(data, mask=mask)


def label_counts(tensor: LabelTensor, tasks: np.ndarray | None = None) -> np.ndarray:
    """``int64[tasks, classes]``: how many answers of each class each task got (all answers count)."""
    k = tensor.n_classes
    counts = np.bincount(tensor.task.astype(np.int64) * k + tensor.label,
                         minlength=tensor.n_tasks * k).reshape(tensor.n_tasks, k)
    if tasks is not None:
        counts = counts[np.asarray(tasks, dtype=bool)]
    return counts.astype(np.int64)


def fleiss_kappa(counts: Any) -> float | None:
    """Fleiss' kappa from ``counts[items, classes]`` (items with fewer than 2 answers are dropped).

    Accepts a :class:`LabelTensor` too (its :func:`label_counts`). ``None`` when undefined.
    """
    if isinstance(counts, LabelTensor):
        counts = label_counts(counts)
    c = np.asarray(counts, dtype=np.float64)
    n_i = c.sum(axis=1)
    c, n_i = c[n_i >= 2], n_i[n_i >= 2]
    if not len(c):
        return None
    p_i = (c * (c - 1)).sum(axis=1) / (n_i * (n_i - 1))
    p_bar = p_i.mean()
    p_k = c.sum(axis=0) / n_i.sum()
    pe = float((p_k ** 2).sum())
    if pe >= 1.0 - 1e-15:
        return None
    return float((p_bar - pe) / (1.0 - pe))


_METRICS = ("nominal", "ordinal", "interval", "ratio")


def _delta2(metric: str, n_c: np.ndarray, values: np.ndarray | None) -> np.ndarray:
    k = len(n_c)
    if metric == "nominal":
        return 1.0 - np.eye(k)
    if metric == "ordinal":
        cum = np.concatenate([[0.0], np.cumsum(n_c)])
        lo = np.minimum.outer(np.arange(k), np.arange(k))
        hi = np.maximum.outer(np.arange(k), np.arange(k))
        between = cum[hi + 1] - cum[lo]  # sum of n_g for g from min(c,k) to max(c,k)
        return (between - (n_c[:, None] + n_c[None, :]) / 2.0) ** 2
    assert values is not None
    diff = values[:, None] - values[None, :]
    if metric == "interval":
        return diff ** 2
    total = values[:, None] + values[None, :]
    out = np.zeros((k, k))
    np.divide(diff, total, out=out, where=total != 0)
    return out ** 2


def krippendorff_alpha(counts: Any, metric: str = "nominal",
                       values: Sequence[float] | None = None) -> float | None:
    """Krippendorff's alpha from ``counts[units, classes]`` (or a :class:`LabelTensor`).

    Args:
        counts: how many annotators gave each value in each unit (classes in order; for
            ``ordinal`` the order is the scale's order).
        metric: ``nominal``, ``ordinal``, ``interval`` or ``ratio``.
        values: the numeric value of each class (``interval`` / ``ratio``); default: the class
            labels as numbers (a tensor's classes) or ``0, 1, ...``.

    Returns:
        alpha, or ``None`` when it is undefined (fewer than 2 pairable values, or no variation).
    """
    if metric not in _METRICS:
        raise ValueError(f"metric must be one of {_METRICS}, got {metric!r}")
    if isinstance(counts, LabelTensor):
        if values is None and metric in ("interval", "ratio"):
            try:
                values = [float(c) for c in counts.classes.tolist()]
            except (TypeError, ValueError):
                raise ValueError(f"metric {metric!r} needs numeric classes; got "
                                 f"{counts.classes.tolist()} (pass values=...)") from None
        counts = label_counts(counts)
    c = np.asarray(counts, dtype=np.float64)
    m_u = c.sum(axis=1)
    c, m_u = c[m_u >= 2], m_u[m_u >= 2]
    k = c.shape[1] if c.ndim == 2 else 0
    if not len(c) or k == 0:
        return None
    vals = (np.asarray(values, dtype=np.float64) if values is not None
            else np.arange(k, dtype=np.float64))
    if len(vals) != k:
        raise ValueError(f"{len(vals)} values given for {k} classes")
    # o_ck = sum_u (n_uc n_uk - [c=k] n_uc) / (m_u - 1)
    w = c / (m_u - 1)[:, None]
    o = w.T @ c - np.diag(w.sum(axis=0))
    n_c = o.sum(axis=1)
    n = n_c.sum()
    d2 = _delta2(metric, n_c, vals)
    d_o = float((o * d2).sum())
    d_e = float((np.outer(n_c, n_c) * d2).sum())
    if n <= 1 or d_e <= 0:
        return None
    return float(1.0 - (n - 1) * d_o / d_e)
