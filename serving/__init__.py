"""The embedded generator's tooling: a small quantized model served by vLLM's CPU build.

Parts that run in different interpreters:

- ``prepare`` runs under the ``.venv-llm`` interpreter (torch, transformers, gguf, vLLM's pins) and turns
  the packaged GGUF into an INT8 W8A8 (or 4-bit GPTQ/AWQ) checkpoint that vLLM's CPU kernels load.
- ``launcher`` is pure Python for the app's own virtualenv: it builds the command lines and environment,
  and runs/stops the vLLM OpenAI-compatible server as a child process (``ManagedServer``).
- ``supervisor`` runs the whole embedded stack (``rag run``); ``cli`` is ``rag llm …``.

Nothing here imports torch or vLLM at import time.
"""
