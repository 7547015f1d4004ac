"""``rag run`` (what ``make run`` starts): the whole embedded stack in one command.

Starts, in order, and stops in reverse on Ctrl-C or when any of them dies:

1. the model server — the embedded vLLM CPU server (prepared on first use) when
   ``llm.manage`` is true and nothing already answers at ``llm.base_url``; an external
   server (a GPU vLLM, say) is used as is;
2. the ingestion worker (``rag worker``);
3. the API (``rag serve``) on ``server.host:server.port``.

Each runs as its own process so a crash of one is visible and the others stop cleanly.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType

from core.settings import Settings
from serving.launcher import (
    ManagedServer,
    default_model_dir,
    fetch_models,
    find_packaged_gguf,
    llm_python,
    prepare_command,
    serve_command,
    serve_env,
)

logger = logging.getLogger(__name__)


class SupervisorError(Exception):
    """The stack could not be started; the message says which part and why."""


def _rag() -> str:
    return str(Path(sys.executable).with_name("rag"))


def _llm_answers(base_url: str) -> bool:
    try:
        fetch_models(base_url, timeout=2.0)
    except Exception:
        return False
    return True


def start_llm(settings: Settings, log_dir: Path) -> ManagedServer | None:
    """Start the embedded model server unless one already answers (or ``llm.manage`` is off)."""
    llm = settings.llm
    if _llm_answers(llm.base_url):
        print(f"model server already running at {llm.base_url}", flush=True)
        return None
    if not llm.manage:
        print(f"warning: no model server answers at {llm.base_url}; answers will fail with 503", flush=True)
        return None
    try:
        python = llm_python(llm.venv)
        gguf = find_packaged_gguf(llm.venv)
    except Exception as e:
        raise SupervisorError(f"{e} (run `make llm` to create {llm.venv})") from e
    model_dir = default_model_dir(settings.data_dir)
    print(f"preparing the embedded model under {model_dir} (first run only) ...", flush=True)
    prep = subprocess.run(prepare_command(python, gguf, model_dir), stdout=subprocess.PIPE, check=False)
    if prep.returncode != 0:
        raise SupervisorError(f"model preparation failed with status {prep.returncode}")
    server = ManagedServer(
        serve_command(model_dir, llm.model, llm.host, llm.port, max_model_len=llm.max_model_len, python=python),
        host=llm.host,
        port=llm.port,
        env=serve_env(kv_cache_gib=1),
        expected_model=llm.model,
        log_path=log_dir / "vllm.log",
        startup_timeout=600,
    )
    print(f"starting vLLM (CPU) on {server.base_url}, log: {log_dir / 'vllm.log'} ...", flush=True)
    started = time.monotonic()
    server.start()
    print(f"model server ready in {time.monotonic() - started:.0f}s", flush=True)
    return server


def run_stack(settings: Settings) -> int:
    """Run model server, worker and API until interrupted; returns an exit status."""
    log_dir = settings.data_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    stop = False

    def on_signal(signum: int, frame: FrameType | None) -> None:
        nonlocal stop
        stop = True

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    llm: ManagedServer | None = None
    children: list[tuple[str, subprocess.Popen[bytes]]] = []
    status = 0
    try:
        llm = start_llm(settings, log_dir)
        env = {**os.environ, "RAG_LLM__BASE_URL": settings.llm.base_url, "RAG_LLM__MODEL": settings.llm.model}
        worker_log = (log_dir / "worker.log").open("ab")
        children.append(
            ("worker", subprocess.Popen([_rag(), "worker"], env=env, stdout=worker_log, stderr=subprocess.STDOUT))
        )
        print(f"ingestion worker started, log: {log_dir / 'worker.log'}", flush=True)
        children.append(("api", subprocess.Popen([_rag(), "serve"], env=env)))
        print(
            f"API on http://{settings.server.host}:{settings.server.port} (docs at /docs, chat page at /) "
            "- Ctrl-C stops everything",
            flush=True,
        )
        while not stop:
            for name, proc in children:
                if proc.poll() is not None:
                    print(f"{name} exited with status {proc.returncode}; stopping", flush=True)
                    status = proc.returncode or 1
                    stop = True
            if llm is not None and not llm.running():
                print("the model server exited; stopping (see its log)", flush=True)
                status, stop = 1, True
            time.sleep(0.5)
    except SupervisorError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        status = 1
    finally:
        for _name, proc in reversed(children):
            if proc.poll() is None:
                proc.terminate()
        for _name, proc in reversed(children):
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=20)
            if proc.poll() is None:
                proc.kill()
        if llm is not None:
            llm.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return status
