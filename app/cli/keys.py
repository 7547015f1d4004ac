"""``rag keys create|list|revoke``: API keys of the HTTP service (stored hashed)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer
from rich.table import Table

from app.cli.common import JsonOpt, console, err_console, fail, load_settings
from core.settings import Settings

if TYPE_CHECKING:  # the vLLM image runs `rag llm` without the service's dependencies
    from sqlalchemy.ext.asyncio import AsyncSession

T = TypeVar("T")


def register(app: typer.Typer) -> None:
    """Add the ``rag keys`` group to the root ``rag`` app."""
    group = typer.Typer(no_args_is_help=True, help="API keys of the HTTP service (stored hashed).")
    group.command("create")(create)
    group.command("list")(list_)
    group.command("revoke")(revoke)
    app.add_typer(group, name="keys")


async def _in_transaction(settings: Settings, work: Callable[[AsyncSession], Awaitable[T]]) -> T:
    from core.wiring import open_database

    db = await open_database(settings)
    try:
        async with db.sessionmaker() as session:
            result = await work(session)
            await session.commit()
            return result
    finally:
        await db.aclose()


def _key_json(key: Any) -> dict[str, Any]:
    return {
        "id": key.id,
        "name": key.name,
        "prefix": key.prefix,
        "admin": key.admin,
        "collections": list(key.collections),
        "created_at": key.created_at.isoformat() if key.created_at else None,
        "last_used_at": key.last_used_at.isoformat() if key.last_used_at else None,
        "revoked_at": key.revoked_at.isoformat() if key.revoked_at else None,
    }


def create(
    name: Annotated[str, typer.Option("--name", "-n", help="Who or what the key is for.")],
    collection: Annotated[
        list[str] | None, typer.Option("--collection", "-c", help="A collection the key may use (repeatable).")
    ] = None,
    admin: Annotated[bool, typer.Option("--admin", help="Every collection, jobs and folders.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Create an API key and print its token (shown once: only its hash is stored)."""
    from app.services import keys
    from app.services.errors import InvalidInput

    async def work(session: AsyncSession) -> Any:
        return await keys.create_key(session, name=name, collections=collection or [], admin=admin)

    try:
        created = asyncio.run(_in_transaction(load_settings(), work))
    except InvalidInput as e:
        fail(e.message)
    if as_json:
        typer.echo(json.dumps({**_key_json(created.key), "token": created.token}))
        return
    scope = "admin (every collection)" if admin else ", ".join(created.key.collections)
    console.print(f"created key [bold]{created.key.id}[/] ({name}) for {scope}")
    typer.echo(created.token)
    err_console.print("store this token now: it cannot be shown again")


def list_(as_json: JsonOpt = False) -> None:
    """List API keys (never their tokens)."""
    from app.services import keys

    rows = [_key_json(k) for k in asyncio.run(_in_transaction(load_settings(), keys.list_keys))]
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    table = Table(title="API keys")
    for col in ("id", "name", "prefix", "scope", "created", "last used", "revoked"):
        table.add_column(col, overflow="fold")
    for r in rows:
        table.add_row(
            str(r["id"]),
            r["name"],
            r["prefix"] + "…",
            "admin" if r["admin"] else ", ".join(r["collections"]),
            (r["created_at"] or "")[:19],
            (r["last_used_at"] or "-")[:19],
            (r["revoked_at"] or "")[:19],
        )
    console.print(table)


def revoke(ident: Annotated[str, typer.Argument(help="The key's id, name or prefix.")]) -> None:
    """Revoke an API key (requests with it get 401 from now on)."""
    from app.services import keys
    from app.services.errors import NotFound

    async def work(session: AsyncSession) -> Any:
        return await keys.revoke_key(session, ident)

    try:
        key = asyncio.run(_in_transaction(load_settings(), work))
    except NotFound as e:
        fail(e.message)
    console.print(f"revoked key [bold]{key.id}[/] ({key.name})")
