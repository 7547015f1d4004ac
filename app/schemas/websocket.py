"""The websocket ``/v1/chat`` protocol's client messages (see docs/websocket.md).

Server messages are the answer events of :mod:`app.schemas.events` with the ask's ``id``
added, plus ``ready``, ``pong`` and ``ping``.
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


class WsCancel(Request):
    """Stop the answer with this ``id`` (its stream ends with an ``error`` event, code ``cancelled``)."""

    type: Literal["cancel"]
    id: RequestId


class WsPing(Request):
    """The server answers ``{"type": "pong"}``."""

    type: Literal["ping"]


class WsAuth(Request):
    """Credentials, for clients that cannot set headers (browsers): must be the first message."""

    type: Literal["auth"]
    api_key: Annotated[str, StringConstraints(min_length=1, max_length=200)]


ClientMessage = Annotated[WsAsk | WsCancel | WsPing | WsAuth, Field(discriminator="type")]
