"""Inference: LLM backends, prompts and label schemas, the annotation runner, the ledger.

``crowdllm annotate ITEMS --panel PANEL.toml --out RUN_DIR`` (see :mod:`.runner`) asks every
annotator of a panel (:mod:`.panel`) to label every item under a label schema
(:mod:`.schema`), through vLLM's offline engine or any OpenAI-compatible server
(:mod:`.backends`), and appends each final answer to an append-only ledger (:mod:`.ledger`).
"""

from .ledger import Ledger
from .panel import AnnotatorSpec, Panel, load_panel
from .runner import Item, annotate, export_run, load_run, read_items
from .schema import CODA19, LabelSchema, load_schema, parse_answer, prompt_version

__all__ = ["Ledger", "AnnotatorSpec", "Panel", "load_panel", "Item", "annotate", "export_run", "load_run",
           "read_items", "CODA19", "LabelSchema", "load_schema", "parse_answer", "prompt_version"]
