"""Inference: LLM backends, prompts and label schemas, the annotation runner, the ledger."""
