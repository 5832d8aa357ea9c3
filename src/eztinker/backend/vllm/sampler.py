"""`VllmSampler`: the client of one vLLM server — sampling on its own event loop, and the adapters it
hot-loads (at most `max_loras`, least recently used out, pinned while a request uses one)."""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import dataclasses
import json
import os
import threading
import time
from collections.abc import Callable, Coroutine, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import httpx

from eztinker.backend.vllm.adapters import _Adapter, adapter_problem, safe_name
from eztinker.backend.vllm.options import VllmOptions, VllmUnavailableError
from eztinker.backend.vllm.server import VllmEndpoint
from eztinker.backend.vllm.wire import (
    _AdapterMissingError,
    _http_error,
    _json_or_text,
    _prompt_extras,
    _StreamState,
    completion_body,
    parse_choices,
    parse_rescored,
    prompt_body,
    rescore_body,
    unsupported,
    without_prompt_extras,
)
from eztinker.engine.errors import CancelledRequestError, InvalidInputError, NotFoundError
from eztinker.engine.sampler import SampleRequest
from eztinker.engine.types import SampleResult, TopLogprobs

if TYPE_CHECKING:
    pass


T = TypeVar("T")

CANCEL_POLL_SECONDS = 0.1  # how often a cancellable request vLLM is working on is checked


