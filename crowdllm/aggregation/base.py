"""The class shell every aggregator shares, in the style of crowd-kit.

A subclass implements ``_fit(tensor, gold) -> dict`` on a :class:`~crowdllm.labels.LabelTensor`
(calling its pure, jitted kernel) and gets ``fit``, ``fit_predict``, ``fit_predict_proba``,
the output tables and the trailing-underscore attributes:

* ``probas_``: ``float[tasks, classes]`` posterior class probabilities (numpy);
* ``labels_``: the predicted label value per task (numpy, aligned with ``tasks_``);
* ``tasks_``, ``workers_``, ``classes_``: the vocabularies;
* ``n_iter_``, ``converged_``, ``loss_history_`` for iterative methods.

``fit_predict`` / ``fit_predict_proba`` return pandas objects indexed by task when the input was
a pandas DataFrame (as crowd-kit does), numpy arrays otherwise.
"""

from __future__ import annotations

import inspect
import warnings
from typing import Any, ClassVar

import jax
import numpy as np
import pyarrow as pa

from ..labels import LabelTensor

__all__ = ["Aggregator", "ConvergenceWarning"]


class ConvergenceWarning(UserWarning):
    """An iterative aggregator stopped at ``max_iter`` before its objective settled."""


def _is_pandas(obj: Any) -> bool:
    return type(obj).__module__.startswith("pandas")


class Aggregator:
    """Base class: ``fit`` turns any supported input into a label tensor and calls ``_fit``."""

    #: short name used by the CLI (``--method``)
    name: ClassVar[str] = ""
    #: one-line description shown by ``crowdllm methods``
    description: ClassVar[str] = ""
    #: whether ``fit(..., gold=...)`` uses gold labels
    supports_gold: ClassVar[bool] = False
    #: whether the fit is random (takes ``seed``)
    iterative: ClassVar[bool] = False

    @property
    def shardable(self) -> bool:
        """Whether ``fit`` splits its answers over the mesh inside ``sharding.sharded()`` (every
        method whose kernels take ``prepare``'d data; not NumPyro's NUTS / SVI nor llm-judge)."""
        return True

    probas_: np.ndarray
    labels_: np.ndarray
    label_codes_: np.ndarray

    # --------------------------------------------------------------------------- subclass API
    def _fit(self, tensor: LabelTensor, gold: np.ndarray | None) -> dict[str, Any]:
        """Fit on ``tensor``; return a dict with at least ``probas`` ([tasks, classes] numpy)
        and optionally ``labels`` (codes), ``n_iter``, ``converged``, ``history`` and any
        annotator parameters (set as attributes with a trailing underscore)."""
        raise NotImplementedError

    def skills_table(self) -> pa.Table:
        """Annotator parameters, one row per annotator (subclasses add columns)."""
        return pa.table({"worker": pa.array(self.workers_.tolist())})

    # --------------------------------------------------------------------------- public API
    def fit(self, data: Any, gold: Any = None) -> "Aggregator":
        """Fit on answers (LabelTensor, path, pandas DataFrame or Arrow table).

        Args:
            data: long-format answers.
            gold: gold labels used *in fitting* where the method allows it (a mapping
                task -> label, a pandas Series, a ``task, label`` table or file). Gold attached
                to a LabelTensor for evaluation is not used here.
        """
        tensor = LabelTensor.coerce(data)
        self._pandas_in = _is_pandas(data)
        gold_codes = None
        if gold is not None:
            if not self.supports_gold:
                raise ValueError(f"{type(self).__name__} does not use gold labels")
            tensor = tensor.with_gold(gold)
            gold_codes = tensor.gold
        self.tensor_ = tensor
        self.tasks_ = tensor.task_ids
        self.workers_ = tensor.worker_ids
        self.classes_ = tensor.classes
        if tensor.n_answers == 0:
            raise ValueError(f"{tensor.source or 'input'}: no answers to aggregate")
        out = self._fit(tensor, gold_codes)
        probas = np.asarray(out.pop("probas"), dtype=np.float64)
        if not np.isfinite(probas).all():  # a guard: kernels are written so this cannot happen
            raise FloatingPointError(f"{type(self).__name__} produced non-finite posteriors")
        self.probas_ = probas
        codes = out.pop("labels", None)
        self.label_codes_ = np.asarray(codes if codes is not None else probas.argmax(axis=1),
                                       dtype=np.int32)
        self.labels_ = tensor.classes[self.label_codes_]
        self.n_iter_ = int(out.pop("n_iter", 1))
        self.converged_ = bool(out.pop("converged", True))
        history = out.pop("history", None)
        self.loss_history_ = (np.asarray(history)[: self.n_iter_].tolist()
                              if history is not None else [])
        for k, v in out.items():
            setattr(self, k + "_", v)
        if self.iterative and not self.converged_:
            warnings.warn(
                f"{type(self).__name__} did not converge in {self.n_iter_} iterations "
                f"(tol={getattr(self, 'tol', None)}); raise max_iter or tol",
                ConvergenceWarning, stacklevel=2,
            )
        return self

    def fit_predict(self, data: Any, gold: Any = None) -> Any:
        """Fit and return the label per task (pandas Series for DataFrame input, else numpy)."""
        self.fit(data, gold)
        if self._pandas_in:
            import pandas as pd

            return pd.Series(self.labels_, index=pd.Index(self.tasks_, name="task"), name="agg_label")
        return self.labels_

    def fit_predict_proba(self, data: Any, gold: Any = None) -> Any:
        """Fit and return ``[tasks, classes]`` probabilities (pandas DataFrame for DataFrame input)."""
        self.fit(data, gold)
        if self._pandas_in:
            import pandas as pd

            return pd.DataFrame(self.probas_, index=pd.Index(self.tasks_, name="task"),
                                columns=pd.Index(self.classes_, name="label"))
        return self.probas_

    def result_table(self) -> pa.Table:
        """One row per task: ``task``, ``label`` and a ``p_<label>`` column per class."""
        cols: dict[str, Any] = {  # from the numpy arrays, not Python lists (10M tasks: ~1 s)
            "task": pa.array(self.tasks_),
            "label": pa.array(self.classes_.tolist()).take(pa.array(self.label_codes_)),
        }
        for k, c in enumerate(self.classes_.tolist()):
            cols[f"p_{c}"] = pa.array(self.probas_[:, k], type=pa.float64())
        return pa.table(cols)

    @classmethod
    def parameters(cls) -> list[str]:
        """Names of the constructor's parameters (the CLI passes only those it accepts)."""
        return [p for p in inspect.signature(cls.__init__).parameters if p != "self"]

    def __repr__(self) -> str:
        params = ", ".join(f"{p}={getattr(self, p)!r}" for p in self.parameters() if hasattr(self, p))
        return f"{type(self).__name__}({params})"


def as_numpy(tree: Any) -> Any:
    """Device arrays to numpy (after a kernel has run)."""
    return jax.tree_util.tree_map(np.asarray, tree)
