"""Evaluation: metrics, agreement, cost, reports and plots, the aggregator benchmark.

* :mod:`~crowdllm.eval.metrics`: accuracy, confusion, per-class P/R/F1, macro / weighted F1;
* :mod:`~crowdllm.eval.agreement`: Cohen's kappa (every pair), Fleiss' kappa, Krippendorff's alpha;
* :mod:`~crowdllm.eval.evaluate`: the table of annotators and aggregation methods on gold;
* :mod:`~crowdllm.eval.cost`: tokens and money from a run's ledger, the cost-accuracy frontier;
* :mod:`~crowdllm.eval.hybrid`: aggregate groups of annotators (LLMs, humans) alone and together;
* :mod:`~crowdllm.eval.plots` and :mod:`~crowdllm.eval.report`: figures and the report folder;
* :mod:`~crowdllm.eval.bench`: every registered aggregator over every dataset folder.

Plots and reports import matplotlib only when called.
"""

from .agreement import cohen_kappa, fleiss_kappa, krippendorff_alpha, pairwise_kappa
from .bench import run_bench
from .cost import PriceTable, cost_accuracy_frontier, ledger_cost, load_prices
from .evaluate import Evaluation, evaluate, group_table, run_method
from .hybrid import combine, split_by_patterns, subset_table
from .metrics import (accuracy, classification_summary, confusion_matrix, macro_f1,
                      precision_recall_f1, weighted_f1)
from .run import Run, load_run, read_ledger

__all__ = [
    "accuracy", "confusion_matrix", "precision_recall_f1", "macro_f1", "weighted_f1",
    "classification_summary", "cohen_kappa", "pairwise_kappa", "fleiss_kappa",
    "krippendorff_alpha", "evaluate", "Evaluation", "group_table", "run_method", "PriceTable",
    "load_prices", "ledger_cost", "cost_accuracy_frontier", "combine", "split_by_patterns",
    "subset_table", "run_bench", "Run", "load_run", "read_ledger",
]
