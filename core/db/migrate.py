"""Run Alembic migrations programmatically (CLI, worker start-up, API lifespan, tests)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from alembic import command
from alembic.config import Config

_ROOT = Path(__file__).resolve().parents[2]


def alembic_config(url: str) -> Config:
    """An Alembic config pointing at our migrations, for ``url``."""
    ini = _ROOT / "alembic.ini"
    config = Config(str(ini)) if ini.exists() else Config()
    config.set_main_option("script_location", str(_ROOT / "migrations"))
    config.attributes["url"] = url
    config.attributes["configure_logging"] = False
    return config


def upgrade(url: str, revision: str = "head") -> None:
    """Bring the database at ``url`` to ``revision`` (blocking; run it off the event loop)."""
    command.upgrade(alembic_config(url), revision)


async def aupgrade(url: str, revision: str = "head") -> None:
    """``upgrade`` in a thread: Alembic's async env runs its own event loop."""
    await asyncio.to_thread(upgrade, url, revision)
