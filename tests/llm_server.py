"""pytest plugin: the real embedded model server (vLLM CPU build, INT8 SmolLM2-135M-Instruct).

List it in ``pytest_plugins`` (or run with ``-p tests.llm_server``). The session fixture ``llm_server``
prepares the checkpoint if needed (once, ~30 s; then a no-op), starts vLLM on a free loopback port and
stops its whole process group at the end of the session. Startup takes ~25-40 s on 2 cores.

It skips with the reason when ``.venv-llm`` is missing, unless ``CI`` is set: then it fails, because CI
must exercise the real server. Knobs (environment, test-side only):

- ``RAG_LLM_VENV``: the vLLM virtualenv (default ``<repo>/.venv-llm``);
- ``RAG_DATA_DIR``: where the prepared model is cached (default ``<repo>/data``), so the conversion is
  shared with ``rag llm prepare``;
- ``RAG_TEST_LLM_BASE_URL`` (+ ``RAG_TEST_LLM_MODEL``): use an already running OpenAI-compatible server
  (a GPU vLLM, say) instead of starting one.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import pytest

from serving.launcher import (
    DEFAULT_SERVED_NAME,
    LLMEnvironmentMissing,
    ManagedServer,
    default_model_dir,
    find_free_port,
    find_packaged_gguf,
    llm_python,
    prepare_command,
    serve_command,
    serve_env,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO_ROOT / "tests" / "artifacts"


@dataclass(frozen=True)
class LLMServerInfo:
    """What a test needs to talk to the server."""

    base_url: str
    """Server root without ``/v1``."""
    model: str
    """Served model id."""
    startup_seconds: float | None = None
    log_path: Path | None = None


def skip_or_fail(reason: str) -> NoReturn:
    """Skip the test with ``reason``, or fail it when ``CI`` is set (CI must run the model-server tests)."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI is set, so the model-server tests must run)", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def llm_server() -> Iterator[LLMServerInfo]:
    """A running OpenAI-compatible server with the embedded model (started once per session)."""
    external = os.environ.get("RAG_TEST_LLM_BASE_URL")
    if external:
        yield LLMServerInfo(
            base_url=external.rstrip("/"), model=os.environ.get("RAG_TEST_LLM_MODEL", DEFAULT_SERVED_NAME)
        )
        return

    import subprocess

    venv = Path(os.environ.get("RAG_LLM_VENV", REPO_ROOT / ".venv-llm"))
    data_dir = Path(os.environ.get("RAG_DATA_DIR", REPO_ROOT / "data"))
    try:
        python = llm_python(venv)
        gguf = find_packaged_gguf(venv)
    except LLMEnvironmentMissing as e:
        skip_or_fail(str(e))
        raise  # unreachable: skip/fail raise

    model_dir = default_model_dir(data_dir)
    prep = subprocess.run(
        prepare_command(python, gguf, model_dir), capture_output=True, text=True, check=False, timeout=900
    )
    if prep.returncode != 0:
        pytest.fail(f"preparing the model failed ({prep.returncode}):\n{prep.stderr[-4000:]}", pytrace=False)

    host = "127.0.0.1"
    port = find_free_port(host)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    server = ManagedServer(
        serve_command(model_dir, DEFAULT_SERVED_NAME, host, port, python=python),
        host=host,
        port=port,
        env=serve_env(kv_cache_gib=1),
        expected_model=DEFAULT_SERVED_NAME,
        log_path=ARTIFACTS / "vllm-server.log",
        startup_timeout=600,
    )
    with server:
        yield LLMServerInfo(
            base_url=server.base_url,
            model=DEFAULT_SERVED_NAME,
            startup_seconds=server.startup_seconds,
            log_path=server.log_path,
        )
