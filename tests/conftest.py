"""Shared fixtures: the real crowd datasets in ../shared/data, small hand-made tensors."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("CROWDLLM_DATA", ROOT.parent / "shared" / "data"))


def datasets_with_answers() -> list[str]:
    """Names of the datasets in ../shared/data that have answers.csv (sorted)."""
    if not DATA.exists():
        return []
    return sorted(p.name for p in DATA.iterdir() if (p / "answers.csv").exists())


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not DATA.exists():
        pytest.fail(f"the shared datasets are missing: {DATA} (set CROWDLLM_DATA)")
    return DATA
