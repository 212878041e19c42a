r"""Dawid-Skene and IBCC as NumPyro models, for full posteriors by NUTS or SVI on small data.

Both are the same generative story with different priors:

.. math::
    \rho \sim \mathrm{Dir}(\alpha), \quad \pi^{(w)}_{k\cdot} \sim \mathrm{Dir}(\beta_{k\cdot}), \quad
    z_t \sim \mathrm{Cat}(\rho), \quad y_{tw} \mid z_t = k \sim \mathrm{Cat}(\pi^{(w)}_{k\cdot}).

* **Dawid-Skene** (:func:`dawid_skene`): flat priors, :math:`\alpha = \mathbf 1`,
  :math:`\beta = \mathbf 1` - the posterior is proportional to Dawid & Skene's likelihood.
* **IBCC** (:func:`ibcc`): :math:`\alpha` and :math:`\beta_{kl} = b + (a - b)[k = l]` as in
  :mod:`.ibcc` (reference: :math:`a = 4, b = 1`).

The discrete true labels are enumerated out: the model scores each task's classes,
:math:`s_{tk} = \log\rho_k + \sum_{(t,w,l)} \log\pi^{(w)}_{kl}`, and adds
:math:`\sum_t \log\sum_k e^{s_{tk}}` to the log density (gold tasks: :math:`s_{t,\text{gold}}`), so
NUTS and SVI see only the continuous :math:`\rho, \pi`. After sampling, each draw's class
posteriors :math:`\mathrm{softmax}(s_t)` are averaged (Rao-Blackwellised). With ``label=None`` the
model instead *samples* :math:`z` and :math:`y` from the story (used to make test data).

:class:`BayesianDawidSkene` (``ds-bayes``) is the class shell for the Dawid-Skene model; the
IBCC model is reached through :class:`~crowdllm.aggregation.IBCC` with ``inference="nuts"`` or
``"svi"``. Both give ``credible_``: a ``[workers, 2]`` 95 % credible interval on each
annotator's accuracy :math:`\sum_k \rho_k \pi^{(w)}_{kk}`.

References:
    A. P. Dawid and A. M. Skene. Maximum likelihood estimation of observer error-rates using the
    EM algorithm. JRSS C, 1979.
    H.-C. Kim and Z. Ghahramani. Bayesian classifier combination. AISTATS 2012.
    M. D. Hoffman and A. Gelman. The No-U-Turn sampler. JMLR 2014.
    B. Carpenter et al. (Stan User's Guide, "Latent discrete parameters": the Dawid-Skene model
    with the true labels marginalised out.)

Example:
    >>> from crowdllm.aggregation import IBCC
    >>> model = IBCC(inference="nuts", num_samples=500)
    >>> model.fit("answers.csv")  # doctest: +SKIP
    >>> model.credible_  # 95 % interval on each annotator's accuracy  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import pyarrow as pa

from ..labels import LabelTensor
from .base import Aggregator

__all__ = ["crowd_model", "dawid_skene", "ibcc", "class_scores", "run_nuts", "run_svi",
           "posterior_summary", "fit_aggregator", "BayesianDawidSkene"]


def class_scores(rho: jax.Array, pi: jax.Array, task: jax.Array, worker: jax.Array,
                 label: jax.Array, n_tasks: int, gold: jax.Array | None = None) -> jax.Array:
    """``[tasks, K]`` log rho_k + sum over answers of log pi[w, k, l]; gold tasks: other classes -inf."""
    log_pi = jnp.log(jnp.clip(pi, 1e-30))
    per_answer = log_pi[worker, :, label]  # [answers, K]
    s = jnp.log(jnp.clip(rho, 1e-30))[None] + jax.ops.segment_sum(per_answer, task, num_segments=n_tasks)
    if gold is not None:
        K = s.shape[1]
        allowed = (gold < 0)[:, None] | (gold[:, None] == jnp.arange(K)[None])
        s = jnp.where(allowed, s, -jnp.inf)
    return s


def crowd_model(task, worker, label, *, n_tasks: int, n_workers: int, n_classes: int,
                alpha: float = 1.0, beta_diag: float = 1.0, beta_off: float = 1.0,
                gold=None) -> None:
    """The shared NumPyro model (see the module docstring); ``label=None`` samples answers."""
    import numpyro
    import numpyro.distributions as dist

    K = n_classes
    rho = numpyro.sample("rho", dist.Dirichlet(jnp.full((K,), float(alpha))))
    beta = jnp.eye(K) * (beta_diag - beta_off) + beta_off
    with numpyro.plate("workers", n_workers, dim=-2), numpyro.plate("true_class", K, dim=-1):
        pi = numpyro.sample("pi", dist.Dirichlet(beta))  # [W, K, L]
    task = jnp.asarray(task)
    worker = jnp.asarray(worker)
    if label is None:  # the generative story: sample z, then every answer
        with numpyro.plate("tasks", n_tasks):
            z = numpyro.sample("z", dist.Categorical(rho))
        with numpyro.plate("answers", task.shape[0]):
            numpyro.sample("y", dist.Categorical(pi[worker, z[task]]))
        return
    s = class_scores(rho, pi, task, worker, jnp.asarray(label), n_tasks,
                     None if gold is None else jnp.asarray(gold))
    numpyro.factor("answers", jax.nn.logsumexp(s, axis=1).sum())


def dawid_skene(task, worker, label, *, n_tasks: int, n_workers: int, n_classes: int,
                gold=None) -> None:
    """Dawid-Skene with flat Dirichlet(1) priors (posterior proportional to the likelihood)."""
    crowd_model(task, worker, label, n_tasks=n_tasks, n_workers=n_workers, n_classes=n_classes,
                gold=gold)


def ibcc(task, worker, label, *, n_tasks: int, n_workers: int, n_classes: int, alpha: float = 1.0,
         beta_diag: float = 4.0, beta_off: float = 1.0, gold=None) -> None:
    """IBCC: Dirichlet(alpha) class proportions, Dirichlet(beta) confusion rows."""
    crowd_model(task, worker, label, n_tasks=n_tasks, n_workers=n_workers, n_classes=n_classes,
                alpha=alpha, beta_diag=beta_diag, beta_off=beta_off, gold=gold)


def run_nuts(model: Callable, args: tuple, kwargs: dict, *, num_warmup: int, num_samples: int,
             seed: int, progress_bar: bool) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """NUTS draws of the model's continuous sites, plus diagnostics (split R-hat, divergences).

    NUTS (NumPyro's, with its defaults: step size and diagonal mass matrix adapted during the
    warm-up, target acceptance 0.8) on the potential energy of the model's unconstrained sites,
    driven through NumPyro's functional ``hmc`` API rather than ``MCMC``: ``MCMC`` finds the
    initial point and the initial state by running the model op by op, each op compiled on its
    own; here each is one jitted program (IBCC's NUTS test fit, 80 tasks x 6 annotators: 24.5
    -> 10.2 s on the 2-core host, session 15).
    """
    from numpyro.diagnostics import split_gelman_rubin
    from numpyro.infer.hmc import hmc
    from numpyro.infer.util import constrain_fn, initialize_model, potential_energy
    from numpyro.util import fori_collect

    k_init, k_run = jax.random.split(jax.random.key(seed))
    start = jax.jit(lambda k: initialize_model(k, model, model_args=args,
                                               model_kwargs=kwargs).param_info)(k_init)
    init_kernel, sample_kernel = hmc(
        potential_fn=lambda z: potential_energy(model, args, kwargs, z), algo="NUTS")
    state = jax.jit(lambda p, k: init_kernel(p, num_warmup=num_warmup, rng_key=k))(start, k_run)
    draws, diverging = fori_collect(num_warmup, num_warmup + num_samples, sample_kernel, state,
                                    transform=lambda s: (s.z, s.diverging), progbar=progress_bar)
    samples = jax.jit(jax.vmap(lambda z: constrain_fn(model, args, kwargs, z)))(draws)
    samples = {k: np.asarray(v) for k, v in samples.items()}
    rhat = max(float(np.nanmax(split_gelman_rubin(v[None]))) for v in samples.values())
    info = {"r_hat": rhat, "divergences": int(np.asarray(diverging).sum()),
            "n_iter": num_warmup + num_samples, "history": None}
    return samples, info


def run_svi(model: Callable, args: tuple, kwargs: dict, *, num_steps: int, num_samples: int,
            seed: int, progress_bar: bool,
            learning_rate: float = 0.05) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """SVI with a mean-field normal guide on the unconstrained space (``AutoNormal``), then draws."""
    import optax
    from numpyro.infer import SVI, Trace_ELBO
    from numpyro.infer.autoguide import AutoNormal

    guide = AutoNormal(model)
    svi = SVI(model, guide, optax.adam(learning_rate), Trace_ELBO())
    k1, k2 = jax.random.split(jax.random.key(seed))
    # svi.init traces the model and the guide op by op, each op compiled on its own: one jitted
    # program instead (the same state to rounding; 14.2 -> 2.5 s for 400 tasks x 5 annotators,
    # 2-core host, session 15)
    state = jax.jit(lambda key, *a: svi.init(key, *a, **kwargs))(k1, *args)
    res = svi.run(k1, num_steps, *args, progress_bar=progress_bar, init_state=state, **kwargs)
    samples = guide.sample_posterior(k2, res.params, sample_shape=(num_samples,))
    samples = {k: np.asarray(v) for k, v in samples.items() if k in ("rho", "pi")}
    losses = np.asarray(res.losses)
    return samples, {"n_iter": num_steps, "history": -losses, "r_hat": None, "divergences": None}


def posterior_summary(samples: dict[str, np.ndarray], task, worker, label, n_tasks: int,
                      gold=None) -> dict[str, np.ndarray]:
    """Posterior means and 95 % intervals from draws of rho, pi (class posteriors averaged)."""
    rho, pi = jnp.asarray(samples["rho"]), jnp.asarray(samples["pi"])
    g = None if gold is None else jnp.asarray(gold)

    def post(r, p):
        return jax.nn.softmax(class_scores(r, p, jnp.asarray(task), jnp.asarray(worker),
                                           jnp.asarray(label), n_tasks, g), axis=1)

    probas = np.asarray(jax.lax.map(lambda rp: post(*rp), (rho, pi), batch_size=64).mean(axis=0))
    skill = np.einsum("sk,swkk->sw", np.asarray(rho), np.asarray(pi))
    return {"probas": probas, "priors": np.asarray(rho).mean(axis=0),
            "errors": np.asarray(pi).mean(axis=0), "skills": skill.mean(axis=0),
            "credible": np.stack([np.quantile(skill, 0.025, axis=0),
                                  np.quantile(skill, 0.975, axis=0)], axis=1)}


MODELS = {"ds": dawid_skene, "ibcc": ibcc}


def fit_aggregator(kind: str, tensor: LabelTensor, gold: np.ndarray | None, *, inference: str,
                   num_samples: int, num_warmup: int, num_steps: int, seed: int,
                   progress_bar: bool, **priors: float) -> dict[str, Any]:
    """Fit the ``kind`` model (``ds`` or ``ibcc``) by ``nuts`` or ``svi``: the Aggregator dict."""
    if inference not in ("nuts", "svi"):
        raise ValueError(f"inference must be 'nuts' or 'svi' here, got {inference!r}")
    args = (tensor.task, tensor.worker, tensor.label)
    kwargs = dict(n_tasks=tensor.n_tasks, n_workers=tensor.n_workers,
                  n_classes=max(tensor.n_classes, 1), gold=gold, **priors)
    if inference == "nuts":
        samples, info = run_nuts(MODELS[kind], args, kwargs, num_warmup=num_warmup,
                                 num_samples=num_samples, seed=seed, progress_bar=progress_bar)
    else:
        samples, info = run_svi(MODELS[kind], args, kwargs, num_steps=num_steps,
                                num_samples=num_samples, seed=seed, progress_bar=progress_bar)
    out = posterior_summary(samples, *args, tensor.n_tasks, gold)
    out.update(n_iter=info["n_iter"], converged=True, history=info["history"],
               r_hat=info["r_hat"], divergences=info["divergences"],
               samples=samples)
    if out["history"] is None:
        out.pop("history")
    return out


class BayesianDawidSkene(Aggregator):
    """Dawid-Skene with flat priors, full posterior by NUTS (or SVI) - for small data.

    Args:
        inference: ``nuts`` or ``svi``.
        num_samples: posterior draws kept (NUTS) or drawn from the fitted guide (SVI).
        num_warmup: NUTS warm-up steps.
        num_steps: SVI optimiser steps.
        seed: PRNG seed.
        progress_bar: NumPyro's progress bar (on by default, as in NumPyro).

    Attributes (after fit):
        errors_: ``[workers, K, L]`` posterior mean confusion matrices; ``priors_``: ``[K]``.
        skills_: ``[workers]`` posterior mean accuracy; ``credible_``: ``[workers, 2]`` its 95 %
        interval. ``r_hat_`` (NUTS: the largest split R-hat), ``divergences_``, ``samples_``.
    """

    name = "ds-bayes"
    description = "Dawid-Skene with flat priors: full posterior by NUTS or SVI (small data)"
    supports_gold = True
    iterative = False
    shardable = False  # NumPyro's NUTS / SVI on one device

    def __init__(self, inference: str = "nuts", num_samples: int = 500, num_warmup: int = 500,
                 num_steps: int = 2000, seed: int = 0, progress_bar: bool = True) -> None:
        if inference not in ("nuts", "svi"):
            raise ValueError(f"inference must be 'nuts' or 'svi', got {inference!r}")
        self.inference, self.num_samples, self.num_warmup = inference, num_samples, num_warmup
        self.num_steps, self.seed, self.progress_bar = num_steps, seed, progress_bar

    def _fit(self, tensor: LabelTensor, gold: np.ndarray | None) -> dict[str, Any]:
        return fit_aggregator("ds", tensor, gold, inference=self.inference,
                              num_samples=self.num_samples, num_warmup=self.num_warmup,
                              num_steps=self.num_steps, seed=self.seed,
                              progress_bar=self.progress_bar)

    def skills_table(self) -> pa.Table:
        cols: dict[str, Any] = {"worker": pa.array(self.workers_.tolist()),
                                "skill": pa.array(self.skills_, type=pa.float64()),
                                "skill_lo": pa.array(self.credible_[:, 0], type=pa.float64()),
                                "skill_hi": pa.array(self.credible_[:, 1], type=pa.float64())}
        classes = self.classes_.tolist()
        for k, ck in enumerate(classes):
            for l, cl in enumerate(classes):
                cols[f"p_{ck}_{cl}"] = pa.array(self.errors_[:, k, l], type=pa.float64())
        return pa.table(cols)
