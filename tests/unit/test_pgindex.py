"""The postgres backend's pure parts: settings rules, LIKE escaping, shard connection strings,
the migration's statement splitter, tie-robust ranking."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import numpy as np
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


def test_section_leads_are_the_first_chunk_of_each_heading() -> None:
    from core.pgindex.writer import IndexedChunk, lead_ids

    vector = np.zeros(3, dtype=np.float32)
    chunks = [
        IndexedChunk(7, 1, "/a", "t", vector, heading=None, ordinal=1),
        IndexedChunk(5, 1, "/a", "t", vector, heading="", ordinal=0),  # None and "" are one section
        IndexedChunk(9, 1, "/a", "t", vector, heading="Install", ordinal=2),
        IndexedChunk(8, 1, "/a", "t", vector, heading="Install", ordinal=3),
        IndexedChunk(3, 2, "/b", "t", vector, heading="Install", ordinal=0),  # another document
    ]
    assert lead_ids(chunks) == [5, 5, 9, 9, 3]


def _rows(
    hits: dict[int, tuple[float, float]], leads: dict[int, float], keep: int
) -> list[tuple[int, float, float, bool]]:
    """A node's dense rows: its ``keep`` best hits and ``keep`` best leads, each with its lead's score."""
    best_hits = sorted(hits, key=lambda i: (-hits[i][0], i))[:keep]
    best_leads = sorted(leads, key=lambda i: (-leads[i], i))[:keep]
    return [(i, hits[i][0], hits[i][1], True) for i in best_hits] + [(i, leads[i], leads[i], False) for i in best_leads]


def test_blend_leads_gives_shards_the_candidates_of_one_node() -> None:
    """Two shards each return their top ``depth``; the blend keeps the global top ``depth`` per side
    first, so a chunk only a shard's list holds cannot enter (the single node never saw it)."""
    from core.pgindex.index import blend_leads
    from retrieval.leads import blend_candidates

    rng = np.random.default_rng(3)
    lead_of = {i: (i // 4) * 4 for i in range(40)}  # sections of four chunks, led by the first
    own = {i: float(x) for i, x in zip(range(40), rng.uniform(0, 1, 40), strict=True)}
    hits = {i: (own[i], own[lead_of[i]]) for i in own}
    leads = {i: own[i] for i in own if lead_of[i] == i}
    depth, weight = 5, 0.5
    one_node = blend_leads(_rows(hits, leads, depth), depth, weight)
    shard = [{i: v for i, v in hits.items() if (i // 4) % 2 == s} for s in (0, 1)]  # by document
    shard_leads = [{i: v for i, v in leads.items() if (i // 4) % 2 == s} for s in (0, 1)]
    two_shards = blend_leads(
        _rows(shard[0], shard_leads[0], depth) + _rows(shard[1], shard_leads[1], depth), depth, weight
    )
    assert two_shards == one_node
    # And the formula is the local backend's: the global top hits and leads, blended, best first.
    top_hits = sorted(own, key=lambda i: (-own[i], i))[:depth]
    top_leads = sorted(leads, key=lambda i: (-leads[i], i))[:depth]
    ids = np.array(top_hits + top_leads, dtype=np.int64)
    want = blend_candidates(
        ids, np.array([own[i] for i in ids]), np.array([own[lead_of[i]] for i in ids]), weight=weight, k=depth
    )
    assert one_node == list(zip(want[0].tolist(), want[1].tolist(), strict=True))
    assert [s for _, s in one_node] == sorted((s for _, s in one_node), reverse=True)
    i, score = one_node[0]
    assert score == pytest.approx(0.5 * own[i] + 0.5 * own[lead_of[i]])
