"""Typed dependencies of the routes (``Annotated`` aliases, as in the FastAPI template).

* ``ResourcesDep``: the process's :class:`~app.resources.Resources` (built by the lifespan).
* ``SessionDep``: one ``AsyncSession`` for the route, closed when the route returns (before a
  streamed body is sent). The route commits; services only flush.
* ``PrincipalDep``: who the request acts for, from ``Authorization: Bearer rag_...`` (the local
  anonymous admin when auth is disabled).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, Path
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.ext.asyncio import AsyncSession
from starlette.requests import HTTPConnection
from starlette.types import Scope

from app.resources import Resources
from app.services import keys
from app.services.errors import Forbidden, Unauthorized


async def get_resources(conn: HTTPConnection) -> Resources:
    """The resources the lifespan built.

    ``async`` although it awaits nothing: FastAPI runs a plain ``def`` dependency in its thread
    pool, and this one is in every request; under a burst that was a thread hop per request and
    dozens of pool threads taking the GIL from the event loop (seen in a profile of the load bench).
    """
    resources: Resources = conn.app.state.resources
    return resources


ResourcesDep = Annotated[Resources, Depends(get_resources)]


async def get_session(resources: ResourcesDep) -> AsyncIterator[AsyncSession]:
    """A session for one route; rolled back unless the route committed."""
    async with resources.sessionmaker() as session:
        yield session


SessionDep = Annotated[AsyncSession, Depends(get_session, scope="function")]

_bearer = HTTPBearer(
    auto_error=False,
    scheme_name="ApiKey",
    description="An API key created with `rag keys create` (not needed when auth is disabled).",
)


async def principal_for_token(resources: Resources, token: str | None) -> keys.Principal:
    """Authenticate ``token`` in a short transaction of its own.

    Raises:
        Unauthorized: Auth is on and the token is missing, unknown or revoked.
    """
    settings = resources.settings
    if not settings.auth.enabled:
        return keys.ANONYMOUS_ADMIN
    if not token:
        raise Unauthorized("missing API key: send `Authorization: Bearer rag_...`")
    async with resources.sessionmaker() as session:
        principal = await keys.authenticate(session, token, touch_every=settings.auth.touch_every_seconds)
        await session.commit()
    return principal


async def get_principal(
    conn: HTTPConnection,
    resources: ResourcesDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> keys.Principal:
    """The principal of the request's bearer token; counts the request against its key's rate.

    Raises:
        Unauthorized: Missing, unknown or revoked key (auth on).
        RateLimited: The key used its requests of the minute (the ``RateLimit-*`` headers say so).
    """
    return await admit(resources, credentials.credentials if credentials else None, conn.scope)


async def admit(resources: Resources, token: str | None, scope: Scope) -> keys.Principal:
    """Authenticate ``token`` and count the request against its key's rate (every HTTP transport:
    the routes through :func:`get_principal`, the MCP endpoint directly).

    The rate state goes into the connection's ``state`` for :class:`~app.api.middleware.RequestContext`
    to send as ``RateLimit-*`` headers.

    Raises:
        Unauthorized: Missing, unknown or revoked key (auth on).
        RateLimited: The key used its requests of the minute.
    """
    principal = await principal_for_token(resources, token)
    state = resources.admission.keys.hit(principal)
    if state is not None:
        scope.setdefault("state", {})["ratelimit"] = state  # RequestContext sends the headers
    return principal


PrincipalDep = Annotated[keys.Principal, Depends(get_principal)]

RowId = Annotated[int, Path(ge=1, le=2**31 - 1, description="Row id.")]
"""A database id in a URL path (bounded: ids are 32-bit integer columns)."""


async def get_admin(principal: PrincipalDep) -> keys.Principal:
    """The principal, if it is an admin (every caller when auth is disabled).

    Raises:
        Forbidden: A key that is not an admin key.
    """
    if not principal.admin:
        raise Forbidden("this endpoint needs an admin API key")
    return principal


AdminDep = Annotated[keys.Principal, Depends(get_admin)]
"""An admin principal (``/metrics``, and the details of ``/readyz``)."""


async def get_optional_principal(
    resources: ResourcesDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> keys.Principal | None:
    """The request's principal, or ``None`` when it sent no valid key (probes send none)."""
    try:
        return await principal_for_token(resources, credentials.credentials if credentials else None)
    except Unauthorized:
        return None


OptionalPrincipalDep = Annotated[keys.Principal | None, Depends(get_optional_principal)]
