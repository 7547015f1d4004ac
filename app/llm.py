"""Turns the ``llm`` settings into the generation package's constructor arguments.

Shared by the API's composition root and the CLI, so both answer the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import httpx

from app.settings import Settings
from generation.backends.openai_compat import OpenAICompatClient
from generation.types import GenerationParams


def build_llm_client(settings: Settings) -> OpenAICompatClient:
    """The HTTP client of the configured OpenAI-compatible model server (vLLM by default)."""
    llm = settings.llm
    return OpenAICompatClient(
        llm.base_url,
        llm.model,
        api_key=llm.api_key.get_secret_value() if llm.api_key else None,
        timeout=httpx.Timeout(llm.timeout_seconds, connect=llm.connect_timeout_seconds),
        max_retries=llm.max_retries,
    )


def generation_params(settings: Settings, **overrides: Any) -> GenerationParams:
    """Default sampling parameters from settings, with per-request ``overrides`` (None = default)."""
    llm = settings.llm
    values: dict[str, Any] = {
        "max_tokens": llm.max_tokens,
        "temperature": llm.temperature,
        "top_p": llm.top_p,
        "top_k": llm.top_k,
        "repetition_penalty": llm.repetition_penalty,
    }
    values.update({k: v for k, v in overrides.items() if v is not None})
    if "stop" in values:
        values["stop"] = tuple(values["stop"])
    return GenerationParams(**values)


@dataclass(frozen=True, slots=True)
class AnswerDefaults:
    """Keyword arguments of ``generation.rag.answer`` that come from settings."""

    k: int
    interval_tokens: int
    max_model_len: int
    history_max_tokens: int
    infer_missing_citations: bool

    def kwargs(self) -> dict[str, Any]:
        """As keyword arguments."""
        return {
            "k": self.k,
            "interval_tokens": self.interval_tokens,
            "max_model_len": self.max_model_len,
            "history_max_tokens": self.history_max_tokens,
            "infer_missing_citations": self.infer_missing_citations,
        }


def answer_defaults(settings: Settings) -> AnswerDefaults:
    """The configured answer behaviour."""
    llm = settings.llm
    return AnswerDefaults(
        k=llm.k,
        interval_tokens=llm.interval_tokens,
        max_model_len=llm.max_model_len,
        history_max_tokens=llm.history_max_tokens,
        infer_missing_citations=llm.infer_citations,
    )
