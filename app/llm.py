"""Turns the ``llm`` settings into the generation package's constructor arguments.

Shared by the API's composition root and the CLI, so both answer the same way.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from app.settings import Settings
from generation.backends.openai_compat import OpenAICompatClient
from generation.flare import FlareParams, default_flare_params
from generation.guard import GroundingParams
from generation.types import GenerationParams

logger = logging.getLogger(__name__)


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
        "frequency_penalty": llm.frequency_penalty,
        "presence_penalty": llm.presence_penalty,
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
    stop_on_repetition: bool
    flare: FlareParams = field(default_factory=FlareParams)
    """``flare`` mode defaults of the served model (:func:`flare_defaults`)."""
    grounding: GroundingParams | None = None
    """The grounding guard (:func:`grounding_params`); ``None``: off."""

    def kwargs(self) -> dict[str, Any]:
        """As keyword arguments."""
        return {
            "k": self.k,
            "interval_tokens": self.interval_tokens,
            "max_model_len": self.max_model_len,
            "history_max_tokens": self.history_max_tokens,
            "infer_missing_citations": self.infer_missing_citations,
            "stop_on_repetition": self.stop_on_repetition,
            "flare": self.flare,
            "grounding": self.grounding,
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
        stop_on_repetition=llm.stop_on_repetition,
        flare=flare_defaults(settings),
        grounding=grounding_params(settings),
    )


def grounding_params(settings: Settings, policy: str | None = None) -> GroundingParams | None:
    """The configured grounding guard (``policy`` overrides the setting); ``None`` when it is ``off``."""
    g = settings.grounding
    chosen = policy or g.policy
    if chosen == "off":
        return None
    return GroundingParams(
        policy=chosen,  # type: ignore[arg-type]  # checked by GroundingParams
        dense_weight=g.dense_weight,
        support_threshold=g.support_threshold,
        min_support_rate=g.min_support_rate,
        max_words=g.max_words,
        fill_words=g.fill_words,
        early_stop=g.early_stop,
        abstain=g.abstain,
        abstain_retrieval=g.abstain_retrieval,
        abstain_relevance=g.abstain_relevance,
        extra_threshold=g.extra_threshold,
        rank_bonus=g.rank_bonus,
        topic_margin=g.topic_margin,
    )


def flare_defaults_path(settings: Settings) -> Path:
    """Where ``rag flare calibrate`` stores the served model's FLARE defaults: ``<data_dir>/flare/<model>.json``."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", settings.llm.model).strip("._") or "model"
    return settings.data_dir / "flare" / f"{safe}.json"


def flare_defaults(settings: Settings) -> FlareParams:
    """The served model's FLARE defaults: the calibrated file if there is one, else the built-in table.

    A file that cannot be read or holds invalid values is logged and ignored (answers keep working
    with the built-in defaults).
    """
    builtin = default_flare_params(settings.llm.model)
    path = flare_defaults_path(settings)
    if not path.is_file():
        return builtin
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
        return FlareParams.from_dict(stored.get("params", {}), base=builtin)
    except (OSError, ValueError, TypeError, AttributeError) as e:
        logger.warning("ignoring unreadable FLARE defaults", extra={"path": str(path), "error": str(e)})
        return builtin


def save_flare_defaults(settings: Settings, params: FlareParams, calibration: dict[str, Any]) -> Path:
    """Store ``params`` as the served model's FLARE defaults (with the calibration that chose them)."""
    path = flare_defaults_path(settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    body = {"model": settings.llm.model, "params": params.to_dict(), "calibration": calibration}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(body, indent=2), encoding="utf-8")
    tmp.replace(path)
    return path
