"""The websocket ``/v1/chat`` protocol's client messages (see docs/websocket.md).

Server messages are the answer and job events of :mod:`app.schemas.events` with the request's
``id`` added, plus ``ready``, ``pong`` and ``ping``.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, StringConstraints

from app.schemas.ask import AskRequest
from app.schemas.common import Request

RequestId = Annotated[str, StringConstraints(min_length=1, max_length=64)]


class WsAsk(AskRequest):
    """Ask a question; events for it carry the same ``id``."""

    type: Literal["ask"]
    id: RequestId


class WsWatchJob(Request):
    """Follow an ingestion job: its events (``file``, ``progress``, ``job_end``) carry the same ``id``."""

    type: Literal["watch_job"]
    id: RequestId
    job_id: int = Field(ge=1, le=2**31 - 1)
    after: int = Field(default=0, ge=0, description="Skip `file` events up to this id (resuming).")


class WsCancel(Request):
    """Stop the answer (or job watch) with this ``id``: its stream ends with an ``error`` event,
    code ``cancelled``. Stopping a watch does not cancel the job (``POST /v1/jobs/{id}/cancel`` does)."""

    type: Literal["cancel"]
    id: RequestId


class WsPing(Request):
    """The server answers ``{"type": "pong"}``."""

    type: Literal["ping"]


class WsAuth(Request):
    """Credentials, for clients that cannot set headers (browsers): must be the first message."""

    type: Literal["auth"]
    api_key: Annotated[str, StringConstraints(min_length=1, max_length=200)]


ClientMessage = Annotated[WsAsk | WsWatchJob | WsCancel | WsPing | WsAuth, Field(discriminator="type")]
