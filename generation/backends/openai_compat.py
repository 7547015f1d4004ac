"""An :class:`~generation.client.LLMClient` for OpenAI-compatible servers: vLLM first, llama.cpp too.

Everything streams: ``complete``/``chat`` gather a stream, so there is one parser and the read
timeout always means "no byte for that long", never "the whole answer took that long".

Server differences this client absorbs:

* vLLM: ``/v1/completions`` log-probabilities as ``tokens``/``token_logprobs``/``top_logprobs``,
  usage in a final ``choices: []`` chunk (``stream_options.include_usage``), ``POST /tokenize``
  with ``{"model", "prompt"}``, errors as ``{"error": {...}}`` or ``{"object": "error", ...}``.
* llama.cpp's server: ``text_offset`` counted from the start of the prompt (we never use
  ``text_offset``), an extra empty final chunk, ``/tokenize`` with ``{"content"}``,
  ``exceed_context_size_error`` with ``n_ctx``/``n_prompt_tokens``.
* llama-cpp-python (checked against 0.3.36 by ``tests/integration/test_second_server.py``):
  ``/extras/tokenize`` with ``{"input"}``; no usage in streams (it ignores ``include_usage``);
  ``repeat_penalty`` instead of ``repetition_penalty`` (we send both). A prompt that does not fit
  its context fails *after* the ``200`` status line: the event stream just ends, empty, and the
  server then closes that keep-alive connection. We ask once more without streaming and
  ``max_tokens=1`` to get the error it reports there (``context_length_exceeded`` ->
  :class:`~generation.errors.ContextTooLong`), over a fresh connection (see "stale connections").

Retries: only when the request certainly did not start generating: connection failures and
``503`` answers, with exponential backoff (or the server's ``Retry-After``). Never once a
response body has started streaming.

Stale connections: a pooled keep-alive connection that the server has closed fails the next
request with a read/write error or "disconnected without sending a response" before any response
byte arrives. Such a request is sent once more, at once, on a new connection, whatever
``max_retries`` says: the server never saw it (or dropped it unanswered).
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import math
import time
from collections import OrderedDict
from collections.abc import AsyncGenerator, AsyncIterator, Mapping, Sequence
from contextlib import aclosing
from typing import Any, Final, Literal

import httpx

from generation.client import aclosing_iter
from generation.errors import (
    LLMBadRequest,
    LLMError,
    LLMProtocolError,
    LLMTimeout,
    LLMUnavailable,
    TokenizeUnsupported,
    parse_context_too_long,
)
from generation.tokenizer import estimate_tokens
from generation.types import (
    ChatMessage,
    Completion,
    GenerationParams,
    StreamDelta,
    TokenLogprob,
    Usage,
)

__all__ = ["DEFAULT_TIMEOUT", "OpenAICompatClient", "iter_sse_data"]

logger = logging.getLogger(__name__)

# ``read`` bounds the silence between two chunks of a stream (prompt processing of a 2k-token prompt
# on a busy 2-core CPU can take tens of seconds before the first token), not the whole answer.
DEFAULT_TIMEOUT: Final = httpx.Timeout(connect=5.0, read=120.0, write=30.0, pool=30.0)
_RETRY_STATUSES: Final = frozenset({503})
_UNAVAILABLE_STATUSES: Final = frozenset({429, 502, 503, 504})
_UNSUPPORTED_STATUSES: Final = frozenset({404, 405, 501})
_DONE: Final = "[DONE]"

_TokenizeShape = Literal["vllm", "llamacpp", "llama_cpp_python"]
# (path, request shape), tried in this order until one answers.
_TOKENIZE_ROUTES: Final[tuple[tuple[str, _TokenizeShape], ...]] = (
    ("/tokenize", "vllm"),
    ("/tokenize", "llamacpp"),
    ("/extras/tokenize", "llama_cpp_python"),
)


async def iter_sse_data(lines: AsyncIterator[str]) -> AsyncIterator[str]:
    """Yield the ``data`` of each server-sent event from an iterator of lines (without line endings).

    Follows the SSE rules that matter here: ``data:`` lines (one optional space after the colon)
    accumulate until a blank line; several ``data`` lines join with ``\\n``; comments (``:``) and
    other fields (``event``, ``id``, ``retry``) are ignored. Tolerates servers that omit the blank
    line between events: a ``data`` line arriving while the pending data is already a complete
    JSON document (or ``[DONE]``) starts a new event. Pending data is flushed at end of input.
    """
    pending: list[str] = []
    async for line in lines:
        if not line:
            if pending:
                yield "\n".join(pending)
                pending = []
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        if name != "data":
            continue
        if value.startswith(" "):
            value = value[1:]
        if pending and _is_complete(pending):
            yield "\n".join(pending)
            pending = []
        pending.append(value)
    if pending:
        yield "\n".join(pending)


def _is_complete(pending: list[str]) -> bool:
    data = "\n".join(pending)
    if data.strip() == _DONE:
        return True
    try:
        json.loads(data)
    except ValueError:
        return False
    return True


def _retry_after(headers: httpx.Headers) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds or HTTP date), or ``None``."""
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _error_details(body: object) -> tuple[str, Mapping[str, Any]]:
    """(message, error object) from the error bodies vLLM, llama.cpp, OpenAI and FastAPI send."""
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict):
            return str(error.get("message") or ""), error
        if isinstance(error, str):
            return error, body
        if "message" in body:  # vLLM's older ErrorResponse: {"object": "error", "message": ...}
            return str(body["message"]), body
        if "detail" in body:  # FastAPI validation errors
            return str(body["detail"]), body
    return "", {}


