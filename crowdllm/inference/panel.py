"""The panel file: which models annotate, through which backend, with which settings.

A TOML file::

    schema = "coda19"            # or a schema TOML file (relative to this file)

    [defaults]                   # optional, applied to every annotator
    temperature = 0.0
    max_tokens = 16
    retries = 3                  # re-asks after an answer that does not parse

    [[annotator]]
    name = "llama-a"             # the worker id in the answers
    backend = "openai"           # any OpenAI-compatible server
    model = "meta-llama/Llama-3.2-1B-Instruct"     # the served model name
    base_url = ["http://10.0.0.5:8000/v1", "http://10.0.0.6:8000/v1"]
    api_key_env = "MY_API_KEY"   # or api_key_file = "~/.config/key"; never the key itself
    concurrency = 8              # in flight per base URL
    seed = 1
    system_extra = "Be terse."   # changes the prompt (and its version) for this annotator

    [[annotator]]
    name = "gemma-offline"
    backend = "vllm"             # vLLM's offline engine, in a subprocess
    model = "/models/gemma-3-270m"   # a local folder
    python = "/opt/vllm-venv/bin/python"   # interpreter with vLLM (default: this one)
    chat_template = "plain"      # or a .jinja file, for models without one
    engine_args = { max_model_len = 2048 }

``${VAR}`` in string values is replaced from the environment. API keys never live in the
panel: a field that looks like one (``api_key``, ``key``, ``token``, ``secret``...) is refused.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from pathlib import Path
from typing import Any

from .schema import LabelSchema, SchemaError, load_schema

__all__ = ["AnnotatorSpec", "Panel", "load_panel", "resolve_api_key", "TEMPLATES"]

TEMPLATES = Path(__file__).parent / "templates"

_FORBIDDEN = ("api_key", "apikey", "key", "token", "secret", "password", "authorization",
              "bearer")
_KNOWN = {"name", "backend", "model", "base_url", "api_key_env", "api_key_file", "concurrency",
          "timeout_s", "max_transport_retries", "backoff_s", "constrain", "logprobs",
          "top_logprobs", "seed", "temperature", "max_tokens", "retries", "system_extra",
          "python", "chat_template", "engine_args", "max_batch", "served_name"}


@dataclasses.dataclass
class AnnotatorSpec:
    """One annotator of the panel (see the module docstring for the fields)."""

    name: str
    backend: str
    model: str
    base_url: list[str] = dataclasses.field(default_factory=list)
    api_key_env: str | None = None
    api_key_file: str | None = None
    concurrency: int = 8
    timeout_s: float = 60.0
    max_transport_retries: int = 6
    backoff_s: float = 0.5
    constrain: bool | str = "auto"
    logprobs: bool = True
    top_logprobs: int = 20
    seed: int = 0
    temperature: float = 0.0
    max_tokens: int = 16
    retries: int = 3
    system_extra: str = ""
    python: str | None = None
    chat_template: str | None = None
    engine_args: dict[str, Any] = dataclasses.field(default_factory=dict)
    max_batch: int = 64
    served_name: str | None = None

    def public_dict(self) -> dict[str, Any]:
        """Everything but secrets (there are none in the spec: only where keys come from)."""
        return dataclasses.asdict(self)

    def build_backend(self, log_dir: Path | None = None) -> Any:
        """The backend object for this annotator."""
        if self.backend == "openai":
            from .backends.openai_backend import OpenAIBackend

            return OpenAIBackend(self.model, self.base_url, resolve_api_key(self),
                                 concurrency=self.concurrency, timeout_s=self.timeout_s,
                                 max_transport_retries=self.max_transport_retries,
                                 backoff_s=self.backoff_s, constrain=self.constrain,
                                 top_logprobs=self.top_logprobs if self.logprobs else 0)
        if self.backend == "vllm":
            from .backends.vllm_backend import VLLMBackend

            return VLLMBackend(self.model, python=self.python, seed=self.seed,
                               engine_args=self.engine_args, chat_template=self.chat_template,
                               max_batch=self.max_batch, served_name=self.served_name,
                               log_path=(log_dir / f"{self.name}.vllm.log") if log_dir else None)
        raise SchemaError(f"annotator {self.name!r}: unknown backend {self.backend!r} (openai, vllm)")


@dataclasses.dataclass
class Panel:
    """The annotators and the label schema."""

    annotators: list[AnnotatorSpec]
    schema: LabelSchema
    source: str | None = None

    def public_dict(self) -> dict[str, Any]:
        return {"source": self.source, "annotators": [a.public_dict() for a in self.annotators]}


def _expand(value: Any) -> Any:
    if isinstance(value, str):
        return os.path.expandvars(value)
    if isinstance(value, list):
        return [_expand(v) for v in value]
    if isinstance(value, dict):
        return {k: _expand(v) for k, v in value.items()}
    return value


def _check_no_secrets(table: dict[str, Any], where: str) -> None:
    for k, v in table.items():
        low = k.lower()
        if low in ("api_key_env", "api_key_file", "max_tokens", "top_logprobs"):
            continue
        if low in _FORBIDDEN or low.endswith(("_key", "_token", "_secret", "_password")) \
                or "api_key" in low or "apikey" in low:
            raise SchemaError(f"{where}: field {k!r} looks like a secret; API keys never go in the "
                              "panel file: name an environment variable (api_key_env) or a key "
                              "file (api_key_file)")
        if isinstance(v, dict):
            _check_no_secrets(v, f"{where}.{k}")


def load_panel(path: str | os.PathLike[str]) -> Panel:
    """Read and check a panel TOML file."""
    p = Path(path)
    if not p.exists():
        raise SchemaError(f"{p}: no such panel file")
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise SchemaError(f"{p}: not valid TOML: {exc}") from exc
    _check_no_secrets(data, str(p))
    data = _expand(data)
    schema_src = data.get("schema")
    if isinstance(schema_src, str) and schema_src.lower() not in ("coda19", "default"):
        sp = Path(schema_src).expanduser()
        schema_src = sp if sp.is_absolute() else p.parent / sp
    elif isinstance(schema_src, dict):
        pass
    schema = load_schema(schema_src)
    defaults = data.get("defaults", {})
    if not isinstance(defaults, dict):
        raise SchemaError(f"{p}: [defaults] must be a table")
    raw = data.get("annotator")
    if not isinstance(raw, list) or not raw:
        raise SchemaError(f"{p}: no [[annotator]] entries")
    specs = []
    for i, entry in enumerate(raw):
        where = f"{p}: annotator {i + 1}"
        if not isinstance(entry, dict):
            raise SchemaError(f"{where}: expected a table")
        merged = {**defaults, **entry}
        unknown = sorted(set(merged) - _KNOWN)
        if unknown:
            raise SchemaError(f"{where}: unknown field(s) {unknown}; known: {sorted(_KNOWN)}")
        for req in ("name", "backend", "model"):
            if not isinstance(merged.get(req), str) or not merged[req].strip():
                raise SchemaError(f"{where}: field {req!r} is missing or empty")
        if isinstance(merged.get("base_url"), str):
            merged["base_url"] = [merged["base_url"]]
        if merged["backend"] == "openai" and not merged.get("base_url"):
            raise SchemaError(f"{where} ({merged['name']}): field 'base_url' is required for the openai backend")
        if merged["backend"] not in ("openai", "vllm"):
            raise SchemaError(f"{where}: field 'backend' must be 'openai' or 'vllm', got {merged['backend']!r}")
        tpl = merged.get("chat_template")
        if tpl and "/" not in tpl and not tpl.endswith(".jinja"):
            if not (TEMPLATES / f"{tpl}.jinja").exists():
                raise SchemaError(f"{where}: field 'chat_template': no built-in template {tpl!r}")
            merged["chat_template"] = str(TEMPLATES / f"{tpl}.jinja")
        local = ["python", "chat_template", "api_key_file"] + (["model"] if merged["backend"] == "vllm" else [])
        for fld in local:
            v = merged.get(fld)
            if isinstance(v, str) and v:
                q = Path(v).expanduser()
                if not q.is_absolute() and (p.parent / q).exists():
                    q = p.parent / q
                merged[fld] = str(q) if q.exists() or fld != "python" else v
        try:
            spec = AnnotatorSpec(**merged)
        except TypeError as exc:
            raise SchemaError(f"{where}: {exc}") from None
        if spec.retries < 0 or spec.max_tokens < 1 or spec.concurrency < 1:
            raise SchemaError(f"{where}: retries >= 0, max_tokens >= 1 and concurrency >= 1 needed")
        specs.append(spec)
    names = [s.name for s in specs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise SchemaError(f"{p}: annotator names must be unique; repeated: {dup}")
    return Panel(specs, schema, str(p))


def resolve_api_key(spec: AnnotatorSpec) -> str | None:
    """The API key from ``api_key_env`` or ``api_key_file`` (None when neither is set)."""
    if spec.api_key_env:
        key = os.environ.get(spec.api_key_env)
        if not key:
            raise SchemaError(f"annotator {spec.name!r}: environment variable "
                              f"{spec.api_key_env} (api_key_env) is not set")
        return key.strip()
    if spec.api_key_file:
        kp = Path(spec.api_key_file).expanduser()
        if not kp.exists():
            raise SchemaError(f"annotator {spec.name!r}: key file {kp} (api_key_file) does not exist")
        key = kp.read_text(encoding="utf-8").strip()
        if not key:
            raise SchemaError(f"annotator {spec.name!r}: key file {kp} is empty")
        return key
    return None
