"""`VllmPool` (one server and sampler per base model, and the snapshots they hot-load) and `VllmBackend`
(`--sampler vllm`: the local backend, with sampling routed to vLLM when it can serve it)."""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import logging
import os
import shutil
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from eztinker.backend.base import BackendHooks, SchedulerOptions, failed
from eztinker.backend.local import LocalBackend
from eztinker.backend.vllm.adapters import adapter_problem, safe_name, write_snapshot
from eztinker.backend.vllm.options import VllmOptions, VllmUnavailableError
from eztinker.backend.vllm.sampler import VllmSampler
from eztinker.backend.vllm.server import ExternalVllm, VllmEndpoint, VllmServer, probe_vllm_python
from eztinker.engine.engine import SamplerInfo
from eztinker.engine.sampler import SampleRequest
from eztinker.engine.types import SampleResult

if TYPE_CHECKING:
    from eztinker.engine import Engine

log = logging.getLogger(__name__)


class VllmPool:
    """One `VllmSampler` (and server) per base model, and the sampler snapshots they hot-load.

    With `options.python` each base model gets a `VllmServer` of its own; with `options.url` the one
    external server serves the first base model asked for (the one it was started with) and `serves` is
    False for the others. Snapshots are PEFT directories under `adapter_root` (`<adapter_root>/<sampler
    id>`; what an earlier process left there is deleted at construction: its snapshots died with it).
    Construction probes the vLLM environment, so selecting vLLM where there is none fails at once.
    """

    def __init__(self, options: VllmOptions, adapter_root: str | os.PathLike[str]) -> None:
        if not options.python and not options.url:
            raise VllmUnavailableError(
                "--sampler vllm needs --vllm-python (the interpreter of a vLLM environment: "
                "scripts/vllm_env.sh builds one) or --vllm-url (a running vLLM server)"
            )
        self.options = options
        self.info = probe_vllm_python(options.python) if options.python and not options.url else None
        self.adapter_root = Path(adapter_root)
        shutil.rmtree(self.adapter_root, ignore_errors=True)
        self.adapter_root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._samplers: dict[str, VllmSampler] = {}
        self._starts: dict[str, threading.Thread] = {}
        self._errors: dict[str, str] = {}  # base model -> why its server did not start
        self._external_model: str | None = None
        self._snapshots: dict[str, tuple[str, str]] = {}  # sampler id -> (base model, directory)

    def serves(self, base_model: str) -> bool:
        """Whether sampling of `base_model` is vLLM's (else the engine's)."""
        with self._lock:
            return self._external_model in (None, base_model) if self.options.url else True

    def start(
        self, base_model: str, eos_token_ids: Iterable[int], *, dtype: str | None = None, wait: bool = True
    ) -> VllmSampler | None:
        """Start the server of `base_model` (once; `dtype`: the engine's). `wait`: until it answers, raising
        `VllmUnavailableError` with vLLM's own words if it does not; else in the background (None until up)."""
        with self._lock:
            found = self._samplers.get(base_model)
            if found is not None:
                return found
            if self.options.url and self._external_model not in (None, base_model):
                raise VllmUnavailableError(f"--vllm-url serves {self._external_model!r}, not {base_model!r}")
            if self.options.url:
                self._external_model = base_model
            thread = self._starts.get(base_model)
            if thread is None:
                eos = list(eos_token_ids)
                thread = threading.Thread(
                    target=self._start,
                    args=(base_model, eos, dtype),
                    name=f"vllm-start-{base_model}",
                    daemon=True,
                )
                self._starts[base_model] = thread
                thread.start()
        if not wait:
            return None
        thread.join()
        with self._lock:
            found = self._samplers.get(base_model)
            if found is None:
                raise VllmUnavailableError(
                    self._errors.get(base_model, f"vLLM for {base_model!r} did not start")
                )
            return found

    def _start(self, base_model: str, eos_token_ids: list[int], dtype: str | None) -> None:
        options = self.options if dtype is None else dataclasses.replace(self.options, dtype=dtype)
        endpoint: VllmEndpoint
        try:
            if options.url:
                endpoint = ExternalVllm(options.url, base_model, options)
            else:
                endpoint = VllmServer(base_model, options, info=self.info)
            endpoint.start()
        except Exception as exc:  # reported to whoever waits; sampling stays on the engine
            log.error("vLLM for %s did not start; its sampling stays on the engine: %s", base_model, exc)
            with self._lock:
                self._errors[base_model] = str(exc)
            return
        sampler = VllmSampler.for_options(endpoint, options, eos_token_ids)
        with self._lock:
            pending = [(sid, path) for sid, (model, path) in self._snapshots.items() if model == base_model]
        for sampler_id, path in pending:  # snapshots taken while it started
            sampler.add_adapter(sampler_id, path)
        with self._lock:
            self._samplers[base_model] = sampler
        log.info("vLLM serves %s at %s", base_model, endpoint.url)

    def ready(self, base_model: str) -> VllmSampler | None:
        """The sampler of `base_model` if its server is up now (None: starting, restarting, or none)."""
        with self._lock:
            sampler = self._samplers.get(base_model)
        return sampler if sampler is not None and sampler.endpoint.failure() is None else None

    def started(self, base_model: str) -> bool:
        """Whether `base_model`'s server was asked to start (it may be up, starting, or have failed)."""
        with self._lock:
            return base_model in self._starts

    def error(self, base_model: str) -> str | None:
        with self._lock:
            return self._errors.get(base_model)

    def running(self) -> dict[str, VllmSampler]:
        """The samplers whose servers started, by base model."""
        with self._lock:
            return dict(self._samplers)

    def snapshot_path(self, sampler_id: str) -> Path:
        return self.adapter_root / safe_name(sampler_id)

    def add_snapshot(self, base_model: str, sampler_id: str, path: str | os.PathLike[str]) -> str | None:
        """Hot-load the snapshot written at `path` (now if its model's server is up, else once it is);
        returns why vLLM can't serve it (then the engine does), or None."""
        with self._lock:
            self._snapshots[sampler_id] = (base_model, str(path))
            sampler = self._samplers.get(base_model)
        if sampler is None:
            return adapter_problem(path, self.options.max_lora_rank)
        return sampler.add_adapter(sampler_id, path)

    def remove_snapshot(self, sampler_id: str) -> None:
        """Unload the snapshot from vLLM and delete its directory (the snapshot was deleted)."""
        with self._lock:
            base_model, path = self._snapshots.pop(sampler_id, (None, str(self.snapshot_path(sampler_id))))
            sampler = self._samplers.get(base_model) if base_model is not None else None
        if sampler is not None:
            with contextlib.suppress(VllmUnavailableError):
                sampler.remove_adapter(sampler_id)
        shutil.rmtree(path, ignore_errors=True)

    def stop(self) -> None:
        """Close every client and stop every server this pool started (an external one keeps running)."""
        with self._lock:
            samplers = list(self._samplers.values())
            self._samplers.clear()
        for sampler in samplers:
            sampler.close()
            sampler.endpoint.stop()


