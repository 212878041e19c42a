r"""Zero-Based Skill (ZBS): skills learned by repeated weighted voting.

Start every worker at skill :math:`1/K + \epsilon`; at each iteration take the skill-weighted
vote, then move each skill toward the worker's agreement with it:

.. math::
    s_w \leftarrow s_w + \eta_i \,(\mathrm{acc}_w(\hat z) - s_w),

with a learning rate :math:`\eta` that starts at ``lr_init`` and is multiplied by
``lr_reduce_factor`` every ``lr_steps_to_reduce`` iterations. Stops when no skill moves by more
than ``tol`` or after ``max_iter`` iterations.

References:
    crowd-kit's ``ZeroBasedSkill`` (Toloka).
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pyarrow as pa

from ..labels import LabelTensor
from . import majority_vote
from ._core import tie_flag, CrowdData, iterate, prepare
from .base import Aggregator
from .wawa import agreement_skills

__all__ = ["ZeroBasedSkill", "ZBSState", "ZBSResult", "init", "step", "fit"]


class ZBSState(NamedTuple):
    skills: jax.Array  # [workers]
    lr: jax.Array
    it: jax.Array  # iterations done
    key: jax.Array


class ZBSResult(NamedTuple):
    posteriors: jax.Array
    labels: jax.Array
    skills: jax.Array
    n_iter: jax.Array
    converged: jax.Array
    history: jax.Array  # largest skill change per iteration


def init(data: CrowdData, key: jax.Array, lr_init: float = 1.0, eps: float = 1e-5) -> ZBSState:
    dtype = data.task_mask.dtype
    skills = data.worker_mask * (1.0 / data.n_classes + eps)
    return ZBSState(skills=skills.astype(dtype), lr=jnp.asarray(lr_init, dtype),
                    it=jnp.asarray(0, jnp.int32), key=key)


def step(data: CrowdData, state: ZBSState, *, ties: jax.Array | bool, lr_steps_to_reduce: int,
         lr_reduce_factor: float) -> tuple[ZBSState, jax.Array]:
    """One vote-then-update round; the objective is minus the largest skill change."""
    it = state.it + 1
    lr = jnp.where(it % lr_steps_to_reduce == 0, state.lr * lr_reduce_factor, state.lr)
    key, sub = jax.random.split(state.key)
    mv = majority_vote.weighted_vote(data, state.skills, sub, ties)
    acc = agreement_skills(data, mv.labels)
    skills = state.skills + lr * (acc - state.skills)
    change = jnp.max(jnp.abs(skills - state.skills))
    return ZBSState(skills=skills, lr=lr, it=it, key=key), -change


@functools.partial(jax.jit, static_argnames=("max_iter", "lr_steps_to_reduce"))
def fit(data: CrowdData, key: jax.Array, *, ties: jax.Array | bool = True, max_iter: int = 100,
        tol: float = 1e-6, lr_init: float = 1.0, lr_steps_to_reduce: int = 20,
        lr_reduce_factor: float = 0.5, eps: float = 1e-5) -> ZBSResult:
    k_init, k_final = jax.random.split(key)
    state = init(data, k_init, lr_init, eps)
    state, loop = iterate(
        functools.partial(step, data, ties=ties, lr_steps_to_reduce=lr_steps_to_reduce,
                          lr_reduce_factor=lr_reduce_factor),
        state, max_iter=max_iter, tol=tol, converged=lambda prev, obj: -obj < tol)
    res = majority_vote.weighted_vote(data, state.skills, k_final, ties)
    return ZBSResult(posteriors=res.posteriors, labels=res.labels, skills=state.skills,
                     n_iter=loop.n_iter, converged=loop.converged, history=-loop.history)


class ZeroBasedSkill(Aggregator):
    """Zero-Based Skill: vote weighted by skills learned from repeated voting."""

    name = "zbs"
    description = "Zero-Based Skill: skill-weighted vote, skills learned by repeated voting"
    supports_gold = True
    iterative = True

    def __init__(self, max_iter: int = 100, tol: float = 1e-6, lr_init: float = 1.0,
                 lr_steps_to_reduce: int = 20, lr_reduce_factor: float = 0.5, eps: float = 1e-5,
                 ties: str = "random", seed: int = 0, layout: str = "auto") -> None:
        self.max_iter, self.tol = max_iter, tol
        self.lr_init, self.lr_steps_to_reduce, self.lr_reduce_factor = lr_init, lr_steps_to_reduce, lr_reduce_factor
        tie_flag(ties)  # validates
        self.eps, self.ties, self.seed, self.layout = eps, ties, seed, layout

    def _fit(self, tensor: LabelTensor, gold: np.ndarray | None) -> dict[str, Any]:
        data = prepare(tensor, layout=self.layout, gold=gold)
        res = fit(data, jax.random.key(self.seed), ties=tie_flag(self.ties), max_iter=self.max_iter,
                  tol=self.tol, lr_init=self.lr_init, lr_steps_to_reduce=self.lr_steps_to_reduce,
                  lr_reduce_factor=self.lr_reduce_factor, eps=self.eps)
        n = tensor.n_tasks
        return {"probas": np.asarray(res.posteriors)[:n], "labels": np.asarray(res.labels)[:n],
                "skills": np.asarray(res.skills)[: tensor.n_workers], "n_iter": int(res.n_iter),
                "converged": bool(res.converged), "history": np.asarray(res.history)}

    def skills_table(self) -> pa.Table:
        return pa.table({"worker": pa.array(self.workers_.tolist()),
                         "skill": pa.array(self.skills_, type=pa.float64())})
