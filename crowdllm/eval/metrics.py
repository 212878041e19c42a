r"""Classification metrics on integer class codes: accuracy, confusion, per-class P/R/F1.

Every function takes ``y_true`` and ``y_pred`` as integer class codes (the codes of a
:class:`~crowdllm.labels.LabelTensor`, ``0 .. n_classes-1``) and the number of classes, so that
a class nobody predicted (or that no gold task has) still gets its row. Entries with a code
below zero (no gold, no answer) are dropped first: metrics are computed on gold tasks only.

.. math::
    C_{jk} = \#\{i : y_i = j, \hat y_i = k\}, \qquad
    P_k = \frac{C_{kk}}{\sum_j C_{jk}}, \qquad R_k = \frac{C_{kk}}{\sum_j C_{kj}}, \qquad
    F_k = \frac{2 P_k R_k}{P_k + R_k}

A ratio whose denominator is zero is 0 (scikit-learn's ``zero_division=0``), so no NaN reaches a
result. ``macro`` F1 is the unweighted mean of :math:`F_k` over all classes, ``weighted`` F1 the
mean weighted by each class's support :math:`\sum_j C_{kj}`.

References:
    scikit-learn, ``sklearn.metrics.precision_recall_fscore_support`` (same definitions; the
    test suite checks equality on random inputs).

Example:
    >>> import numpy as np
    >>> prf = precision_recall_f1(np.array([0, 1, 1, 2]), np.array([0, 1, 2, 2]), 3)
    >>> prf.f1.round(3).tolist()
    [1.0, 0.667, 0.667]
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import numpy as np

__all__ = ["PRF", "accuracy", "confusion_matrix", "precision_recall_f1", "macro_f1",
           "weighted_f1", "classification_summary", "valid_pairs"]


class PRF(NamedTuple):
    """Per-class precision, recall, F1 (``float64[classes]``) and support (``int64[classes]``)."""

    precision: np.ndarray
    recall: np.ndarray
    f1: np.ndarray
    support: np.ndarray


def valid_pairs(y_true: Any, y_pred: Any) -> tuple[np.ndarray, np.ndarray]:
    """Both as int64 arrays, keeping only positions where both codes are ``>= 0``."""
    t = np.asarray(y_true, dtype=np.int64).ravel()
    p = np.asarray(y_pred, dtype=np.int64).ravel()
    if t.shape != p.shape:
        raise ValueError(f"y_true and y_pred differ in length: {t.shape[0]} vs {p.shape[0]}")
    keep = (t >= 0) & (p >= 0)
    return t[keep], p[keep]


def _n_classes(t: np.ndarray, p: np.ndarray, n_classes: int | None) -> int:
    top = int(max(t.max(initial=-1), p.max(initial=-1))) + 1
    if n_classes is None:
        return top
    if top > n_classes:
        raise ValueError(f"class code {top - 1} is out of range for {n_classes} classes")
    return int(n_classes)


def confusion_matrix(y_true: Any, y_pred: Any, n_classes: int | None = None) -> np.ndarray:
    """``int64[classes, classes]``: rows are the true class, columns the predicted one."""
    t, p = valid_pairs(y_true, y_pred)
    k = _n_classes(t, p, n_classes)
    return np.bincount(t * k + p, minlength=k * k).reshape(k, k).astype(np.int64)


def accuracy(y_true: Any, y_pred: Any) -> float:
    """Fraction of (gold) positions where the prediction equals the truth; 0.0 when there are none."""
    t, p = valid_pairs(y_true, y_pred)
    return float((t == p).mean()) if len(t) else 0.0


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    out = np.zeros_like(num)
    np.divide(num, den, out=out, where=den > 0)
    return out


def precision_recall_f1(y_true: Any, y_pred: Any, n_classes: int | None = None) -> PRF:
    """Per-class precision, recall, F1 and support (0 where a ratio is 0/0)."""
    cm = confusion_matrix(y_true, y_pred, n_classes)
    tp = np.diag(cm).astype(np.float64)
    predicted = cm.sum(axis=0)
    support = cm.sum(axis=1)
    precision = _ratio(tp, predicted)
    recall = _ratio(tp, support)
    f1 = _ratio(2 * tp, predicted + support)  # = 2PR/(P+R), and 0 when tp = 0
    return PRF(precision, recall, f1, support.astype(np.int64))


def macro_f1(y_true: Any, y_pred: Any, n_classes: int | None = None) -> float:
    """Unweighted mean of the per-class F1 over all ``n_classes`` classes."""
    f1 = precision_recall_f1(y_true, y_pred, n_classes).f1
    return float(f1.mean()) if len(f1) else 0.0


def weighted_f1(y_true: Any, y_pred: Any, n_classes: int | None = None) -> float:
    """Mean of the per-class F1 weighted by each class's support (0.0 with no support)."""
    prf = precision_recall_f1(y_true, y_pred, n_classes)
    total = prf.support.sum()
    return float((prf.f1 * prf.support).sum() / total) if total else 0.0


def classification_summary(y_true: Any, y_pred: Any, classes: Sequence[Any]) -> dict[str, Any]:
    """Everything about one system on gold tasks, as plain Python values (for tables and JSON).

    Returns:
        ``n`` (positions scored), ``accuracy``, ``macro_f1``, ``weighted_f1``, and per class
        ``precision``, ``recall``, ``f1``, ``support`` (dicts keyed by the class as a string), and
        ``confusion`` (a list of rows, true class by predicted class).
    """
    names = [str(c) for c in classes]
    k = len(names)
    t, p = valid_pairs(y_true, y_pred)
    prf = precision_recall_f1(t, p, k)
    total = prf.support.sum()
    return {
        "n": int(len(t)),
        "accuracy": float((t == p).mean()) if len(t) else 0.0,
        "macro_f1": float(prf.f1.mean()) if k else 0.0,
        "weighted_f1": float((prf.f1 * prf.support).sum() / total) if total else 0.0,
        "precision": dict(zip(names, prf.precision.tolist())),
        "recall": dict(zip(names, prf.recall.tolist())),
        "f1": dict(zip(names, prf.f1.tolist())),
        "support": dict(zip(names, prf.support.tolist())),
        "confusion": confusion_matrix(t, p, k).tolist(),
    }