def error_from_status(
    status: int, body: object, *, headers: httpx.Headers | None = None, fallback: str = ""
) -> LLMError:
    """Map an HTTP status and a decoded error body to the matching :class:`LLMError`.

    Args:
        status: HTTP status (or the ``code`` of an error sent inside a stream).
        body: The decoded JSON body (anything; non-dicts are ignored).
        headers: Response headers, for ``Retry-After``.
        fallback: Message to use when the body has none.
    """
    message, details = _error_details(body)
    message = message or fallback or f"model server answered HTTP {status}"
    too_long = parse_context_too_long(message, details=details, status_code=status)
    if too_long is not None:
        return too_long
    if status == 408:
        return LLMTimeout(message, status_code=status)
    if status in _UNAVAILABLE_STATUSES:
        retry_after = _retry_after(headers) if headers is not None else None
        return LLMUnavailable(message, status_code=status, retry_after=retry_after)
    if 400 <= status < 500:
        return LLMBadRequest(message, status_code=status)
    return LLMError(message, status_code=status)


def _error_from_response(response: httpx.Response) -> LLMError:
    text = response.text
    try:
        body: object = json.loads(text) if text else None
    except ValueError:
        body = None
    return error_from_status(
        response.status_code,
        body,
        headers=response.headers,
        fallback=text[:500] if body is None else response.reason_phrase,
    )


def _is_connect_failure(exc: httpx.HTTPError) -> bool:
    """Failures that happen before the request reached the server, so retrying cannot duplicate work."""
    return isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout)


def _is_stale_connection(exc: httpx.HTTPError) -> bool:
    """A failure of a (pooled) connection before any response byte: the server closed it or never answered.

    Only meaningful when raised before the response headers arrived (callers check that). httpx says
    ``RemoteProtocolError("Server disconnected without sending a response.")`` for a connection closed
    cleanly, ``ReadError``/``WriteError`` for one reset.
    """
    return isinstance(exc, httpx.ReadError | httpx.WriteError | httpx.RemoteProtocolError)


def _translate(exc: httpx.HTTPError, where: str) -> LLMError:
    """Map an httpx exception to the generation error tree (callers ``raise ... from exc``)."""
    if _is_connect_failure(exc):
        return LLMUnavailable(f"cannot connect to the model server at {where}")
    if isinstance(exc, httpx.TimeoutException):
        return LLMTimeout(f"timed out talking to the model server at {where} ({type(exc).__name__})")
    if isinstance(exc, httpx.NetworkError | httpx.RemoteProtocolError):
        return LLMUnavailable(f"lost the connection to the model server at {where}")
    if isinstance(exc, httpx.DecodingError | httpx.ProtocolError):
        return LLMProtocolError(f"invalid HTTP from the model server at {where}: {exc}")
    return LLMError(f"request to the model server at {where} failed: {type(exc).__name__}")


def _float(value: object) -> float:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else math.nan


