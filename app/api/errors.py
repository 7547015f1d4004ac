"""The one mapping from domain errors to HTTP responses and error events.

Every error body is ``{"error": {"code", "message", "retryable", "fields"?}}`` (the shape OpenAI
clients read too). The same table turns an error into an ``error`` event for the streams.

=========================================  ======  =====================================
error                                      status  notes
=========================================  ======  =====================================
request validation (pydantic)              422     ``fields``: location + message each
``InvalidInput``, invalid collection name  422     ``fields`` when the field is known
``Unauthorized``                           401     ``WWW-Authenticate: Bearer``
``Forbidden``                              403
``NotFound``, ``UnknownCollectionError``   404
``Conflict``                               409
``PayloadTooLarge``                        413
``LLMUnavailable``                         503     ``Retry-After``; retrieval keeps working
``Overloaded`` (slots and queue full)      503     ``Retry-After``
``RateLimited`` (the key's share used)     429     ``Retry-After``; ``RateLimit-*`` headers
``LLMTimeout``                             504
``ContextTooLong``                         422     the question/history do not fit the model
other ``LLMError``                         502     the model server misbehaved
``IndexMismatchError``                      503   the index needs an operator (reindex)
``IndexCorruptError``                       503     ``Retry-After``; the worker rebuilds it
lost database connection, full disk         503     ``Retry-After``; ``database_unavailable``/``storage_full``
anything else                              500     logged with its traceback
=========================================  ======  =====================================
"""

from __future__ import annotations

import errno
import logging
import math
from typing import Any

import sqlalchemy.exc
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request

from app.schemas.common import ErrorDetail, ErrorResponse, FieldError
from app.services.errors import (
    AnswerFailed,
    Conflict,
    Forbidden,
    InvalidInput,
    NotFound,
    PayloadTooLarge,
    Refused,
    ServiceError,
    Unauthorized,
)
from generation.errors import GenerationError, LLMUnavailable
from generation.types import ErrorEvent
from ingest.queue import InvalidCollectionName
from retrieval.types import RetrievalError

logger = logging.getLogger(__name__)

# Status by error code: service errors, generation errors (their ``code``), retrieval errors.
_STATUS_BY_CODE: dict[str, int] = {
    "invalid_input": 422,
    "unauthorized": 401,
    "forbidden": 403,
    "not_found": 404,
    "conflict": 409,
    "payload_too_large": 413,
    "llm_unavailable": 503,
    "llm_timeout": 504,
    "context_too_long": 422,
    "llm_bad_request": 502,
    "tokenize_unsupported": 502,
    "llm_protocol_error": 502,
    "llm_error": 502,
    "generation_error": 500,
    "index_mismatch": 503,
    "index_corrupt": 503,
    "retrieval_error": 500,
    "database_unavailable": 503,
    "overloaded": 503,
    "rate_limited": 429,
    "storage_full": 503,
    "internal_error": 500,
}

_TRANSIENT_DB_ERRORS = (
    sqlalchemy.exc.OperationalError,  # connection refused/reset, server shutting down, ...
    sqlalchemy.exc.InterfaceError,  # the driver's connection is unusable
    sqlalchemy.exc.InternalError,  # asyncpg's "cannot switch to state …" after a killed backend
    sqlalchemy.exc.TimeoutError,  # no pooled connection became free in time
)


def transient(exc: BaseException) -> tuple[str, str] | None:
    """``(code, message)`` when ``exc`` is a fault that goes away by itself (database, full disk)."""
    if isinstance(exc, _TRANSIENT_DB_ERRORS) or (
        isinstance(exc, sqlalchemy.exc.DBAPIError) and exc.connection_invalidated
    ):
        return "database_unavailable", "the database is unavailable right now; retry shortly"
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return "storage_full", "the server's storage is full; retry later or ask the operator"
    return None


_SERVICE_CODES: tuple[tuple[type[ServiceError], str], ...] = (
    (InvalidInput, "invalid_input"),
    (Unauthorized, "unauthorized"),
    (Forbidden, "forbidden"),
    (NotFound, "not_found"),
    (Conflict, "conflict"),
    (PayloadTooLarge, "payload_too_large"),
)

RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": description}
    for status, description in (
        (401, "Missing, unknown or revoked API key."),
        (404, "Not found, or outside the API key's scope."),
        (422, "Invalid input; `error.fields` lists each problem."),
    )
}
"""Error responses common to every ``/v1`` route, for the OpenAPI document."""


def status_for(code: str) -> int:
    """The HTTP status of an error code (500 when unknown)."""
    return _STATUS_BY_CODE.get(code, 500)


