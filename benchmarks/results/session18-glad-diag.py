import sys, numpy as np, jax
sys.path.insert(0, "tests")
from test_glad import sample_glad
from crowdllm.labels import LabelTensor
from crowdllm.aggregation._core import prepare
from crowdllm.aggregation import glad as glad_mod
df, *_ = sample_glad(n_tasks=12, n_workers=4, seed=3)
t = LabelTensor.coerce(df)
res = {}
for dev in [jax.devices()[0], jax.devices("cpu")[0]]:
    with jax.default_device(dev):
        data = prepare(t, layout="coo")
        for mode in ("jit", "eager"):
            for mi in (1, 2):
                kw = dict(max_iter=mi, m_steps=1)
                if mode == "jit":
                    r = glad_mod.fit(data, **kw)
                else:
                    with jax.disable_jit():
                        r = glad_mod.fit(data, **kw)
                res[(dev.platform, mode, mi)] = jax.tree_util.tree_map(np.asarray, r)
base = res[("cpu", "jit", 2)]
fields = base._fields if hasattr(base, "_fields") else list(vars(base))
for k, r in res.items():
    out = []
    for f in fields:
        a, b = getattr(r, f), getattr(res[("cpu", "jit", k[2])], f)
        try:
            d = float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())
        except Exception:
            d = "?"
        out.append(f"{f}={d:.2e}" if isinstance(d, float) else f"{f}=?")
    print(k, "vs cpu-jit:", " ".join(out))
for k, r in res.items():
    print(k, "post[6]", np.round(r.posteriors[6], 5), "n_iter", r.n_iter)
for f in fields:
    if f in ("posteriors",):
        continue
    v = getattr(res[("gpu" if jax.default_backend() == "gpu" else "cpu", "eager", 2)], f)
    print(f, np.asarray(v).ravel()[:16])