def _parse_logprobs(obj: object) -> tuple[TokenLogprob, ...]:
    """Per-token log-probabilities from either API shape.

    Completions (vLLM, llama-cpp-python): ``{"tokens": [...], "token_logprobs": [...],
    "top_logprobs": [{token: logprob}, ...]}``. Chat (and newer llama.cpp completions):
    ``{"content": [{"token", "logprob", "top_logprobs": [{"token", "logprob"}]}]}``.
    """
    if obj is None:
        return ()
    if not isinstance(obj, dict):
        raise LLMProtocolError("logprobs is not an object")
    content = obj.get("content")
    if isinstance(content, list):
        out: list[TokenLogprob] = []
        for item in content:
            if not isinstance(item, dict):
                raise LLMProtocolError("logprobs.content item is not an object")
            alts = item.get("top_logprobs") or []
            top = tuple((str(a.get("token", "")), _float(a.get("logprob"))) for a in alts if isinstance(a, dict))
            out.append(TokenLogprob(str(item.get("token", "")), _float(item.get("logprob")), _sorted(top)))
        return tuple(out)
    tokens = obj.get("tokens") or []
    token_logprobs = obj.get("token_logprobs") or []
    top_logprobs = obj.get("top_logprobs") or []
    if not isinstance(tokens, list) or not isinstance(token_logprobs, list) or not isinstance(top_logprobs, list):
        raise LLMProtocolError("logprobs fields are not lists")
    result: list[TokenLogprob] = []
    for i, token in enumerate(tokens):
        lp = _float(token_logprobs[i]) if i < len(token_logprobs) else math.nan
        alts_map = top_logprobs[i] if i < len(top_logprobs) else None
        top = tuple((str(t), _float(v)) for t, v in alts_map.items()) if isinstance(alts_map, dict) else ()
        result.append(TokenLogprob(str(token), lp, _sorted(top)))
    return tuple(result)


def _sorted(top: tuple[tuple[str, float], ...]) -> tuple[tuple[str, float], ...]:
    # Servers send alternatives in dict order; callers (FLARE) want the best first.
    return tuple(sorted(top, key=lambda kv: -kv[1] if not math.isnan(kv[1]) else math.inf))


def _parse_usage(obj: object) -> Usage | None:
    if not isinstance(obj, dict):
        return None
    prompt = obj.get("prompt_tokens")
    completion = obj.get("completion_tokens")
    if not isinstance(prompt, int) or not isinstance(completion, int):
        return None
    return Usage(prompt_tokens=prompt, completion_tokens=completion)


