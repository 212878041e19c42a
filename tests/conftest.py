"""Shared fixtures: the real crowd datasets in ../shared/data, small hand-made tensors."""

from __future__ import annotations

import contextlib
import functools
import math
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
    """Inside a module that uses it, the real datasets with one class count (and layout) are
    padded to one shape (``shared_shapes`` with no size limit): a method compiles once per
    class count, not once per dataset. The padding is inert (tests/test_aggregation_foundation.py:
    the same results, one compile); it costs run time on the small crowds, which is less than
    the compiles it saves for every method but EBCC, whose 40 restarts run within the default
    4x limit (tests/test_bayesian_reference.py). The three modules that use it, two workers:
    256.7 s against 318.7 s with the 4x limit (session 14, one run each, side by side).

    The panels (the datasets ``auto`` lays out dense) get their shapes from each other only: in
    one block with the others, a 25-task quiz was padded to the 20,480 rows of the largest
    dataset with its class count, which runs on COO and never uses that dense shape (no compile
    saved; EBCC's six panel fits 12.5 -> 1.0 s of run time, GLAD's 10.3 -> 3.0 s with their
    compiles, session 17). In two nested blocks, ``prepare`` pads each crowd to the smallest
    shared shape that holds it, so the panels keep theirs and the COO crowds are unchanged."""
    with real_shared_shapes():
        yield


@contextlib.contextmanager
def real_shared_shapes():
    """The block :func:`one_shape_per_class_count` runs its module in (also used by
    ``benchmarks/shared_shape_programs.py``): the real datasets' panels and sparse crowds each
    in their own ``shared_shapes``, with no padding limit."""
    from crowdllm.aggregation import shared_shapes
    from crowdllm.aggregation._core import choose_layout

    panels = [t for t in real_tensors() if choose_layout(t, "auto") == "dense"]
    rest = [t for t in real_tensors() if choose_layout(t, "auto") != "dense"]
    with shared_shapes(rest, max_pad=math.inf), shared_shapes(panels, max_pad=math.inf):
        yield


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not DATA.exists():
        pytest.fail(f"the shared datasets are missing: {DATA} (set CROWDLLM_DATA)")
    return DATA


# Seconds each heavy test file keeps one pytest worker busy on the 2-core CI host (session 26:
# the sums of every test's durations in one full run with two workers, warm caches; the suite is
# compile-bound: about 60 % of its worker time is XLA compiling a program per method and
# shape). Files run heaviest first, so that with ``--dist loadfile --no-loadscope-reorder``
# (tests/run.sh) the workers are not left with one big file each at the end while the other
# idles. Only the order changes; files not listed (the light ones, each under ~12 s) follow in
# collection order.
HEAVY_FILES = {
    "tests/test_native.py": 510,
    "tests/inference/test_inference_vllm.py": 202,
    "tests/test_speed_harness.py": 176,
    "tests/test_ebcc.py": 146,
    "tests/test_parity_crowdkit.py": 143,
    "tests/test_classical_parity.py": 126,
    "tests/test_fast_paths.py": 120,
    "tests/test_aggregation_foundation.py": 101,
    "tests/test_sharding.py": 100,
    "tests/test_mace.py": 74,
    "tests/test_bayesian_reference.py": 48,
    "tests/test_mmsr.py": 47,
    "tests/test_numpyro_models.py": 45,
    "tests/test_cli.py": 41,
    "tests/test_ibcc.py": 32,
    "tests/test_glad.py": 27,
    "tests/inference/test_inference_resume.py": 24,
    "tests/test_kos.py": 23,
    "tests/eval/test_eval_bench.py": 22,
    "tests/eval/test_eval_notebook.py": 17,
    "tests/test_multihost.py": 14,
    "tests/inference/test_inference_fake_server.py": 13,
}


def pytest_collection_modifyitems(session, config, items):
    items.sort(key=lambda item: -HEAVY_FILES.get(item.nodeid.split("::")[0], 0))  # stable
