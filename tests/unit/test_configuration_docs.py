"""docs/configuration.md lists every setting under its environment variable."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import BaseModel

from core.settings import Settings

pytestmark = pytest.mark.unit

DOC = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"


def env_vars() -> list[str]:
    names = []
    for section, field in Settings.model_fields.items():
        model = field.annotation
        if isinstance(model, type) and issubclass(model, BaseModel):
            names += [f"RAG_{section.upper()}__{sub.upper()}" for sub in model.model_fields]
        else:
            names.append(f"RAG_{section.upper()}")
    return names


def test_every_setting_is_documented() -> None:
    text = DOC.read_text(encoding="utf-8")
    missing = [name for name in env_vars() if f"`{name}`" not in text]
    assert not missing, f"add these to docs/configuration.md: {missing}"
