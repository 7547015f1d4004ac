"""``rag run`` (what ``make run`` starts): the whole embedded stack in one command.

Starts, in order, and stops in reverse on Ctrl-C or when any of them dies:

1. the database schema (migrations);
2. the model server at ``llm.base_url``: one already listening there is adopted when it serves
   ``llm.model`` (and refused when it serves another model: answers would fail later, far from
   the cause); else, with ``llm.manage``, the embedded vLLM CPU server is prepared on first use
   and started, bound to ``llm.base_url``'s host and port;
3. the ingestion worker (``rag worker``);
4. the API (``rag serve``) on ``server.host:server.port``.

Every step is named with how long it usually takes when it starts and with its elapsed time when
it ends, and a step that runs long writes a line every few seconds (:class:`core.progress.Progress`),
so ``make run > run.log`` reads as a timeline. The URL is printed only once ``GET /readyz``
answers ok, followed by what to try next. Each part runs as its own process so a crash of one is
visible and the others stop cleanly; the worker's and the API's output go to ``<data_dir>/logs``.

Exception tree::

    SupervisorError     the stack could not be started; the message says which part and why
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import IO, Any, TextIO

from core.progress import Progress, format_duration
from core.settings import Settings
from serving.cli import PREPARE_USUALLY, run_prepare
from serving.launcher import (
    LauncherError,
    ManagedServer,
    bind_address,
    default_model_dir,
    describe_listener,
    fetch_models,
    find_packaged_gguf,
    llm_python,
    serve_command,
    serve_env,
)

#: What each step usually takes on a 2-core machine (said when it starts, so a wait is expected).
USUALLY = {
    "llm": "25-40 s",
    "worker": "a second",
    "api": "10-30 s: it loads the embedding model and the index",
}


class SupervisorError(Exception):
    """The stack could not be started; the message says which part and why."""


@dataclass(frozen=True, slots=True)
class AdoptedServer:
    """A model server that was already listening at ``llm.base_url``."""

    base_url: str
    models: list[str]
    origin: str | None
    """The process listening on its port (:func:`serving.launcher.describe_listener`), if known."""


def _rag() -> str:
    return str(Path(sys.executable).with_name("rag"))


def _say(out: TextIO, text: str) -> None:
    print(text, file=out, flush=True)


@contextlib.contextmanager
def step(label: str, out: TextIO, *, usually: str | None = None) -> Iterator[Progress]:
    """One named step: a line when it starts (with ``usually``), one every few seconds while it
    runs, and one with its elapsed time when it ends (``done`` or ``stopped``)."""
    with Progress(label, unit=None, usually=usually, stream=out, tty=False) as progress:
        yield progress


def adopt_running(settings: Settings) -> AdoptedServer | None:
    """The model server already answering at ``llm.base_url``, or ``None`` if nothing answers.

    Raises:
        SupervisorError: It answers but does not serve ``llm.model``.
    """
    llm = settings.llm
    try:
        models = fetch_models(llm.base_url, timeout=2.0)
    except (OSError, ValueError):
        return None
    try:
        _host, port = bind_address(llm.base_url)
    except ValueError:
        origin = None
    else:
        origin = describe_listener(port)
    if llm.model not in models:
        raise SupervisorError(
            f"a model server already listens at {llm.base_url} ({origin or 'process unknown'}) but serves "
            f"{', '.join(models) or 'no model'}, not the configured {llm.model!r} (RAG_LLM__MODEL). Stop it, "
            "set RAG_LLM__MODEL to what it serves, or point RAG_LLM__BASE_URL at another port"
        )
    return AdoptedServer(llm.base_url, models, origin)


def start_llm(settings: Settings, log_dir: Path, out: TextIO) -> ManagedServer | None:
    """Adopt the model server at ``llm.base_url``, or prepare and start the embedded one there.

    Returns the started server (the caller stops it), or ``None`` when none was started.

    Raises:
        SupervisorError: A server of another model is listening, the vLLM virtualenv is missing,
            preparation failed, or the server did not start.
    """
    llm = settings.llm
    adopted = adopt_running(settings)
    if adopted is not None:
        _say(out, f"model server: already running at {adopted.base_url}, serving {', '.join(adopted.models)}")
        _say(out, f"model server: started outside rag run ({adopted.origin or 'process not visible from here'})")
        return None
    if not llm.manage:
        _say(out, f"warning: no model server answers at {llm.base_url} (RAG_LLM__MANAGE=false); answers get 503")
        return None
    try:
        host, port = bind_address(llm.base_url)
        python = llm_python(llm.venv)
        gguf = find_packaged_gguf(llm.venv)
    except ValueError as e:
        raise SupervisorError(f"RAG_LLM__BASE_URL: {e}") from e
    except Exception as e:
        raise SupervisorError(f"{e} (run `make llm` to create {llm.venv})") from e
    model_dir = default_model_dir(settings.data_dir)
    with (
        step("model preparation", out, usually=PREPARE_USUALLY) as progress,
        (log_dir / "prepare.log").open("a") as log,
    ):
        progress.update(current=f"{model_dir}, log {log_dir / 'prepare.log'}")
        try:
            run_prepare(llm.venv, model_dir, gguf=gguf, log=log, progress=progress)
        except LauncherError as e:
            raise SupervisorError(f"model preparation failed (log: {log_dir / 'prepare.log'}): {e}") from e
    server = ManagedServer(
        serve_command(model_dir, llm.model, host, port, max_model_len=llm.max_model_len, python=python),
        host=host,
        port=port,
        env=serve_env(kv_cache_gib=1),
        expected_model=llm.model,
        log_path=log_dir / "vllm.log",
        startup_timeout=600,
        nice=llm.server_nice,
    )
    with step("model server start", out, usually=USUALLY["llm"]) as progress:
        progress.update(current=f"vLLM (CPU) on {server.base_url}, log {log_dir / 'vllm.log'}")
        try:
            server.start()
        except Exception as e:
            raise SupervisorError(str(e)) from e
    return server


def wait_ready(
    api_url: str,
    *,
    alive: Callable[[], bool],
    timeout: float = 300.0,
    poll: float = 0.5,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Poll ``GET {api_url}/readyz`` until it answers 200 with ``ready`` or ``degraded``.

    Returns the readiness body.

    Raises:
        SupervisorError: ``alive()`` turned false (the API exited) or ``timeout`` passed.
    """
    deadline = time.monotonic() + timeout
    last = "no answer yet"
    while True:
        if not alive():
            raise SupervisorError(f"the API exited before it was ready ({last})")
        try:
            with urllib.request.urlopen(f"{api_url}/readyz", timeout=5.0) as resp:
                body: dict[str, Any] = json.load(resp)
            if body.get("status") in ("ready", "degraded"):
                return body
            last = f"/readyz: {body.get('status')}"
        except urllib.error.HTTPError as e:
            last = f"/readyz: HTTP {e.code}"
        except (OSError, ValueError):
            last = "/readyz: not answering yet"
        if progress is not None:
            progress.update(current=last)
        if time.monotonic() > deadline:
            raise SupervisorError(f"the API was not ready after {timeout:.0f} s ({last})")
        time.sleep(poll)


