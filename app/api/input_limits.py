"""Limits on what a client may send, shared by the HTTP middleware and the websocket.

One rule each: bodies and messages are UTF-8 (:func:`decode_utf8`), and JSON nests at most
:data:`MAX_JSON_DEPTH` levels (:func:`check_json_depth`) — deeper documents make Python's parser
recurse until it fails, which used to close a websocket without a word. Both raise
:class:`BadInput` with a message meant for the client.
"""

from __future__ import annotations

import re

MAX_JSON_DEPTH = 64
"""Deepest JSON nesting accepted; every request and message of the API needs fewer than ten levels."""

# A JSON string (skipped whole, brackets inside it do not count) or one bracket.
_TOKENS = re.compile(rb'"(?:[^"\\]|\\.)*"|[\[\]{}]', re.DOTALL)


class BadInput(ValueError):
    """A body or message that cannot be read; ``str(error)`` is the message for the client."""


def decode_utf8(data: bytes) -> str:
    """``data`` as text.

    Raises:
        BadInput: ``data`` is not valid UTF-8 (with the offset of the first bad byte).
    """
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadInput(f"not valid UTF-8 (byte {e.start}): send UTF-8 encoded JSON") from None


def check_json_depth(data: bytes, max_depth: int = MAX_JSON_DEPTH) -> None:
    """Refuse JSON nested deeper than ``max_depth`` (cheap: a document with few brackets is not scanned).

    Raises:
        BadInput: Too deeply nested.
    """
    if data.count(b"[") + data.count(b"{") <= max_depth:
        return
    depth = 0
    for match in _TOKENS.finditer(data):
        token = match.group()
        if token in (b"[", b"{"):
            depth += 1
            if depth > max_depth:
                raise BadInput(f"the JSON is nested more than {max_depth} levels deep")
        elif token in (b"]", b"}"):
            depth -= 1
