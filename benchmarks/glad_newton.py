#!/usr/bin/env python
"""GLAD's M-step: the Adam steps it has (``glad.fit``) against a per-coordinate Newton step,
on every real dataset with gold labels. A measured answer to "would a Newton M-step make GLAD
fast enough to be near the memory floor?", kept so the figures can be reproduced.

Why ask: GLAD's native iteration is ~7 passes over the answers (the E pass, ``m_steps=5`` Adam
gradient passes and the Q check), each computing an exp per answer: compute-bound at ~20x the
memory floor (benchmarks/RESULTS.md). Given the posteriors, Q splits over the tasks for a fixed
alpha and over the annotators for a fixed beta, so one pass could take a Newton step on every
``b_t`` (its row is in cache) and sum alpha's gradient and curvature, which would make an
iteration ~2 passes.

The step tried here (XLA, not fused: only its path is measured, not its speed): Fisher scoring
on ``b_t`` (curvature ``sum_w sigma(1 - sigma) x^2 + 1``), each task's step divided by 4 until
its own Q does not fall (at most 4 times, else it stays), then the same on ``alpha_w`` at the
new ``b`` (exact curvature: Q is concave in alpha); ``--caps`` also bounds each step's size.
Each M-step is one such sweep. Prints, per dataset, the EM iterations to the stopping rule
(``tol=1e-5``), the final objective and the accuracy, for Adam and for each cap, beside
crowd-kit's recorded accuracy (``tests/reference/crowdkit_classical.json``):

    python benchmarks/glad_newton.py --caps none,0.25

Session 23, on the AMD VM: Newton needs 355 iterations over the 21 datasets against Adam's
596, and ends at the same objective (to 1e-4 per answer) on 19 of them; on li_quiz_chinese and
li_quiz_pokemon (24 and 20 gold tasks) it reaches a lower optimum (-1.4617 against -1.4593,
-1.6639 against -1.6532), the one crowd-kit's conjugate gradient also finds, and the mean
accuracy falls from .7963 to .7874, below crowd-kit's .7875 (with a 0.25 cap: .7913 in 414
iterations). Fused, an iteration would still compute ~2 exps an answer (sigma at the old and
at the new b_t) besides the E-step's: at the gradient pass's measured 2.0-2.8 ms (two threads,
1M x 12 x 5), an estimated 3-5x the floor (not built). Worse optima on two small quizzes for a
kernel that would still miss 3x: GLAD stays on Adam.

Fewer Adam steps an M-step (``--adam-steps 5,2,1 --caps '' --max-iter 2000``, session 29, the
Zen 4 host): a native iteration of m steps costs m gradient passes plus the E pass (which is
also the Q check, ~2.6 gradient passes), so 1 or 2 steps would make each iteration 2-2.5x
cheaper than 5. But over the 21 datasets EM then needs 1,983 iterations (m_steps=1) and 1,200
(m_steps=2) against 592, i.e. ~1.6x and ~1.2x the passes in all, and stops at a lower objective
(by more than 1e-4 an answer) on 14 and 5 of the datasets, li_quiz_medicine by 0.050 with one
step; mean accuracy .7947 (1 step), .7964 (2) against .7963 (5). GLAD keeps m_steps=5.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SCALES = (1.0, 0.25, 1 / 16, 1 / 64)  # the step's tries, as adam_steps' retries


def _newton_m_step(data, params, post, mu_alpha: float, mu_beta: float, cap: float | None):
    from crowdllm.aggregation import glad

    view = glad.answer_view(data)
    p = glad.gather_posterior(data, post, view)
    wt = view.weight

    def q_terms(x):  # p log sigma(x) + (1 - p) log sigma(-x), weighted
        return (jax.nn.log_sigmoid(x) - (1 - p) * x) * wt

    def line(old, step, lo, hi, q_of, keep):
        """The first of SCALES whose Q (per coordinate) is not below the old one's."""
        q0 = q_of(old)
        new, done = old, jnp.zeros(old.shape, bool)
        for s in SCALES:
            cand = jnp.clip(old + s * step, lo, hi)
            ok = ~done & (q_of(cand) >= q0)
            new, done = jnp.where(ok, cand, new), done | ok
        return jnp.where(keep, new, old)

    def bounded(d):
        return d if cap is None else jnp.clip(d, -cap, cap)

    a, b = params
    # difficulties: each task's Q given alpha
    x = a[view.worker] * jnp.exp(b)[view.task]
    s = jax.nn.sigmoid(x)
    g = glad.task_sum(data, (p - s) * x * wt) - (b - mu_beta)
    h = glad.task_sum(data, s * (1 - s) * x * x * wt) + 1.0
    b = line(b, bounded(g / h), glad.LOG_BETA_MIN, glad.LOG_BETA_MAX,
             lambda c: glad.task_sum(data, q_terms(a[view.worker] * jnp.exp(c)[view.task]))
             - 0.5 * (c - mu_beta) ** 2, data.task_mask > 0)
    # expertise: each annotator's Q given the new difficulties
    e = jnp.exp(b)[view.task]
    x = a[view.worker] * e
    s = jax.nn.sigmoid(x)
    g = glad.worker_sum(data, (p - s) * e * wt) - (a - mu_alpha)
    h = glad.worker_sum(data, s * (1 - s) * e * e * wt) + 1.0
    a = line(a, bounded(g / h), -glad.ALPHA_MAX, glad.ALPHA_MAX,
             lambda c: glad.worker_sum(data, q_terms(c[view.worker] * e))
             - 0.5 * (c - mu_alpha) ** 2, data.worker_mask > 0)
    return glad.GladParams(a, b)


