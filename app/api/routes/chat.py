"""Websocket ``/v1/chat`` (protocol: docs/websocket.md, implementation: app/api/chat_socket.py)."""

from __future__ import annotations

from fastapi import APIRouter, WebSocket

from app.api.chat_socket import ChatSocket
from app.api.deps import get_resources

router = APIRouter()


@router.websocket("/v1/chat")
async def chat(websocket: WebSocket) -> None:
    """Ask questions and receive answer events; several in flight, cancellable (docs/websocket.md)."""
    await ChatSocket(websocket, await get_resources(websocket)).serve()