class VllmBackend(LocalBackend):
    """`--sampler vllm`: the in-process backend, with sampling of base models and sampler snapshots on vLLM.

    Training, checkpoints and the engine's own snapshots are `LocalBackend`'s. What changes:

    - `load_model` (the server's `--model`s at start) also starts that model's vLLM server and waits for it,
      so a vLLM that cannot run fails the server's start with vLLM's own message. A model first used later
      gets its server started in the background; until it answers, its sampling stays on the engine.
    - `save_sampler` takes the engine's snapshot, then writes it as a PEFT directory (same op, same
      weights) and hot-loads it into vLLM (`VllmPool.add_snapshot`); `delete_sampler` unloads and deletes it.
    - `sample` sends requests to vLLM when it can serve them all: the bare base or a hot-loaded snapshot, no
      prompt extras vLLM lacks. The rest goes to the engine sampler, which computes the same numbers: a run's
      **live adapter** (an OpenAI `model=<run id>`, native sampling of a run: it changes every step, so a
      snapshot per sample would cost a PEFT write and a load each time), an adapter of a rank above
      `--vllm-max-lora-rank` or with layers vLLM's LoRA does not take, `target_prompt_tokens` and
      `prompt_alt_tokens_k`, and any model whose vLLM server is starting or restarting.
    `routes` counts the requests each side took.
    """

    def __init__(
        self,
        engine: Engine,
        options: SchedulerOptions | None = None,
        hooks: BackendHooks | None = None,
        *,
        pool: VllmPool,
    ) -> None:
        super().__init__(engine, options, hooks)
        self.pool = pool
        self._on_tokens = (hooks or BackendHooks()).on_tokens
        self.routes: collections.Counter[str] = collections.Counter()

    def stop(self) -> None:
        try:
            super().stop()
        finally:
            self.pool.stop()

    def load_model(self, name: str) -> None:
        super().load_model(name)
        if self.pool.serves(name):
            self.start_vllm(name, wait=True)

    def start_vllm(self, name: str, *, wait: bool) -> VllmSampler | None:
        """Start base model `name`'s vLLM server (see `VllmPool.start`) with the engine's dtype and EOS ids."""
        base = self.engine.base_model(name)
        dtype = str(base.dtype).removeprefix("torch.")
        return self.pool.start(name, base.eos_token_ids, dtype=dtype, wait=wait)

    def save_sampler(self, run_id: str, sampler_id: str) -> concurrent.futures.Future[SamplerInfo]:
        future = super().save_sampler(run_id, sampler_id)  # settled: computed in this thread
        if not future.done() or future.exception() is not None:
            return future
        info = future.result()
        if self.pool.serves(info.base_model):
            try:  # in the snapshot's own op: the run's weights have not moved since
                written = write_snapshot(self.engine, run_id, self.pool.adapter_root, sampler_id)
                problem = self.pool.add_snapshot(info.base_model, sampler_id, written.path)
            except Exception as exc:  # the engine's copy still serves it
                problem = f"{type(exc).__name__}: {exc}"
            if problem is not None:
                log.info("sampler %s is sampled by the engine, not vLLM: %s", sampler_id, problem)
        return future

    def delete_sampler(self, sampler_id: str) -> None:
        """Forget a snapshot: vLLM unloads it, its directory goes, the engine frees its copy."""
        self.pool.remove_snapshot(sampler_id)
        self.engine.delete_sampler(sampler_id)

    def sample(
        self, base_model: str, requests: list[SampleRequest]
    ) -> concurrent.futures.Future[list[SampleResult]]:
        sampler = self.vllm_for(base_model, requests)
        if sampler is None:
            self.routes["engine"] += len(requests)
            return super().sample(base_model, requests)
        try:  # the engine's rules, word for word: vLLM would cut a sample at its context's end, not refuse
            self.engine.check_requests(base_model, requests)
        except Exception as exc:
            return failed(exc)
        self.routes["vllm"] += len(requests)
        future = sampler.sample(requests)
        on_tokens = self._on_tokens
        if on_tokens is not None:

            def count(done: concurrent.futures.Future[list[SampleResult]]) -> None:
                if done.exception() is None:
                    on_tokens(sum(len(s.tokens) for r in done.result() for s in r.sequences))

            future.add_done_callback(count)
        return future

    def vllm_for(self, base_model: str, requests: Sequence[SampleRequest]) -> VllmSampler | None:
        """The vLLM sampler that serves all of `requests`, or None (they go to the engine)."""
        if not self.pool.serves(base_model):
            return None
        sampler = self.pool.ready(base_model)
        if sampler is None:
            if not self.pool.started(base_model):
                self.start_vllm(
                    base_model, wait=False
                )  # first use: up in a minute or so; the engine until then
            return None
        if any(sampler.unsupported(r) is not None for r in requests):
            return None
        return sampler
