"""Shared fixtures: the real crowd datasets in ../shared/data, small hand-made tensors."""

from __future__ import annotations

import functools
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


@functools.cache
def real_tensors() -> tuple:
    """Every real dataset's answers (LabelTensor), in datasets_with_answers() order."""
    from crowdllm.labels import read_answers

    return tuple(read_answers(DATA / name / "answers.csv") for name in datasets_with_answers())


@pytest.fixture(scope="module")
def one_shape_per_class_count():
    """Inside a module that uses it, the real datasets with one class count and similar sizes
    (at most 4x apart) are padded to one shape (``shared_shapes``): a method compiles once per
    such group, not once per dataset. ``crowdllm bench ../shared/data/*/ -m mace,mmsr`` with
    the compile cache off: 101 s against 144 s with ``--own-shapes``, the same accuracy on all
    21 datasets (2-core host, session 13). The padding is inert
    (tests/test_aggregation_foundation.py: the same results, one compile)."""
    from crowdllm.aggregation import shared_shapes

    with shared_shapes(real_tensors()):
        yield


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not DATA.exists():
        pytest.fail(f"the shared datasets are missing: {DATA} (set CROWDLLM_DATA)")
    return DATA


# Seconds each heavy test file keeps one pytest worker busy on the 2-core CI host (session 11,
# one full run with two workers; the suite is compile-bound: two thirds of its worker time is
# XLA compiling a program per dataset shape). Files run heaviest first, so that with
# ``--dist loadfile --no-loadscope-reorder`` (tests/run.sh) the workers are not left with one
# big file each at the end while the other idles. Only the order changes; files not listed (the
# light ones, each under ~40 s) follow in collection order.
HEAVY_FILES = {
    "tests/test_classical_parity.py": 420,
    "tests/test_native.py": 375,
    "tests/inference/test_inference_vllm.py": 360,
    "tests/test_parity_crowdkit.py": 300,
    "tests/test_ebcc.py": 177,
    "tests/test_bayesian_reference.py": 166,
    "tests/test_numpyro_models.py": 160,
    "tests/test_fast_paths.py": 113,
    "tests/test_mace.py": 106,
    "tests/test_speed_harness.py": 97,
    "tests/test_aggregation_foundation.py": 96,
    "tests/test_mmsr.py": 62,
    "tests/test_sharding.py": 55,
    "tests/test_cli.py": 50,
    "tests/test_glad.py": 46,
    "tests/test_kos.py": 40,
    "tests/eval/test_eval_bench.py": 35,
    "tests/eval/test_eval_notebook.py": 30,
    "tests/test_multihost.py": 25,
    "tests/inference/test_inference_resume.py": 25,
    "tests/eval/test_eval_report.py": 22,
}


def pytest_collection_modifyitems(session, config, items):
    items.sort(key=lambda item: -HEAVY_FILES.get(item.nodeid.split("::")[0], 0))  # stable
