"""crowdllm: a crowd of small open LLMs (and humans) as one high-quality annotator.

The label tensor (:mod:`crowdllm.labels`) goes into truth-inference kernels
(:mod:`crowdllm.aggregation`); evaluation and cost live in :mod:`crowdllm.eval`; the LLM panel
that produces labels lives in :mod:`crowdllm.inference`.
"""

from .aggregation import (METHODS, Aggregator, DawidSkene, MajorityVote, OneCoinDawidSkene, Wawa,
                          ZeroBasedSkill, get_method)
from .labels import CrowdDataError, LabelTensor, read_answers, read_gold, read_table, write_table

__version__ = "0.1.0"

__all__ = [
    "LabelTensor", "CrowdDataError", "read_answers", "read_gold", "read_table", "write_table",
    "METHODS", "Aggregator", "get_method", "MajorityVote", "Wawa", "ZeroBasedSkill",
    "DawidSkene", "OneCoinDawidSkene", "__version__",
]