def describe(exc: BaseException) -> tuple[str, str, bool]:
    """``(code, message, retryable)`` of a domain error; ``internal_error`` for anything else."""
    if isinstance(exc, AnswerFailed):
        return exc.code, exc.message, exc.retryable
    if isinstance(exc, ServiceError):
        for cls, code in _SERVICE_CODES:
            if isinstance(exc, cls):
                return code, exc.message, False
        return exc.code, exc.message, bool(getattr(exc, "retryable", False))
    if isinstance(exc, InvalidCollectionName):
        return "invalid_input", str(exc), False
    if isinstance(exc, GenerationError):
        return exc.code, str(exc), exc.retryable
    if isinstance(exc, RetrievalError):
        return exc.code, str(exc), exc.retryable
    fault = transient(exc)
    if fault is not None:
        return fault[0], fault[1], True
    return "internal_error", "internal error", False


def error_event(exc: BaseException) -> ErrorEvent:
    """The ``error`` event for an exception raised before or while streaming."""
    code, message, retryable = describe(exc)
    if code == "internal_error":
        logger.error("unexpected error", exc_info=exc)
    return ErrorEvent(code=code, message=message, retryable=retryable)


def error_response(
    code: str,
    message: str,
    *,
    retryable: bool = False,
    fields: list[FieldError] | None = None,
    headers: dict[str, str] | None = None,
    status: int | None = None,
    retry_after: float | None = None,
) -> JSONResponse:
    """An error response in the one documented shape."""
    body = ErrorResponse(error=ErrorDetail(code=code, message=message, retryable=retryable, fields=fields))
    status = status or status_for(code)
    headers = dict(headers or {})
    if status == 401:
        headers.setdefault("WWW-Authenticate", "Bearer")
    if status in (429, 503) and retry_after is not None:
        headers["Retry-After"] = str(max(1, math.ceil(retry_after)))
    return JSONResponse(body.model_dump(mode="json", exclude_none=True), status_code=status, headers=headers)


def _field_location(loc: tuple[int | str, ...]) -> str:
    return ".".join(str(part) for part in loc)


def install(app: FastAPI, *, retry_after_seconds: int) -> None:
    """Register the exception handlers on ``app``."""

    async def on_validation(_request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        fields = [FieldError(field=_field_location(tuple(e["loc"])), message=e["msg"]) for e in exc.errors()]
        summary = "; ".join(f"{f.field}: {f.message}" for f in fields[:5])
        return error_response("invalid_input", f"invalid request: {summary}", fields=fields)

    async def on_http(_request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        code = {404: "not_found", 405: "method_not_allowed", 401: "unauthorized"}.get(exc.status_code, "http_error")
        return error_response(code, str(exc.detail), status=exc.status_code, headers=dict(exc.headers or {}))

    async def on_domain(_request: Request, exc: Exception) -> JSONResponse:
        code, message, retryable = describe(exc)
        fields = None
        if isinstance(exc, InvalidInput) and exc.field:
            fields = [FieldError(field=exc.field, message=message)]
        retry_after: float | None = None
        if code == "llm_unavailable":
            hinted = exc.retry_after if isinstance(exc, LLMUnavailable) else None
            retry_after = hinted if hinted is not None else float(retry_after_seconds)
        elif isinstance(exc, Refused):  # overloaded (503) or rate limited (429): come back then
            retry_after = exc.retry_after
        elif retryable and status_for(code) == 503:  # an index being rebuilt, a database that blinked
            retry_after = float(retry_after_seconds)
        if status_for(code) >= 500:
            logger.warning("request failed", extra={"code": code, "error": message})
        return error_response(code, message, retryable=retryable, fields=fields, retry_after=retry_after)

    async def on_database(request: Request, exc: Exception) -> JSONResponse:
        # Only a lost connection is transient; an integrity or programming error is a bug (500).
        return await (on_domain(request, exc) if transient(exc) else on_unexpected(request, exc))

    async def on_os_error(request: Request, exc: Exception) -> JSONResponse:
        return await (on_domain(request, exc) if transient(exc) else on_unexpected(request, exc))

    async def on_unexpected(_request: Request, exc: Exception) -> JSONResponse:
        logger.error("unhandled error", exc_info=exc)
        return error_response("internal_error", "internal error")

    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
    for cls in (ServiceError, GenerationError, RetrievalError, InvalidCollectionName, *_TRANSIENT_DB_ERRORS):
        app.add_exception_handler(cls, on_domain)
    app.add_exception_handler(sqlalchemy.exc.DBAPIError, on_database)
    app.add_exception_handler(OSError, on_os_error)
    app.add_exception_handler(Exception, on_unexpected)
