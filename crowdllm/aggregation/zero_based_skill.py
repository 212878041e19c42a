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
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pyarrow as pa

from ..labels import LabelTensor
from . import _native, majority_vote
from ._core import tie_flag, CrowdData, iterate, prepare
from .base import Aggregator
from .wawa import agreement_skills

__all__ = ["ZeroBasedSkill", "ZBSState", "ZBSResult", "init", "step", "fit", "run",
           "vote_agreement"]


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


def vote_agreement(data: CrowdData, skills: jax.Array, key: jax.Array,
                   ties: jax.Array | bool) -> jax.Array:
    """Each worker's agreement with the ``skills``-weighted vote (ties broken with ``key``)."""
    return agreement_skills(data, majority_vote.weighted_vote(data, skills, key, ties).labels)


def step(data: CrowdData, state: ZBSState, *, ties: jax.Array | bool, lr_steps_to_reduce: int,
         lr_reduce_factor: float, agreement: Callable[[jax.Array, jax.Array], jax.Array] | None
         = None) -> tuple[ZBSState, jax.Array]:
    """One vote-then-update round; the objective is minus the largest skill change.
    ``agreement(skills, key)``: :func:`vote_agreement` (the default) or a pass computing the
    same (the native kernel's, ``_native.zbs_fit``)."""
    it = state.it + 1
    lr = jnp.where(it % lr_steps_to_reduce == 0, state.lr * lr_reduce_factor, state.lr)
    key, sub = jax.random.split(state.key)
    if agreement is None:
        acc = vote_agreement(data, state.skills, sub, ties)
    else:
        acc = agreement(state.skills, sub)
    skills = state.skills + lr * (acc - state.skills)
    change = jnp.max(jnp.abs(skills - state.skills))
    return ZBSState(skills=skills, lr=lr, it=it, key=key), -change


@functools.partial(jax.jit, static_argnames=("max_iter", "lr_steps_to_reduce"))
def fit(data: CrowdData, key: jax.Array, *, ties: jax.Array | bool = True, max_iter: int = 100,
        tol: float = 1e-6, lr_init: float = 1.0, lr_steps_to_reduce: int = 20,
        lr_reduce_factor: float = 0.5, eps: float = 1e-5) -> ZBSResult:
    return run(data, key, None, None, ties=ties, max_iter=max_iter, tol=tol, lr_init=lr_init,
               lr_steps_to_reduce=lr_steps_to_reduce, lr_reduce_factor=lr_reduce_factor, eps=eps)


def run(data: CrowdData, key: jax.Array, agreement: Callable[[jax.Array, jax.Array], jax.Array]
        | None, vote: Callable[[jax.Array, jax.Array], tuple[jax.Array, jax.Array]] | None, *,
        ties: jax.Array | bool, max_iter: int, tol: float, lr_init: float,
        lr_steps_to_reduce: int, lr_reduce_factor: float, eps: float) -> ZBSResult:
    """:func:`fit`'s body (traced inside a jit), each round's agreements from ``agreement``
    (:func:`step`), the last vote's ``(posteriors, labels)`` from ``vote(skills, key)`` (None:
    ``majority_vote.weighted_vote``'s)."""
    k_init, k_final = jax.random.split(key)
    state = init(data, k_init, lr_init, eps)
    state, loop = iterate(
        functools.partial(step, data, ties=ties, lr_steps_to_reduce=lr_steps_to_reduce,
                          lr_reduce_factor=lr_reduce_factor, agreement=agreement),
        state, max_iter=max_iter, tol=tol, converged=lambda prev, obj: -obj < tol)
    if vote is None:
        res = majority_vote.weighted_vote(data, state.skills, k_final, ties)
        post, labels = res.posteriors, res.labels
    else:
        post, labels = vote(state.skills, k_final)
    return ZBSResult(posteriors=post, labels=labels, skills=state.skills,
                     n_iter=loop.n_iter, converged=loop.converged, history=-loop.history)


class ZeroBasedSkill(Aggregator):
    """Zero-Based Skill: vote weighted by skills learned from repeated voting.

    Args:
        max_iter, tol: the most rounds; stop when no skill moves by more than ``tol``.
        lr_init, lr_steps_to_reduce, lr_reduce_factor: the learning rate, multiplied by
            ``lr_reduce_factor`` every ``lr_steps_to_reduce`` rounds.
        eps: the start's skills are ``1 / K + eps``.
        ties: ``random`` (seeded by ``seed``) or ``lowest``, as for :class:`MajorityVote`.
        layout: ``auto``, ``coo`` or ``dense``.
        native: ``auto`` (default): with random ties, on the dense layout, in float32 on a CPU
            with AVX2 and a C++ compiler, each round's vote and agreement counts run as one
            native pass over the tasks' annotator-group codes (:mod:`._native`); elsewhere XLA.
            ``on``: the native pass or an error saying why it cannot run (with
            ``ties="lowest"`` it cannot: see ``_native.hard_vote_sums``); ``off``: XLA. Both
            draw the same ties and give the same result.
    """

    name = "zbs"
    description = "Zero-Based Skill: skill-weighted vote, skills learned by repeated voting"
    supports_gold = True
    iterative = True

    def __init__(self, max_iter: int = 100, tol: float = 1e-6, lr_init: float = 1.0,
                 lr_steps_to_reduce: int = 20, lr_reduce_factor: float = 0.5, eps: float = 1e-5,
                 ties: str = "random", seed: int = 0, layout: str = "auto",
                 native: str = "auto") -> None:
        self.max_iter, self.tol = max_iter, tol
        self.native = _native.check_option(native)
        self.lr_init, self.lr_steps_to_reduce, self.lr_reduce_factor = lr_init, lr_steps_to_reduce, lr_reduce_factor
        tie_flag(ties)  # validates
        self.eps, self.ties, self.seed, self.layout = eps, ties, seed, layout

    def _fit(self, tensor: LabelTensor, gold: np.ndarray | None) -> dict[str, Any]:
        data = prepare(tensor, layout=self.layout, gold=gold)
        args = dict(max_iter=self.max_iter, tol=self.tol, lr_init=self.lr_init,
                    lr_steps_to_reduce=self.lr_steps_to_reduce,
                    lr_reduce_factor=self.lr_reduce_factor, eps=self.eps)
        self.native_used_ = _native.use_for_votes(self.native, self.ties, data)
        if self.native_used_:
            res = _native.zbs_fit(data, jax.random.key(self.seed), **args)
        else:
            res = fit(data, jax.random.key(self.seed), ties=tie_flag(self.ties), **args)
        n = tensor.n_tasks
        return {"probas": np.asarray(res.posteriors)[:n], "labels": np.asarray(res.labels)[:n],
                "skills": np.asarray(res.skills)[: tensor.n_workers], "n_iter": int(res.n_iter),
                "converged": bool(res.converged), "history": np.asarray(res.history)}

    def skills_table(self) -> pa.Table:
        return pa.table({"worker": pa.array(self.workers_.tolist()),
                         "skill": pa.array(self.skills_, type=pa.float64())})
