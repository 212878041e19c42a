"""Where crowdllm keeps what it builds once per machine: ``$CROWDLLM_CACHE``, else
``$XDG_CACHE_HOME/crowdllm``, else ``~/.cache/crowdllm`` (native kernels in ``native/``, the
command line's compiled XLA programs in ``jax/``); and how its environment switches
(``CROWDLLM_NATIVE``, ``CROWDLLM_COMPILE_CACHE``) are read."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    root = os.environ.get("CROWDLLM_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache"), "crowdllm")
    return Path(root)


def switched_off(var: str) -> bool:
    """Whether the environment variable ``var`` turns something off (0, false, no or off; unset:
    on)."""
    return os.environ.get(var, "1").strip().lower() in ("0", "false", "no", "off")
