"""The CLI as a client of a running API: ``rag ask``, ``rag search`` and ``rag jobs`` use it when one is up.

In-process, those commands load the embedding model and the index first (~10 s) for work the
running service does in milliseconds; through the API they answer with well under a second of
overhead. :func:`connect` decides: it returns a client when something at ``settings.api_url``
answers ``GET /healthz`` like this service within ``cli.probe_timeout_seconds``, else ``None``
(the command then runs in-process). ``--local`` skips the probe.

The wire forms are the API's own (``SearchResponse``, ``JobOut``, the ``done`` event), so a
command prints the same thing either way.

Exception tree::

    ApiError            the API answered with an error body (``code``, ``message``, ``status``)
"""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlencode, urlsplit

from core.settings import Settings

__all__ = ["ApiClient", "ApiError", "connect"]


class ApiError(Exception):
    """The API refused or failed a request; ``code`` and ``message`` come from its error body."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"[{code}] {message}")
        self.status = status
        self.code = code
        self.message = message


class ApiClient:
    """A synchronous client of the API's JSON and SSE routes.

    The standard library's ``http.client``, not httpx: this runs once per command, and the
    import alone would be a fifth of the CLI's whole overhead. One connection per request; no
    proxy from the environment can sit between the CLI and a loopback API.

    Args:
        base_url: The API root (``http://127.0.0.1:8000``).
        api_key: Sent as ``Authorization: Bearer …`` when given.
        timeout: Seconds of silence allowed while reading (an answer streams for longer).
    """

    def __init__(self, base_url: str, *, api_key: str | None = None, timeout: float = 300.0) -> None:
        parts = urlsplit(base_url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"not an http://host:port URL: {base_url!r}")
        self.base_url = base_url
        self._host = parts.hostname
        self._port = parts.port or 80
        self._timeout = timeout
        self._headers = {"Accept": "application/json, text/event-stream"}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"

    def close(self) -> None:
        """Nothing to release (each request has its own connection); kept for ``with``."""

    def __enter__(self) -> ApiClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def search(self, body: dict[str, Any]) -> dict[str, Any]:
        """``POST /v1/search``; the ``SearchResponse`` as a dict."""
        result: dict[str, Any] = self._json("POST", "/v1/search", body)
        return result

    def jobs(self, limit: int) -> list[dict[str, Any]]:
        """``GET /v1/jobs``: the newest ``limit`` jobs in their ``JobOut`` form."""
        return list(self._json("GET", "/v1/jobs?" + urlencode({"limit": limit}))["jobs"])

    def cancel_job(self, job_id: int) -> dict[str, Any]:
        """``POST /v1/jobs/{id}/cancel``: the job in its ``JobOut`` form after the request."""
        result: dict[str, Any] = self._json("POST", f"/v1/jobs/{job_id}/cancel")
        return result

    def ask_stream(self, body: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """``POST /v1/ask/stream``: the answer events (wire form) as they arrive; the last one is
        ``done`` or ``error``. Closing the iterator closes the connection (the server stops generating)."""
        conn, resp = self._send("POST", "/v1/ask/stream", body)
        try:
            if resp.status >= 400:
                self._raise(resp)
            for raw in resp:
                line = raw.decode("utf-8").rstrip("\r\n")
                if line.startswith("data:"):
                    payload = line[5:].strip()
                    if payload and payload != "[DONE]":
                        yield json.loads(payload)
        finally:
            conn.close()

    def _send(
        self, method: str, path: str, body: dict[str, Any] | None = None
    ) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        conn = http.client.HTTPConnection(self._host, self._port, timeout=self._timeout)
        headers = dict(self._headers)
        data = None
        if body is not None:
            data = json.dumps(body).encode("utf-8")
            headers["Content-Type"] = "application/json"
        try:
            conn.request(method, path, body=data, headers=headers)
            return conn, conn.getresponse()
        except BaseException:
            conn.close()
            raise

    def _json(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        conn, resp = self._send(method, path, body)
        try:
            if resp.status >= 400:
                self._raise(resp)
            return json.loads(resp.read())
        finally:
            conn.close()

    @staticmethod
    def _raise(resp: http.client.HTTPResponse) -> None:
        text = resp.read().decode("utf-8", "replace")
        try:
            detail = json.loads(text)["error"]
            code, message = str(detail["code"]), str(detail["message"])
        except (ValueError, KeyError, TypeError):
            code, message = "http_error", f"HTTP {resp.status}: {text[:200]}"
        raise ApiError(resp.status, code, message)


def connect(settings: Settings) -> ApiClient | None:
    """A client of the API at ``settings.api_url`` if this service answers there, else ``None``.

    Only the probe's connection has the short ``cli.probe_timeout_seconds``: nothing listening
    costs a refused connection (microseconds), a hung port at most that long. Once connected, a
    busy API gets a few seconds to answer (falling back to loading the model here would be slower).
    """
    url = settings.api_url
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port or 80)
    try:
        # Connect with the short timeout, then read with a longer one.
        conn.timeout = settings.cli.probe_timeout_seconds
        conn.connect()
        assert conn.sock is not None
        conn.sock.settimeout(5.0)
        conn.request("GET", "/healthz")
        resp = conn.getresponse()
        alive = resp.status == 200 and json.loads(resp.read()).get("status") == "ok"
    except (OSError, ValueError, AttributeError, http.client.HTTPException):
        return None
    finally:
        conn.close()
    if not alive:
        return None
    key = settings.cli.api_key.get_secret_value() if settings.cli.api_key is not None else None
    return ApiClient(url, api_key=key, timeout=settings.llm.timeout_seconds + 30)
