"""The ``vllm`` backend: vLLM's offline ``LLM`` engine in a subprocess, one model at a time.

The engine runs in a child process (``_vllm_worker.py``, started with the interpreter named by
``python``, default the current one), so vLLM may live in its own virtual environment and the
model's memory is freed when the annotator is done (the child exits). Requests that the runner
keeps in flight are gathered into batches and sent to ``LLM.chat`` together, with automatic
prefix caching on (the system prompt with the label definitions is shared by every item).

Answers are constrained with ``SamplingParams(structured_outputs=StructuredOutputsParams(
choice=[...]))``; the labels' first tokens are checked with the model's tokenizer at start-up
(short codes are used when two labels share a first token).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

from .base import BackendError, Completion, Request, as_int

__all__ = ["VLLMBackend", "WORKER"]

WORKER = Path(__file__).with_name("_vllm_worker.py")


class VLLMBackend:
    """Offline vLLM engine in a subprocess.

    Args:
        model: a local model folder (Hugging Face layout); nothing is fetched from a hub.
        python: interpreter that has vLLM installed (default: this one).
        seed: engine seed.
        engine_args: extra ``vllm.LLM`` keyword arguments (``max_model_len``, ``dtype``, ...).
        chat_template: a Jinja chat template file for models that have none.
        max_batch: most requests per ``LLM.chat`` call.
        log_path: where the engine's log goes (default: inherited stderr).
        served_name: the name recorded as ``endpoint_model`` (default: the folder name).
    """

    name = "vllm"
    constrains = True

    def __init__(self, model: str, *, python: str | None = None, seed: int = 0,
                 engine_args: Mapping[str, Any] | None = None, chat_template: str | None = None,
                 max_batch: int = 64, log_path: str | os.PathLike[str] | None = None,
                 served_name: str | None = None, start_timeout_s: float = 900.0):
        self.model = model
        self.python = python or sys.executable
        self.seed = seed
        self.engine_args = dict(engine_args or {})
        self.chat_template = chat_template
        self.max_batch = max_batch
        self.log_path = log_path
        self.served_name = served_name or Path(model).name
        self.start_timeout_s = start_timeout_s
        self.metrics: dict[str, float] = {}
        self._proc: subprocess.Popen[str] | None = None
        self._queue: asyncio.Queue[tuple[Request, asyncio.Future[Completion]]] | None = None
        self._loop_task: asyncio.Task[None] | None = None
        self._log = None

    @property
    def max_in_flight(self) -> int:
        return self.max_batch

    def _call(self, msg: dict[str, Any]) -> dict[str, Any]:
        assert self._proc is not None and self._proc.stdin and self._proc.stdout
        try:
            self._proc.stdin.write(json.dumps(msg) + "\n")
            self._proc.stdin.flush()
            line = self._proc.stdout.readline()
        except (BrokenPipeError, OSError) as exc:
            raise BackendError(f"vllm worker for {self.model}: {exc}") from None
        if not line:
            raise BackendError(f"vllm worker for {self.model} exited (code {self._proc.poll()}); "
                               f"see {self.log_path or 'stderr'}")
        out = json.loads(line)
        if not out.get("ok"):
            raise BackendError(f"vllm worker for {self.model}: {out.get('error')}")
        return out

    async def start(self, choices_by_format: Mapping[bool, Sequence[str]]) -> bool:
        if not Path(self.model).exists():
            raise BackendError(f"vllm model folder {self.model!r} does not exist "
                               "(models are local folders; nothing is downloaded)")
        if self.log_path:
            Path(self.log_path).parent.mkdir(parents=True, exist_ok=True)
            self._log = open(self.log_path, "ab")
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        self._proc = subprocess.Popen(
            [self.python, str(WORKER)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=self._log if self._log else None, text=True, env=env)
        init = {"cmd": "init", "model": self.model, "seed": self.seed,
                "engine_args": self.engine_args, "chat_template": self.chat_template,
                "choices": list(choices_by_format[False]), "served_name": self.served_name}
        out = await asyncio.wait_for(asyncio.to_thread(self._call, init), self.start_timeout_s)
        self._queue = asyncio.Queue()
        self._loop_task = asyncio.create_task(self._batch_loop())
        return bool(out.get("codes"))

    async def complete(self, request: Request) -> Completion:
        assert self._queue is not None, "start() first"
        fut: asyncio.Future[Completion] = asyncio.get_running_loop().create_future()
        await self._queue.put((request, fut))
        return await fut

    async def _batch_loop(self) -> None:
        assert self._queue is not None
        while True:
            batch = [await self._queue.get()]
            await asyncio.sleep(0.01)  # let the other in-flight requests arrive
            while len(batch) < self.max_batch and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            payload = {"cmd": "generate", "requests": [
                {"messages": r.messages, "choices": r.choices, "max_tokens": r.max_tokens,
                 "temperature": r.temperature, "seed": r.seed, "logprobs": r.logprobs}
                for r, _ in batch]}
            t0 = time.perf_counter()
            try:
                out = await asyncio.to_thread(self._call, payload)
            except Exception as exc:  # fail the whole batch; the runner reports it
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            latency = time.perf_counter() - t0
            for (_, fut), res in zip(batch, out["results"]):
                if fut.done():
                    continue
                fut.set_result(Completion(
                    text=res.get("text") or "", finish_reason=res.get("finish_reason"),
                    prompt_tokens=as_int(res.get("prompt_tokens")),
                    completion_tokens=as_int(res.get("completion_tokens")),
                    first_logprobs=res.get("first_logprobs"), endpoint_model=self.served_name,
                    latency_s=latency))

    async def close(self) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()
            self._loop_task = None
        if self._proc is not None:
            try:
                self.metrics = (await asyncio.to_thread(self._call, {"cmd": "stats"})).get("metrics", {})
            except Exception:
                self.metrics = {}
            try:
                if self._proc.stdin:
                    self._proc.stdin.close()
                await asyncio.to_thread(self._proc.wait, 60)
            except subprocess.TimeoutExpired:
                self._proc.kill()
            self._proc = None
        if self._log is not None:
            self._log.close()
            self._log = None
