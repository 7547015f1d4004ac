"""Alembic is the only way the schema changes: head matches the models, and 0002 goes down and up
again, on SQLite and PostgreSQL."""

from __future__ import annotations

import pytest
from alembic import command

from core.db.migrate import alembic_config, upgrade

pytestmark = [pytest.mark.integration]


def test_head_matches_the_models_and_downgrades(database_url: str) -> None:
    upgrade(database_url)
    config = alembic_config(database_url)
    command.check(config)  # raises if autogenerate would emit anything
    command.downgrade(config, "0001")
    command.upgrade(config, "head")
    command.check(config)