class OpenAICompatClient:
    """Talks to an OpenAI-compatible server (vLLM, llama.cpp, llama-cpp-python) over HTTP.

    Args:
        base_url: The server root, e.g. ``http://127.0.0.1:8001``; a trailing ``/v1`` is accepted
            and stripped (``/tokenize`` lives outside ``/v1``).
        model: The served model name (vLLM's ``--served-model-name``).
        api_key: Sent as ``Authorization: Bearer ...`` when set.
        timeout: An ``httpx.Timeout`` or seconds for every phase; see :data:`DEFAULT_TIMEOUT`.
        max_retries: Extra attempts after a connection failure or a 503 (0 disables retries).
        retry_backoff: First backoff in seconds; doubles per attempt.
        max_retry_wait: Cap on any single wait, including a server's ``Retry-After``.
        supports_logprobs: Capability flag read by answer modes that need log-probabilities.
        token_cache_size: Entries in the LRU cache of :meth:`count_tokens`.
        transport: An httpx transport (tests pass ``httpx.MockTransport``).
        headers: Extra headers sent with every request.
        max_connections: Most connections open to the server at once (``None``: httpx's default, 100).
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key: str | None = None,
        timeout: httpx.Timeout | float = DEFAULT_TIMEOUT,
        max_retries: int = 2,
        retry_backoff: float = 0.5,
        max_retry_wait: float = 10.0,
        supports_logprobs: bool = True,
        token_cache_size: int = 4096,
        transport: httpx.AsyncBaseTransport | None = None,
        headers: Mapping[str, str] | None = None,
        max_connections: int | None = None,
    ) -> None:
        root = base_url.rstrip("/")
        if root.endswith("/v1"):
            root = root[: -len("/v1")]
        all_headers = dict(headers or {})
        if api_key:
            all_headers["Authorization"] = f"Bearer {api_key}"
        self._model = model
        self._supports_logprobs = supports_logprobs
        self._max_retries = max(0, max_retries)
        self._retry_backoff = retry_backoff
        self._max_retry_wait = max_retry_wait
        # Error messages name the host, never the full URL (it could carry credentials).
        url = httpx.URL(root)
        self._where = f"{url.host}:{url.port}" if url.port else url.host
        self._http = httpx.AsyncClient(
            base_url=root,
            timeout=timeout if isinstance(timeout, httpx.Timeout) else httpx.Timeout(timeout),
            transport=transport,
            headers=all_headers,
            # A request beyond the cap waits for a connection (bounded by the pool timeout) rather
            # than opening the model server's 71st: its slots are the scarce thing.
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
            if max_connections
            else httpx.Limits(),
        )
        self._tokenize_route: tuple[str, _TokenizeShape] | None = None
        self._tokenize_unsupported = False
        self._token_counts: OrderedDict[str, int] = OrderedDict()
        self._token_cache_size = token_cache_size

    @property
    def model(self) -> str:
        """The served model name."""
        return self._model

    @property
    def supports_logprobs(self) -> bool:
        """Whether the server returns log-probabilities (vLLM and llama.cpp do)."""
        return self._supports_logprobs

    # --- generation ---------------------------------------------------------------------------

    def _sampling(self, params: GenerationParams) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self._model,
            "max_tokens": params.max_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if params.stop:
            body["stop"] = list(params.stop)
        if params.top_k is not None:
            body["top_k"] = params.top_k
        if params.seed is not None:
            body["seed"] = params.seed
        if params.repetition_penalty is not None:
            body["repetition_penalty"] = params.repetition_penalty
            # llama.cpp's server and llama-cpp-python call it ``repeat_penalty`` and silently ignore
            # ``repetition_penalty`` (llama-cpp-python then applies its own default, 1.1). vLLM and the
            # others accept unknown fields, so sending both names keeps the setting meaning the same.
            body["repeat_penalty"] = params.repetition_penalty
        if params.frequency_penalty is not None:
            body["frequency_penalty"] = params.frequency_penalty
        if params.presence_penalty is not None:
            body["presence_penalty"] = params.presence_penalty
        return body

    def stream(self, prompt: str, params: GenerationParams) -> AsyncIterator[StreamDelta]:
        """Stream ``POST /v1/completions`` for a raw prompt. See :class:`~generation.client.LLMClient`."""
        body = self._sampling(params)
        body["prompt"] = prompt
        if params.logprobs is not None:
            body["logprobs"] = params.logprobs
        return self._deltas("/v1/completions", body, chat=False)

    def stream_chat(self, messages: Sequence[ChatMessage], params: GenerationParams) -> AsyncIterator[StreamDelta]:
        """Stream ``POST /v1/chat/completions``; the server applies the chat template."""
        body = self._sampling(params)
        body["messages"] = [{"role": m.role, "content": m.content} for m in messages]
        if params.logprobs is not None:
            body["logprobs"] = True
            body["top_logprobs"] = params.logprobs
        return self._deltas("/v1/chat/completions", body, chat=True)

    async def complete(self, prompt: str, params: GenerationParams) -> Completion:
        """The whole completion of a raw prompt (gathered from the stream)."""
        return await _gather(self.stream(prompt, params))

    async def chat(self, messages: Sequence[ChatMessage], params: GenerationParams) -> Completion:
        """The whole answer to a conversation (gathered from the stream)."""
        return await _gather(self.stream_chat(messages, params))

    async def _deltas(self, path: str, body: dict[str, Any], *, chat: bool) -> AsyncIterator[StreamDelta]:
        finished = False
        done = False
        received = False
        usage: Usage | None = None
        # aclosing: when our consumer stops early, close the event generator now (which closes the
        # upstream response, so the server aborts the request) instead of at garbage collection.
        async with aclosing(self._events(path, body)) as events:
            async for payload in events:
                if payload is None:
                    done = True
                    break
                received = True
                usage = _parse_usage(payload.get("usage")) or usage
                choices = payload.get("choices")
                if not isinstance(choices, list):
                    continue
                for choice in choices:
                    if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                        continue
                    if chat:
                        delta = choice.get("delta")
                        content = delta.get("content") if isinstance(delta, dict) else None
                        text = content if isinstance(content, str) else ""
                    else:
                        raw_text = choice.get("text")
                        text = raw_text if isinstance(raw_text, str) else ""
                    tokens = _parse_logprobs(choice.get("logprobs"))
                    reason = choice.get("finish_reason")
                    finish_reason = reason if isinstance(reason, str) else None
                    finished = finished or finish_reason is not None
                    # Role-only chat deltas and llama.cpp's empty trailing chunk carry nothing.
                    if text or tokens or finish_reason:
                        yield StreamDelta(text=text, tokens=tokens, finish_reason=finish_reason)
        if not (finished or done):
            if not received:
                await self._raise_silent_failure(path, body)
            raise LLMProtocolError(f"the stream from {self._where} ended before the completion finished")
        if usage is not None:
            yield StreamDelta(text="", usage=usage)

    async def _raise_silent_failure(self, path: str, body: dict[str, Any]) -> None:
        """Find out why a stream answered ``200`` and then ended without a single event.

        llama-cpp-python does this when the prompt does not fit its context (the check runs once the
        event stream has started, and the error is lost); other servers may do it for other errors.
        The same request, unstreamed and with ``max_tokens=1``, reports the error as a normal error
        response. No event arrived, so nothing was generated and nothing is repeated.

        Raises:
            LLMError: The error the unstreamed request answered with (:class:`ContextTooLong` for
                llama-cpp-python's ``context_length_exceeded``).
            LLMProtocolError: It succeeded, so the stream failed for no reason we can name.
        """
        probe = {k: v for k, v in body.items() if k != "stream_options"}  # vLLM refuses it unstreamed
        probe.update(stream=False, max_tokens=1)
        response = await self._send("POST", path, json=probe)
        if response.status_code >= 400:
            raise _error_from_response(response)
        raise LLMProtocolError(
            f"the stream from {self._where} ended without any event (the same request without streaming worked)"
        )

    async def _send(self, method: str, path: str, *, json: dict[str, Any] | None = None) -> httpx.Response:
        """One non-streamed request, sent once more on a new connection if a stale pooled one failed it.

        Raises:
            LLMError: Transport failures, translated (:func:`_translate`).
        """
        for fresh in (False, True):
            try:
                return await self._http.request(method, path, json=json)
            except httpx.HTTPError as exc:
                if fresh or not _is_stale_connection(exc):
                    raise _translate(exc, self._where) from exc
                logger.info("stale connection to the model server, resending", extra={"where": self._where})
        raise AssertionError("unreachable")

    async def _events(self, path: str, body: dict[str, Any]) -> AsyncGenerator[dict[str, Any] | None, None]:
        """Parsed JSON payloads of a streaming POST; ``None`` stands for ``[DONE]``.

        Opens the response with ``async with client.stream(...)`` so that closing this generator
        (consumer done, cancelled, or failed) closes the upstream connection.
        """
        attempt = 0
        resent_stale = False
        while True:
            started = False
            error: LLMError | None = None
            delay = 0.0
            try:
                async with self._http.stream("POST", path, json=body) as response:
                    started = True
                    if response.status_code >= 400:
                        await response.aread()
                        error = _error_from_response(response)
                    else:
                        async for data in iter_sse_data(response.aiter_lines()):
                            if data.strip() == _DONE:
                                yield None
                                return
                            yield self._decode(data)
                        return
            except httpx.HTTPError as exc:
                if not started and not resent_stale and _is_stale_connection(exc):
                    # Not an attempt: the request died with a connection the server had closed.
                    resent_stale = True
                    logger.info("stale connection to the model server, resending", extra={"where": self._where})
                    continue
                if started or not _is_connect_failure(exc) or attempt >= self._max_retries:
                    raise _translate(exc, self._where) from exc
                delay = self._backoff(attempt, None)
                logger.warning("model server connect failed, retrying", extra={"where": self._where, "delay_s": delay})
            if error is not None:
                if error.status_code not in _RETRY_STATUSES or attempt >= self._max_retries:
                    raise error
                retry_after = error.retry_after if isinstance(error, LLMUnavailable) else None
                delay = self._backoff(attempt, retry_after)
                logger.warning(
                    "model server busy, retrying",
                    extra={"where": self._where, "status": error.status_code, "delay_s": delay},
                )
            attempt += 1
            await asyncio.sleep(delay)

    def _decode(self, data: str) -> dict[str, Any]:
        try:
            payload = json.loads(data)
        except ValueError as exc:
            raise LLMProtocolError(f"invalid JSON in the stream from {self._where}: {data[:200]!r}") from exc
        if not isinstance(payload, dict):
            raise LLMProtocolError(f"a stream event from {self._where} is not a JSON object")
        if "error" in payload or payload.get("object") == "error":
            # vLLM reports failures after the 200 status line as an error event inside the stream.
            _, details = _error_details(payload)
            code = details.get("code")
            status = code if isinstance(code, int) and not isinstance(code, bool) else 500
            raise error_from_status(status, payload)
        return payload

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        delay = retry_after if retry_after is not None else self._retry_backoff * (2**attempt)
        return min(delay, self._max_retry_wait)

    # --- tokenization -------------------------------------------------------------------------

    async def tokenize(self, text: str) -> list[int]:
        """Token ids of ``text`` via the server, without added special tokens where the server allows.

        The first call probes vLLM's and llama.cpp's ``/tokenize`` and llama-cpp-python's
        ``/extras/tokenize`` and remembers which one answers.

        Raises:
            TokenizeUnsupported: No tokenize endpoint answered.
            LLMError: Transport or server failures.
        """
        if self._tokenize_unsupported:
            raise TokenizeUnsupported(f"the model server at {self._where} cannot tokenize")
        routes = (self._tokenize_route,) if self._tokenize_route else _TOKENIZE_ROUTES
        for path, shape in routes:
            tokens = await self._tokenize_via(path, shape, text)
            if tokens is None or (text and not tokens):
                # Unknown route, or llama.cpp answering a vLLM-shaped body with no tokens.
                continue
            self._tokenize_route = (path, shape)
            return tokens
        if self._tokenize_route is None:
            self._tokenize_unsupported = True
            logger.warning("model server has no tokenize endpoint", extra={"where": self._where})
        raise TokenizeUnsupported(f"the model server at {self._where} cannot tokenize")

    async def _tokenize_via(self, path: str, shape: _TokenizeShape, text: str) -> list[int] | None:
        body: dict[str, Any]
        if shape == "vllm":
            body = {"model": self._model, "prompt": text, "add_special_tokens": False}
        elif shape == "llamacpp":
            body = {"content": text, "add_special": False}
        else:
            body = {"model": self._model, "input": text}
        response = await self._send("POST", path, json=body)
        if response.status_code in _UNSUPPORTED_STATUSES:
            return None
        if response.status_code in (400, 422) and self._tokenize_route is None:
            return None  # probing: this route exists but wants another body shape
        if response.status_code >= 400:
            raise _error_from_response(response)
        try:
            payload = response.json()
        except ValueError as exc:
            raise LLMProtocolError(f"invalid JSON from {path} at {self._where}") from exc
        tokens = payload.get("tokens") if isinstance(payload, dict) else None
        if not isinstance(tokens, list):
            return None
        # llama.cpp can return pieces ({"id", "piece"}) instead of ids when asked; accept both.
        ids = [t["id"] if isinstance(t, dict) else t for t in tokens]
        if not all(isinstance(i, int) for i in ids):
            raise LLMProtocolError(f"{path} at {self._where} returned non-integer tokens")
        return ids

    async def count_tokens(self, text: str) -> int:
        """Exact token count via :meth:`tokenize`, cached; ``ceil(len / 3)`` if the server cannot tokenize."""
        cached = self._token_counts.get(text)
        if cached is not None:
            self._token_counts.move_to_end(text)
            return cached
        if not text:
            return 0
        try:
            n = len(await self.tokenize(text))
        except TokenizeUnsupported:
            return estimate_tokens(text)
        self._token_counts[text] = n
        if len(self._token_counts) > self._token_cache_size:
            self._token_counts.popitem(last=False)
        return n

    # --- misc ---------------------------------------------------------------------------------

    async def max_model_len(self) -> int | None:
        """The served model's context window from ``GET /v1/models`` (vLLM's ``max_model_len``), if stated."""
        response = await self._send("GET", "/v1/models")
        if response.status_code >= 400:
            raise _error_from_response(response)
        try:
            payload = response.json()
        except ValueError as exc:
            raise LLMProtocolError(f"invalid JSON from /v1/models at {self._where}") from exc
        models = payload.get("data") if isinstance(payload, dict) else None
        for entry in models if isinstance(models, list) else []:
            if isinstance(entry, dict) and entry.get("id") == self._model:
                value = entry.get("max_model_len")
                return value if isinstance(value, int) else None
        return None

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._http.aclose()


async def _gather(deltas: AsyncIterator[StreamDelta]) -> Completion:
    parts: list[str] = []
    tokens: list[TokenLogprob] = []
    finish_reason: str | None = None
    usage: Usage | None = None
    async with aclosing_iter(deltas) as stream:
        async for delta in stream:
            parts.append(delta.text)
            tokens.extend(delta.tokens)
            finish_reason = delta.finish_reason or finish_reason
            usage = delta.usage or usage
    return Completion(text="".join(parts), tokens=tuple(tokens), finish_reason=finish_reason, usage=usage)
