"""Errors the service layer raises; ``app/api/errors.py`` maps them (and the other packages'
errors) to HTTP statuses and error events in one place.

Exception tree::

    ServiceError                 a request the service cannot fulfil, with a message safe to show
    ├── NotFound                 no such thing, or not visible to this key (indistinguishable on purpose)
    ├── Unauthorized             no credentials, unknown or revoked key
    ├── Forbidden                the key may not do this (scope, admin-only, path outside the allowed roots)
    ├── Conflict                 the state forbids it (already exists, a job is running)
    ├── PayloadTooLarge          an upload over the limit
    ├── InvalidInput             a value the schema could not reject (``field`` names it)
    ├── AnswerFailed             an answer ended with an error event (``code``, ``retryable``)
    └── Refused                  not now: retry after ``retry_after`` seconds
        ├── Overloaded           every slot and the short queue are full (503)
        └── RateLimited          this key used its share (429)
"""

from __future__ import annotations


class ServiceError(Exception):
    """Base class of the service layer's errors. ``code`` is stable, ``message`` is for people."""

    code = "service_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class NotFound(ServiceError):
    """The resource does not exist, or the caller's key may not see it."""

    code = "not_found"


class Unauthorized(ServiceError):
    """Credentials are missing, unknown, or revoked."""

    code = "unauthorized"


class Forbidden(ServiceError):
    """The caller is known but may not do this."""

    code = "forbidden"


class Conflict(ServiceError):
    """The current state forbids the operation."""

    code = "conflict"


class PayloadTooLarge(ServiceError):
    """The request body is larger than the configured limit."""

    code = "payload_too_large"


class InvalidInput(ServiceError):
    """A value that passed the schema but is invalid (``field`` is its location, e.g. ``body.collection``)."""

    code = "invalid_input"

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class AnswerFailed(ServiceError):
    """An answer ended with an error event; ``code`` is the event's (``llm_unavailable``, ...)."""

    def __init__(self, code: str, message: str, *, retryable: bool = False) -> None:
        super().__init__(message)
        self.code = code
        self.retryable = retryable


class Refused(ServiceError):
    """The request is fine but cannot be served now; the same request may succeed ``retry_after`` s later."""

    code = "refused"
    retryable = True

    def __init__(self, message: str, *, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Overloaded(Refused):
    """Every answer (or search) slot is busy and the short queue in front of them is full."""

    code = "overloaded"


class RateLimited(Refused):
    """The API key used its request rate or its concurrent streams."""

    code = "rate_limited"
