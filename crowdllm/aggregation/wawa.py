r"""Wawa: worker agreement with aggregate.

Each worker's skill is the share of their answers that agree with the majority vote; the final
labels are a vote weighted by those skills:

.. math::
    s_w = \frac{\#\{(t, w, l): l = \hat z^{MV}_t\}}{\#\{(t, w, l)\}}, \qquad
    \hat z_t = \arg\max_k \sum_{(t,w,l)} s_w [l = k].

With gold labels, the gold tasks' reference label is the gold one (skills are measured against
the truth where it is known), and those tasks' outputs are clamped.

References:
    Appen (CrowdFlower), "Worker agreement with aggregate" (Wawa); crowd-kit's ``Wawa``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pyarrow as pa

from ..labels import LabelTensor
from . import _native, majority_vote
from ._core import tie_flag, CrowdData, prepare, worker_count, worker_hits
from .base import Aggregator

__all__ = ["Wawa", "WawaResult", "fit", "agreement_skills"]


class WawaResult(NamedTuple):
    posteriors: jax.Array
    labels: jax.Array
    skills: jax.Array  # [workers]


def agreement_skills(data: CrowdData, labels: jax.Array) -> jax.Array:
    """Share of each worker's answers equal to ``labels[task]`` (0 for a worker with none)."""
    hits = worker_hits(data, labels, data.task_mask.dtype)
    n = worker_count(data, hits.dtype)
    return jnp.where(n > 0, hits / jnp.maximum(n, 1), 0.0)


@jax.jit
def fit(data: CrowdData, key: jax.Array, ties: jax.Array | bool = True) -> WawaResult:
    k1, k2 = jax.random.split(key)
    mv = majority_vote.vote(data, k1, ties)
    skills = agreement_skills(data, mv.labels)
    res = majority_vote.weighted_vote(data, skills, k2, ties)
    return WawaResult(posteriors=res.posteriors, labels=res.labels, skills=skills)


class Wawa(Aggregator):
    """Worker agreement with aggregate: a vote weighted by each worker's agreement with MV.

    Args:
        ties: ``random`` (seeded by ``seed``) or ``lowest``, as for :class:`MajorityVote`.
        layout: ``auto``, ``coo`` or ``dense``.
        native: ``auto`` (default): with random ties, on the dense layout, in float32 on a CPU
            with AVX2 and a C++ compiler, the majority vote and the agreements are one native
            pass and the weighted vote another (``_native.wawa_fit``, as ZBS's rounds);
            elsewhere XLA. ``on``: native or an error saying why not (``ties="lowest"``
            cannot); ``off``: XLA. Both draw the same ties and give the same result.
    """

    name = "wawa"
    description = "Wawa: vote weighted by each worker's agreement with the majority vote"
    supports_gold = True

    def __init__(self, ties: str = "random", seed: int = 0, layout: str = "auto",
                 native: str = "auto") -> None:
        tie_flag(ties)  # validates
        self.native = _native.check_option(native)
        self.ties = ties
        self.seed = seed
        self.layout = layout

    def _fit(self, tensor: LabelTensor, gold: np.ndarray | None) -> dict[str, Any]:
        data = prepare(tensor, layout=self.layout, gold=gold)
        self.native_used_ = _native.use_for_votes(self.native, self.ties, data)
        if self.native_used_:
            res = _native.wawa_fit(data, jax.random.key(self.seed))
        else:
            res = fit(data, jax.random.key(self.seed), ties=tie_flag(self.ties))
        n = tensor.n_tasks
        return {"probas": np.asarray(res.posteriors)[:n], "labels": np.asarray(res.labels)[:n],
                "skills": np.asarray(res.skills)[: tensor.n_workers]}

    def skills_table(self) -> pa.Table:
        return pa.table({"worker": pa.array(self.workers_.tolist()),
                         "skill": pa.array(self.skills_, type=pa.float64())})
