"""The embedded generator: a small quantized model served by vLLM's CPU build.

Two halves that run in different interpreters:

- ``prepare`` runs under the ``.venv-llm`` interpreter (torch, transformers, gguf, vLLM's pins) and turns
  the packaged GGUF into an INT8 W8A8 (or 4-bit GPTQ/AWQ) checkpoint that vLLM's CPU kernels load.
- ``launcher`` is pure Python for the app's own virtualenv: it builds the command lines and environment,
  and runs/stops the vLLM OpenAI-compatible server as a child process (``ManagedServer``).

Nothing here imports torch or vLLM at import time.
"""

from __future__ import annotations

from serving.launcher import (
    DEFAULT_MODEL_DIRNAME,
    DEFAULT_SERVED_NAME,
    LauncherError,
    LLMEnvironmentMissing,
    ManagedServer,
    PrepareError,
    ServerStartError,
    default_model_dir,
    fetch_models,
    find_free_port,
    find_packaged_gguf,
    llm_python,
    prepare_command,
    serve_command,
    serve_env,
)

__all__ = [
    "DEFAULT_MODEL_DIRNAME",
    "DEFAULT_SERVED_NAME",
    "LLMEnvironmentMissing",
    "LauncherError",
    "ManagedServer",
    "PrepareError",
    "ServerStartError",
    "default_model_dir",
    "fetch_models",
    "find_free_port",
    "find_packaged_gguf",
    "llm_python",
    "prepare_command",
    "serve_command",
    "serve_env",
]
