"""API keys and the principal a request acts as.

A token is ``rag_`` + 43 random URL-safe characters (256 bits). Only its sha256 is stored, so
a database leak does not leak usable keys; the token is shown once, at creation. Lookups go
through the unique hash column.

A :class:`Principal` is what every service receives: either an admin (every collection) or a
key scoped to collection names. All collection access goes through :meth:`Principal.can_read`
and :meth:`Principal.visible`, so scoping is decided in one place.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from app.services.errors import InvalidInput, NotFound, Unauthorized
from core.db.base import utcnow
from core.db.models import ApiKey
from ingest.queue import InvalidCollectionName, check_collection_name

TOKEN_PREFIX = "rag_"
_PREFIX_CHARS = 12  # "rag_" + 8 random characters: enough to tell keys apart in a listing


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a request acts for.

    Attributes:
        key_id: The API key's id; ``None`` when auth is disabled (the local anonymous admin).
        name: The key's name (for logs).
        admin: May see and manage every collection, jobs and folders.
        collections: Collection names a non-admin key may use.
    """

    key_id: int | None
    name: str
    admin: bool
    collections: frozenset[str] = frozenset()

    def can_read(self, collection: str) -> bool:
        """Whether this principal may read, search or ask ``collection``."""
        return self.admin or collection in self.collections

    def visible(self, names: Iterable[str]) -> list[str]:
        """The subset of ``names`` this principal may see, order kept."""
        return [n for n in names if self.can_read(n)]


ANONYMOUS_ADMIN = Principal(key_id=None, name="anonymous", admin=True)


def hash_token(token: str) -> str:
    """The stored form of a token."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def new_token() -> str:
    """A fresh random token."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


@dataclass(frozen=True, slots=True)
class CreatedKey:
    """A new key: the row and the token (which is never retrievable again)."""

    key: ApiKey
    token: str


async def create_key(
    session: AsyncSession, *, name: str, collections: Sequence[str] = (), admin: bool = False
) -> CreatedKey:
    """Create a key (flushes, never commits).

    Raises:
        InvalidInput: An empty name, an invalid collection name, or a non-admin key without collections.
    """
    name = name.strip()
    if not name or len(name) > 128:
        raise InvalidInput("a key needs a name of 1-128 characters", field="name")
    try:
        names = sorted({check_collection_name(c) for c in collections})
    except InvalidCollectionName as e:
        raise InvalidInput(str(e), field="collection") from e
    if not admin and not names:
        raise InvalidInput("a key needs at least one collection, or --admin", field="collection")
    token = new_token()
    key = ApiKey(
        name=name,
        prefix=token[:_PREFIX_CHARS],
        key_hash=hash_token(token),
        admin=admin,
        collections=names,
    )
    session.add(key)
    await session.flush()
    return CreatedKey(key, token)


async def list_keys(session: AsyncSession, *, include_revoked: bool = True) -> list[ApiKey]:
    """Every key, oldest first."""
    stmt = select(ApiKey).order_by(ApiKey.id)
    if not include_revoked:
        stmt = stmt.where(ApiKey.revoked_at.is_(None))
    return list(await session.scalars(stmt))


async def revoke_key(session: AsyncSession, ident: str) -> ApiKey:
    """Revoke the key whose id, name or prefix is ``ident`` (flushes, never commits).

    Raises:
        NotFound: No key, or several keys, match.
    """
    clauses = [ApiKey.name == ident, ApiKey.prefix == ident]
    if ident.isdigit():
        clauses.append(ApiKey.id == int(ident))
    found = list(await session.scalars(select(ApiKey).where(or_(*clauses))))
    if not found:
        raise NotFound(f"no API key matches {ident!r}")
    if len(found) > 1:
        raise NotFound(f"{len(found)} keys match {ident!r}; revoke by id")
    key = found[0]
    if key.revoked_at is None:
        key.revoked_at = utcnow()
        await session.flush()
    return key


def principal_for(key: ApiKey) -> Principal:
    """The principal of a key row."""
    return Principal(key_id=key.id, name=key.name, admin=key.admin, collections=frozenset(key.collections))


async def authenticate(session: AsyncSession, token: str, *, touch_every: float = 60.0) -> Principal:
    """The principal of ``token``; refreshes ``last_used_at`` at most every ``touch_every`` seconds.

    Flushes, never commits: the caller commits (a short transaction of its own).

    Raises:
        Unauthorized: Unknown or revoked token.
    """
    if not token.startswith(TOKEN_PREFIX):
        raise Unauthorized("invalid API key")
    key = await session.scalar(select(ApiKey).where(ApiKey.key_hash == hash_token(token)))
    if key is None:
        raise Unauthorized("invalid API key")
    if key.revoked_at is not None:
        raise Unauthorized("this API key was revoked")
    now = utcnow()
    if key.last_used_at is None or now - key.last_used_at > timedelta(seconds=touch_every):
        # A conditional UPDATE, not an ORM write: concurrent requests need no row lock.
        await session.execute(update(ApiKey).where(ApiKey.id == key.id).values(last_used_at=now))
    return principal_for(key)