@functools.partial(jax.jit, static_argnames=("max_iter", "cap"))
def fit_newton(data, max_iter: int = 100, tol: float = 1e-5, cap: float | None = None):
    """GLAD by EM with the Newton M-step above (uniform class prior, mu = 1, as GLAD())."""
    from crowdllm.aggregation import glad
    from crowdllm.aggregation._core import iterate

    def step(state):
        post, ll, _, _ = glad._e_parts(data, state.params, state.log_prior)
        obj = (ll + glad.log_prior_density(data, state.params, 1.0, 1.0)) / glad.n_answers(data)
        prm = _newton_m_step(data, state.params, post, 1.0, 1.0, cap)
        return state._replace(params=prm, posteriors=post), obj

    state, loop = iterate(step, glad.init(data), max_iter=max_iter, tol=tol)
    post, _ = glad.e_step(data, state.params, state.log_prior)
    return post, loop.n_iter, loop.objective


def main(argv: list[str] | None = None) -> int:
    from crowdllm.aggregation import glad
    from crowdllm.aggregation._core import prepare
    from crowdllm.eval import speed
    from crowdllm.labels import LabelTensor

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--caps", default="none,0.25",
                    help="comma-separated step bounds for the Newton runs ('none': unbounded; "
                         "'': no Newton run)")
    ap.add_argument("--adam-steps", default="5",
                    help="comma-separated m_steps of the Adam runs (GLAD's default: 5)")
    ap.add_argument("--max-iter", type=int, default=100, help="EM iterations at most, every run")
    a = ap.parse_args(argv)
    caps = [None if c == "none" else float(c) for c in a.caps.split(",") if c]
    steps = [int(m) for m in a.adam_steps.split(",") if m]
    print(f"machine: {speed.machine()}")
    ref = json.loads((ROOT / "tests" / "reference" / "crowdkit_classical.json").read_text())["glad"]
    names = sorted(p.name for p in Path(a.data).iterdir()
                   if (p / "answers.csv").exists() and (p / "gold.csv").exists())
    runs = [f"adam m_steps {m}" for m in steps] + [f"newton cap {c}" for c in caps]
    head = "".join(f" | {r:>22s}" for r in runs)
    print(f"{'dataset':26s}{head} | crowd-kit")
    print(f"{'':26s}" + " | {:>5s} {:>9s} {:>6s}".format("iters", "objective", "acc") * len(runs))
    acc = {r: [] for r in runs}
    iters = {r: 0 for r in runs}
    for name in names:
        t = LabelTensor.coerce(Path(a.data) / name / "answers.csv").with_gold(
            Path(a.data) / name / "gold.csv")
        data = prepare(t, layout="auto", gold=None, dtype=jnp.float32)
        mask = t.gold >= 0
        cells = []
        outs = []
        for m in steps:
            res = glad.fit(data, max_iter=a.max_iter, tol=1e-5, m_steps=m)
            outs.append((f"adam m_steps {m}", res.posteriors, res.n_iter, res.objective))
        outs += [(f"newton cap {c}", *fit_newton(data, max_iter=a.max_iter, tol=1e-5, cap=c))
                 for c in caps]
        for run, post, n_iter, obj in outs:
            hit = float((np.asarray(post)[:t.n_tasks].argmax(1)[mask] == t.gold[mask]).mean())
            acc[run].append(hit)
            iters[run] += int(n_iter)
            cells.append(f" | {int(n_iter):5d} {float(obj):9.5f} {hit:6.4f}")
        ck = ref.get(name, {}).get("accuracy", float("nan"))
        print(f"{name:26s}{''.join(cells)} | {ck:.4f}", flush=True)
    ck_mean = np.mean([ref[n]["accuracy"] for n in names if "accuracy" in ref.get(n, {})])
    print(f"{'mean accuracy':26s}" + "".join(f" | {'':15s} {np.mean(acc[r]):6.4f}" for r in runs)
          + f" | {ck_mean:.4f}")
    print(f"{'iterations, all datasets':26s}" + "".join(f" | {iters[r]:5d} {'':16s}" for r in runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
