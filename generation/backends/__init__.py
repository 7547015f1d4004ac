"""Implementations of :class:`generation.client.LLMClient`.

``openai_compat`` speaks the OpenAI HTTP API as served by vLLM (the default backend) and by
llama.cpp / llama-cpp-python. The composition root picks a backend from settings and passes
plain constructor arguments; nothing here reads the environment.
"""

from generation.backends.openai_compat import DEFAULT_TIMEOUT, OpenAICompatClient

__all__ = ["DEFAULT_TIMEOUT", "OpenAICompatClient"]
