"""The postgres backend's pure parts: settings rules, LIKE escaping, shard connection strings,
the migration's statement splitter, tie-robust ranking."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest

from core.pgindex.index import _ranked, like_prefix
from core.pgindex.shards import libpq_kwargs
from core.settings import Settings

pytestmark = [pytest.mark.unit]

ROOT = Path(__file__).resolve().parents[2]


def test_postgres_backend_needs_a_postgresql_database(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="RAG_DATABASE__URL"):
        Settings(data_dir=tmp_path, retrieval={"backend": "postgres"})
    ok = Settings(data_dir=tmp_path, database={"url": "postgresql+asyncpg://u@h/db"}, retrieval={"backend": "postgres"})
    assert ok.retrieval.backend == "postgres" and ok.retrieval.hnsw_ef_search == 100


@pytest.mark.parametrize("shards", [["a"], ["a", "b", "c"]])
def test_shards_need_the_postgres_backend_and_a_power_of_two(tmp_path: Path, shards: list[str]) -> None:
    url = {"url": "postgresql+asyncpg://u@h/db"}
    with pytest.raises(ValueError, match="power of two"):
        Settings(data_dir=tmp_path, database=url, retrieval={"shards": ["a", "b"]})  # local backend
    if len(shards) == 3:
        with pytest.raises(ValueError, match="power of two"):
            Settings(data_dir=tmp_path, database=url, retrieval={"backend": "postgres", "shards": shards})
    else:
        Settings(data_dir=tmp_path, database=url, retrieval={"backend": "postgres", "shards": shards})


def test_like_prefix_escapes_wildcards() -> None:
    assert like_prefix("/data/a_b%c\\d/") == "/data/a\\_b\\%c\\\\d/%"


def test_libpq_connection_strings() -> None:
    assert libpq_kwargs("host=10.0.0.5 port=5433 dbname=rag_shard user=rag password='p w'") == {
        "host": "10.0.0.5",
        "port": 5433,
        "database": "rag_shard",
        "user": "rag",
        "password": "p w",
    }
    assert libpq_kwargs("postgresql://rag@h/db") == {"dsn": "postgresql://rag@h/db"}
    with pytest.raises(ValueError, match="key=value"):
        libpq_kwargs("host=h nonsense")


def test_ranking_treats_rounding_steps_as_ties() -> None:
    a = 0.1 + 0.2 + 0.3  # 0.6000000000000001
    b = 0.3 + 0.2 + 0.1  # 0.6
    assert a != b
    assert _ranked([(7, a), (3, b), (9, 1.0)]) == [(9, 1.0), (3, b), (7, a)]
    assert _ranked([(7, b), (3, a)]) == [(3, a), (7, b)]


def _migration() -> Any:
    path = ROOT / "migrations" / "versions" / "0005_pgvector_index.py"
    spec = importlib.util.spec_from_file_location("m0003", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_migration_statements_keep_function_bodies_whole() -> None:
    m = _migration()
    statements = m._statements(m._DDL)
    functions = [s for s in statements if s.startswith("CREATE FUNCTION")]
    assert len(functions) == 4
    assert all(s.count("$$") == 2 and s.rstrip().endswith("$$;") for s in functions)
    assert all(s.rstrip().endswith(";") for s in statements)
    assert sum(s.startswith("CREATE TRIGGER") for s in statements) == 4