def next_steps(settings: Settings, readiness: dict[str, Any]) -> str:
    """The block printed once the service is ready: where it is and three things to try."""
    url = settings.api_url
    rag = _rag()
    with contextlib.suppress(ValueError):
        rag = str(Path(rag).relative_to(Path.cwd()))
    lines = [f"ready: {url} (/readyz: {readiness.get('status')})"]
    failing = [name for name, c in (readiness.get("checks") or {}).items() if not c.get("ok")]
    if failing:
        lines.append(f"  not ok: {', '.join(failing)} (answers need the model server; search works)")
    lines += [
        "",
        "try this (in another terminal):",
        f"  open the chat page   {url}/   (API docs: {url}/docs)",
        f"  ingest a folder      {rag} ingest path/to/docs --collection notes",
        f'  ask a question       {rag} ask "What do my notes say about X?" --collection notes',
        "",
        f"logs: {settings.data_dir / 'logs'} · Ctrl-C stops everything",
    ]
    return "\n".join(lines)


def _tail(path: Path, lines: int = 20) -> str:
    with contextlib.suppress(OSError), path.open("rb") as fh:
        return b"".join(deque(fh, maxlen=lines)).decode("utf-8", "replace").rstrip()
    return ""


def run_stack(settings: Settings, *, out: TextIO | None = None) -> int:
    """Run migrations, model server, worker and API until interrupted; returns an exit status."""
    from core.db.migrate import upgrade

    out = out or sys.stdout
    log_dir = settings.data_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    stop = False

    def on_signal(signum: int, frame: FrameType | None) -> None:
        nonlocal stop
        stop = True

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    llm: ManagedServer | None = None
    children: list[tuple[str, subprocess.Popen[bytes], Path]] = []
    logs: list[IO[bytes]] = []
    status = 0
    started = time.monotonic()
    try:
        _say(out, f"rag run: database, model server, ingestion worker and API (data in {settings.data_dir})")
        with step("database migrations", out, usually="a second"):
            upgrade(settings.database_url)
        llm = start_llm(settings, log_dir, out)
        env = {**os.environ, "RAG_LLM__BASE_URL": settings.llm.base_url, "RAG_LLM__MODEL": settings.llm.model}

        def spawn(name: str, args: list[str]) -> subprocess.Popen[bytes]:
            log_path = log_dir / f"{name}.log"
            log = log_path.open("ab")
            logs.append(log)
            proc = subprocess.Popen([_rag(), *args], env=env, stdout=log, stderr=subprocess.STDOUT)
            children.append((name, proc, log_path))
            return proc

        with step("ingestion worker", out, usually=USUALLY["worker"]) as progress:
            progress.update(current=f"log {log_dir / 'worker.log'}")
            spawn("worker", ["worker"])
        with step("API", out, usually=USUALLY["api"]) as progress:
            progress.update(current=f"http://{settings.server.host}:{settings.server.port}, log {log_dir / 'api.log'}")
            api = spawn("api", ["serve"])
            readiness = wait_ready(settings.api_url, alive=lambda: api.poll() is None and not stop, progress=progress)
        _say(out, f"all started in {format_duration(time.monotonic() - started)}")
        _say(out, next_steps(settings, readiness))
        while not stop:
            for name, proc, log_path in children:
                if proc.poll() is not None:
                    _say(out, f"{name} exited with status {proc.returncode}; stopping. Last lines of {log_path}:")
                    _say(out, _tail(log_path))
                    status = proc.returncode or 1
                    stop = True
            if llm is not None and not llm.running():
                _say(out, f"the model server exited; stopping. Last lines of its log:\n{llm.log_tail(20)}")
                status, stop = 1, True
            time.sleep(0.5)
    except SupervisorError as e:
        if not stop:
            print(f"error: {e}", file=sys.stderr, flush=True)
            for name, proc, log_path in children:
                if proc.poll() is not None:
                    print(f"last lines of {log_path} ({name}):\n{_tail(log_path)}", file=sys.stderr, flush=True)
        status = 1 if not stop else status
    finally:
        if children or llm is not None:
            _say(out, "stopping ...")
        for _name, proc, _log in reversed(children):
            if proc.poll() is None:
                proc.terminate()
        for _name, proc, _log in reversed(children):
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=20)
            if proc.poll() is None:
                proc.kill()
        if llm is not None:
            llm.stop()
        for log in logs:
            log.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return status