class VllmSampler:
    """Samples engine requests on one base model's vLLM server (see the module docstring).

    `eos_token_ids` are the base model's EOS ids (the engine's `BaseModel.eos_token_ids`): `stop=None`
    stops at them, as in the engine sampler. Thread-safe: every method may be called from any thread;
    the requests themselves run on the sampler's own event loop.
    """

    def __init__(
        self,
        endpoint: VllmEndpoint,
        *,
        eos_token_ids: Iterable[int],
        max_loras: int = 4,
        max_lora_rank: int = 64,
        request_timeout: float = 600.0,
        ready_timeout: float | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.eos_token_ids = sorted(set(eos_token_ids))
        self.max_loras = max_loras
        self.max_lora_rank = max_lora_rank
        self.request_timeout = request_timeout
        self.ready_timeout = ready_timeout
        self._adapters: dict[str, _Adapter] = {}
        self._loaded: collections.OrderedDict[str, None] = collections.OrderedDict()  # LRU, newest last
        self._loaded_generation = -1
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="vllm-client", daemon=True)
        self._thread.start()
        self._client: httpx.AsyncClient | None = None
        self._adapter_lock: asyncio.Lock | None = None
        self._closed = False

    @classmethod
    def for_options(
        cls, endpoint: VllmEndpoint, options: VllmOptions, eos_token_ids: Iterable[int]
    ) -> VllmSampler:
        return cls(
            endpoint,
            eos_token_ids=eos_token_ids,
            max_loras=options.max_loras,
            max_lora_rank=options.max_lora_rank,
            request_timeout=options.request_timeout,
            ready_timeout=options.ready_timeout,
        )

    # --- running coroutines on the sampler's loop

    def _submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        if self._closed:
            raise VllmUnavailableError("the vLLM sampler is closed")
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self._submit(coro).result()

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(
                timeout=httpx.Timeout(self.request_timeout, connect=10.0),
                limits=httpx.Limits(max_connections=None, max_keepalive_connections=64),
            )
        return self._client

    def close(self) -> None:
        """Stop the client's loop (the server is the endpoint's to stop)."""
        if self._closed:
            return

        async def shut() -> None:
            if self._client is not None:
                await self._client.aclose()

        with contextlib.suppress(Exception):
            self._run(shut())
        self._closed = True
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10.0)
        self._loop.close()

    # --- adapters

    def add_adapter(self, name: str, path: str | os.PathLike[str], *, load: bool = True) -> str | None:
        """Register the PEFT adapter at `path` under `name` (a sampler id) and hot-load it now (`load`).

        Returns why vLLM cannot serve it (then requests for it must go to the engine sampler), else None.
        """
        resolved = str(Path(path).resolve())
        problem = adapter_problem(path, self.max_lora_rank)

        async def add() -> str | None:
            adapter = self._adapters.get(name)
            if adapter is None or adapter.path != resolved:
                adapter = self._adapters[name] = _Adapter(name=name, path=resolved, problem=problem)
            # Loaded now if the server is up; else (restarting) on the first request that needs it.
            if adapter.problem is None and load and self.endpoint.failure() is None:
                with contextlib.suppress(InvalidInputError, VllmUnavailableError):
                    await self._acquire(name, pin=False)
            return adapter.problem

        return self._run(add())

    def remove_adapter(self, name: str) -> None:
        """Forget the adapter `name` and unload it from vLLM (when its snapshot is deleted)."""

        async def remove() -> None:
            if self._adapters.pop(name, None) is not None:
                await self._unload(name)

        self._run(remove())

    def adapter_problem(self, name: str) -> str | None:
        adapter = self._adapters.get(name)
        return None if adapter is None else adapter.problem

    @property
    def adapters(self) -> list[str]:
        """Every registered adapter."""
        return list(self._adapters)

    @property
    def loaded_adapters(self) -> list[str]:
        """The adapters loaded in vLLM now (as far as this client knows), least recently used first."""

        async def loaded() -> list[str]:
            return [] if self._loaded_generation != self.endpoint.generation else list(self._loaded)

        return self._run(loaded())

    def unsupported(self, request: SampleRequest) -> str | None:
        """Why this sampler cannot serve `request` (None: it can); the caller then uses the engine sampler."""
        if request.adapter is not None:
            adapter = self._adapters.get(request.adapter)
            if adapter is None:
                return f"adapter {request.adapter!r} is not registered with the vLLM sampler"
            if adapter.problem is not None:
                return f"adapter {request.adapter!r}: {adapter.problem}"
        return unsupported(request, self.eos_token_ids)

    async def _acquire(self, name: str, *, pin: bool = True) -> None:
        """Make sure adapter `name` is loaded (evicting the least recently used if full); pin it if asked."""
        adapter = self._adapters.get(name)
        if adapter is None:
            raise NotFoundError(f"adapter {name!r} is not registered with the vLLM sampler")
        if adapter.problem is not None:
            raise InvalidInputError("adapter", f"{name!r}: {adapter.problem}")
        if self._adapter_lock is None:
            self._adapter_lock = asyncio.Lock()
        async with self._adapter_lock:
            await self._ready()
            self._sync_generation()
            if name in self._loaded:
                self._loaded.move_to_end(name)
            else:
                while len(self._loaded) >= self.max_loras:
                    victim = next((n for n in self._loaded if self._pins(n) == 0), None)
                    if victim is None:
                        break  # all in use: vLLM's scheduler queues beyond --max-loras
                    await self._unload(victim, locked=True)
                await self._load(adapter)
                self._loaded[name] = None
            if pin:
                adapter.pins += 1

    async def _trim(self) -> None:
        """Unload the least recently used adapters beyond `max_loras` that no request uses any more: a
        burst of requests for more adapters than that loads them all (vLLM queues beyond --max-loras),
        and they would otherwise stay loaded until the next load."""
        if len(self._loaded) <= self.max_loras:
            return
        if self._adapter_lock is None:
            self._adapter_lock = asyncio.Lock()
        async with self._adapter_lock:
            self._sync_generation()
            while len(self._loaded) > self.max_loras:
                victim = next((n for n in self._loaded if self._pins(n) == 0), None)
                if victim is None:
                    return  # the rest are in use: the last of them to finish trims
                await self._unload(victim, locked=True)

    def _release(self, name: str) -> None:
        adapter = self._adapters.get(name)
        if adapter is not None and adapter.pins > 0:
            adapter.pins -= 1

    def _pins(self, name: str) -> int:
        adapter = self._adapters.get(name)
        return 0 if adapter is None else adapter.pins

    def _sync_generation(self) -> None:
        if self._loaded_generation != self.endpoint.generation:  # restarted: nothing is loaded any more
            self._loaded.clear()
            self._loaded_generation = self.endpoint.generation

    async def _unload(self, name: str, *, locked: bool = False) -> None:
        if not locked:
            if self._adapter_lock is None:
                self._adapter_lock = asyncio.Lock()
            async with self._adapter_lock:
                await self._unload(name, locked=True)
            return
        self._sync_generation()
        if name not in self._loaded:
            return
        del self._loaded[name]
        if self.endpoint.failure() is None:  # a 404 (gone already) is as good as a 200
            with contextlib.suppress(VllmUnavailableError):
                await self._post("/v1/unload_lora_adapter", {"lora_name": safe_name(name)})

    async def _post(self, path: str, body: Mapping[str, Any]) -> httpx.Response:
        try:
            return await self._http().post(self.endpoint.url + path, json=body)
        except httpx.HTTPError as exc:
            raise await self._lost(exc) from None

    async def _load(self, adapter: _Adapter) -> None:
        """`/v1/load_lora_adapter`. A name the server holds already (an external server that outlived an
        earlier EZTinker) may hold other weights: it is unloaded and loaded again from our directory."""
        body = {"lora_name": adapter.vllm_name, "lora_path": adapter.path}
        response = await self._post("/v1/load_lora_adapter", body)
        if response.status_code == 400 and "already been loaded" in response.text:
            await self._post("/v1/unload_lora_adapter", {"lora_name": adapter.vllm_name})
            response = await self._post("/v1/load_lora_adapter", body)
        if response.status_code == 200:
            return
        payload = _json_or_text(response)
        error = payload.get("error") if isinstance(payload, Mapping) else None
        message = (error.get("message") if isinstance(error, Mapping) else None) or response.text[:500]
        if self.endpoint.failure() is not None:
            raise VllmUnavailableError(f"vLLM went away while loading adapter {adapter.name!r}: {message}")
        # The server is up and refuses this adapter (vLLM answers 500 for an adapter it cannot take): the
        # adapter is marked, and later requests for it go to the engine sampler.
        adapter.problem = f"vLLM refused to load it: {message}"
        raise InvalidInputError("adapter", f"{adapter.name!r}: {adapter.problem}")

    async def _ready(self) -> None:
        if self.endpoint.failure() is not None:
            await asyncio.to_thread(self.endpoint.wait_ready, self.ready_timeout)

    async def _lost(self, exc: BaseException) -> VllmUnavailableError:
        """The error for a request whose connection to vLLM broke: says whether the server died."""
        endpoint = self.endpoint
        deadline = time.monotonic() + 3.0
        while endpoint.failure() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.1)  # the monitor sees a dead process within half a second
        why = endpoint.failure()
        if why is not None:
            return VllmUnavailableError(
                f"the vLLM server for {endpoint.model!r} stopped while serving the request ({why}); "
                "retry the request once it is back"
            )
        return VllmUnavailableError(
            f"lost the connection to the vLLM server for {endpoint.model!r}: {type(exc).__name__}: {exc}"
        )

    # --- sampling

    def sample(self, requests: Sequence[SampleRequest]) -> concurrent.futures.Future[list[SampleResult]]:
        """Sample every request (concurrently, in vLLM's continuous batch); results in request order."""
        return self._submit(self._sample_all(list(requests)))

    def sample_sync(self, requests: Sequence[SampleRequest]) -> list[SampleResult]:
        return self.sample(requests).result()

    async def _sample_all(self, requests: list[SampleRequest]) -> list[SampleResult]:
        for i, request in enumerate(requests):  # bad input is refused before anything is sent
            reason = self.unsupported(request)
            if reason is not None:
                raise InvalidInputError(f"requests[{i}]" if len(requests) > 1 else "request", reason)
            self._body(request, stream=False)
        return list(await asyncio.gather(*(self._sample_one(r) for r in requests)))

    def _body(self, request: SampleRequest, *, stream: bool) -> dict[str, Any]:
        return completion_body(
            request,
            model=safe_name(request.adapter) if request.adapter else self.endpoint.served_name,
            eos_token_ids=self.eos_token_ids,
            max_model_len=self.endpoint.max_model_len,
            stream=stream,
        )

    async def _sample_one(
        self,
        request: SampleRequest,
        *,
        on_text: Callable[[int, str], None] | None = None,
        stream: bool | None = None,
    ) -> SampleResult:
        if stream is None:
            stream = request.on_token is not None
        for attempt in range(2):
            await self._ready()
            if request.adapter is not None:
                await self._acquire(request.adapter)
            try:
                if request.params.grammar is not None:
                    return await self._constrained(request, stream=stream, on_text=on_text)
                return await self._draw(request, stream=stream, on_text=on_text)
            except _AdapterMissingError as exc:  # vLLM lost it (an external server restarted): load again
                if request.adapter is not None:
                    self._loaded.pop(request.adapter, None)
                if attempt:
                    raise VllmUnavailableError(
                        f"vLLM does not find adapter {request.adapter!r}: {exc}"
                    ) from None
            finally:
                if request.adapter is not None:
                    self._release(request.adapter)
                    await self._trim()
        raise AssertionError("unreachable")

    async def _draw(
        self, request: SampleRequest, *, stream: bool, on_text: Callable[[int, str], None] | None
    ) -> SampleResult:
        """One request's samples, streamed or not. vLLM refuses prompt log-probabilities on a stream, so a
        streamed request that wants them reads them with a second, one-token request beside the stream."""
        if not stream:
            return await self._completed(request, self._body(request, stream=False))
        if not (request.prompt_logprobs or request.topk_prompt_logprobs):
            return await self._streamed(request, self._body(request, stream=True), on_text)
        bare = without_prompt_extras(request)
        drawn, entries = await asyncio.gather(
            self._streamed(bare, self._body(bare, stream=True), on_text), self._prompt_entries(request)
        )
        logprobs, topk = _prompt_extras(request, entries)
        return dataclasses.replace(drawn, prompt_logprobs=logprobs, topk_prompt_logprobs=topk)

    async def _prompt_entries(self, request: SampleRequest) -> list[Any]:
        model = safe_name(request.adapter) if request.adapter else self.endpoint.served_name
        response = await self._post("/v1/completions", prompt_body(request, model=model))
        payload = _json_or_text(response)
        if response.status_code != 200:
            raise _http_error(response.status_code, payload, request)
        entries = ((payload.get("choices") or [{}])[0]).get("prompt_logprobs")
        if not isinstance(entries, list):
            raise VllmUnavailableError("vLLM answered no prompt log-probabilities; retry the request")
        return entries

    async def _constrained(
        self, request: SampleRequest, *, stream: bool, on_text: Callable[[int, str], None] | None
    ) -> SampleResult:
        """A grammar request: sampled by vLLM, then its tokens scored again without the grammar (see
        `rescore_body`), so that its log-probabilities are the model's, as the engine's are. Its `on_token`
        callbacks fire once the numbers are right: after the sample, in order, not as vLLM draws."""
        quiet = dataclasses.replace(request, on_token=None)
        drawn = await self._draw(quiet, stream=stream and on_text is not None, on_text=on_text)
        distinct = list(dict.fromkeys(tuple(s.tokens) for s in drawn.sequences if s.tokens))  # copies once
        numbers = await asyncio.gather(*(self._rescore(request, list(key)) for key in distinct))
        scored = dict(zip(distinct, numbers, strict=True))
        sequences = []
        for sequence in drawn.sequences:
            empty = ([], [] if request.topk_sample_logprobs else None)
            logprobs, topk = scored.get(tuple(sequence.tokens), empty)
            sequences.append(dataclasses.replace(sequence, logprobs=logprobs, topk_logprobs=topk))
        result = dataclasses.replace(drawn, sequences=sequences)
        if request.on_token is not None:
            for index, sequence in enumerate(sequences):
                for j, token in enumerate(sequence.tokens):
                    top = sequence.topk_logprobs[j] if sequence.topk_logprobs is not None else None
                    last = j == len(sequence.tokens) - 1
                    request.on_token(index, token, sequence.logprobs[j], top, last)
        return result

    async def _rescore(
        self, request: SampleRequest, tokens: list[int]
    ) -> tuple[list[float], list[TopLogprobs] | None]:
        model = safe_name(request.adapter) if request.adapter else self.endpoint.served_name
        body = rescore_body(request, tokens, model=model, max_model_len=self.endpoint.max_model_len)
        response = await self._post("/v1/completions", body)
        payload = _json_or_text(response)
        if response.status_code != 200:
            raise _http_error(response.status_code, payload, request)
        choices = payload.get("choices") or [{}]
        return parse_rescored(request, tokens, choices[0])

    async def _completed(self, request: SampleRequest, body: dict[str, Any]) -> SampleResult:
        post = asyncio.ensure_future(self._http().post(self.endpoint.url + "/v1/completions", json=body))
        # A cancellable request is polled while vLLM works on it; cancelling the call closes its connection,
        # and vLLM aborts a request whose client left.
        while request.cancelled is not None and not post.done():
            await asyncio.wait([post], timeout=CANCEL_POLL_SECONDS)
            if not post.done() and request.cancelled():
                post.cancel()
                raise CancelledRequestError("the request was cancelled before vLLM finished it")
        try:
            response = await post
        except httpx.HTTPError as exc:
            raise await self._lost(exc) from None
        payload = _json_or_text(response)
        if response.status_code != 200:
            raise _http_error(response.status_code, payload, request)
        return parse_choices(request, payload.get("choices") or [])

    async def _streamed(
        self,
        request: SampleRequest,
        body: dict[str, Any],
        on_text: Callable[[int, str], None] | None = None,
    ) -> SampleResult:
        state = _StreamState(request, on_text)
        try:
            async with self._http().stream(
                "POST", self.endpoint.url + "/v1/completions", json=body
            ) as response:
                if response.status_code != 200:
                    await response.aread()
                    raise _http_error(response.status_code, _json_or_text(response), request)
                async for line in response.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    state.feed(json.loads(data))
                    if request.cancelled is not None and request.cancelled():
                        state.cut_short()  # leaving the block closes the stream: vLLM aborts the request
                        break
        except httpx.HTTPError as exc:
            raise await self._lost(exc) from None
        return state.result()

    def stream(
        self, request: SampleRequest, on_text: Callable[[int, str], None] | None = None
    ) -> concurrent.futures.Future[SampleResult]:
        """Sample `request` streamed: `request.on_token` gets each token as vLLM sends it, and `on_text(sample,
        text)` vLLM's text deltas (decoded with special tokens kept), both on the sampler's thread."""

        async def run() -> SampleResult:
            reason = self.unsupported(request)
            if reason is not None:
                raise InvalidInputError("request", reason)
            return await self._sample_one(request, on_text=on_text, stream=True)

        return self._submit(run())
