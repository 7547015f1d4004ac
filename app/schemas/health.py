"""Health and readiness on the wire."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel


class Check(BaseModel):
    """One readiness check."""

    ok: bool
    detail: str
    ms: float


class Readiness(BaseModel):
    """Every check; the status is 503 when the database is down (the model server only degrades answers)."""

    status: Literal["ready", "degraded", "unavailable"]
    checks: dict[str, Check]


class Health(BaseModel):
    """The process answers."""

    status: Literal["ok"] = "ok"
