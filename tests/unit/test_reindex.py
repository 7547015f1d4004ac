"""Index recipes: the value and its fingerprint, manifests that record it (old ones read as unknown),
re-chunking stored texts, the recipe check of ingest jobs, and the collections API's report and
reindex route (SQLite and PostgreSQL)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import select

from core.db.models import Chunk as ChunkRow
from core.db.models import Collection, Document, IngestJob
from core.settings import Settings
from core.wiring import index_recipe
from ingest import queue
from ingest.loaders.base import LoadedDocument, PageSpan, RowSpan
from ingest.pipeline import RecipeMismatchError, check_recipe
from ingest.reindex import recipe_statuses
from ingest.splitter import Splitter
from ingest.stored import layout_of, rebuilt_document, stored_document
from retrieval.recipe import IndexRecipe, recipe_from_json, reindex_needed
from retrieval.store import IndexStore, Manifest
from tests.unit.api_support import CORPUS, Api, make_api  # noqa: F401
from tests.unit.fakes_retrieval import CORPUS as TEXTS
from tests.unit.fakes_retrieval import HashEmbedder, make_chunk
from tests.unit.test_splitter import Words

pytestmark = pytest.mark.unit

A = IndexRecipe(model_id="m", dimension=32, chunk_tokens=240, overlap_tokens=40, min_piece_tokens=24, context_tokens=32)


# ------------------------------------------------------------------ the value


def test_equal_recipes_have_one_fingerprint_and_every_field_changes_it() -> None:
    same = IndexRecipe.from_json(json.loads(json.dumps(dict(reversed(list(A.to_json().items()))))))
    assert same == A and same.fingerprint() == A.fingerprint()
    assert len(A.fingerprint()) == 12 and int(A.fingerprint(), 16) >= 0
    changed = {
        "model_id": "other",
        "dimension": 64,
        "chunk_tokens": 120,
        "overlap_tokens": 20,
        "min_piece_tokens": 0,
        "context_tokens": 0,
        "context_version": A.context_version + 1,
        "version": A.version + 1,
    }
    assert set(changed) == {f.name for f in dataclasses.fields(IndexRecipe)}
    prints = {dataclasses.replace(A, **{k: v}).fingerprint() for k, v in changed.items()}  # type: ignore[arg-type]
    assert len(prints) == len(changed) and A.fingerprint() not in prints
    assert dataclasses.replace(A, chunk_tokens=120).differences(A) == ["chunk_tokens: 120 -> 240"]
    assert A.fingerprint() in A.describe() and "240/40" in A.describe()


def test_unreadable_or_missing_recipes_read_as_unknown() -> None:
    assert recipe_from_json(None) is None
    assert recipe_from_json("240") is None
    assert recipe_from_json({"model_id": "m"}) is None
    assert recipe_from_json({**A.to_json(), "chunk_tokens": "240"}) is None
    assert recipe_from_json({**A.to_json(), "chunk_tokens": True}) is None
    assert recipe_from_json(A.to_json()) == A
    with pytest.raises(ValueError, match="without 'dimension'"):
        IndexRecipe.from_json({k: v for k, v in A.to_json().items() if k != "dimension"})


def test_reindex_is_needed_when_the_chunks_recipe_differs_or_is_unknown() -> None:
    other = dataclasses.replace(A, chunk_tokens=120)
    assert reindex_needed(A, A, has_chunks=True) is False
    assert reindex_needed(other, A, has_chunks=True) is True
    assert reindex_needed(None, A, has_chunks=True) is True  # indexed before recipes were recorded
    assert reindex_needed(None, A, has_chunks=False) is False  # empty: adopts the configured one
    assert reindex_needed(other, A, has_chunks=False) is False


def test_the_recipe_comes_from_the_chunking_settings_and_the_model() -> None:
    settings = Settings(
        chunking={"chunk_tokens": 100, "overlap_tokens": 10, "min_piece_tokens": 5, "context_tokens": 0}
    )
    recipe = index_recipe(settings, model_id="gt", dimension=384)
    assert (recipe.model_id, recipe.dimension, recipe.chunk_tokens, recipe.overlap_tokens) == ("gt", 384, 100, 10)
    assert (recipe.min_piece_tokens, recipe.context_tokens) == (5, 0)
    assert index_recipe(Settings(), model_id="gt", dimension=384) != recipe


# ------------------------------------------------------------------ manifests


def _store(root: Path) -> IndexStore:
    return IndexStore(root, model_id="fake-hash", dimension=32)


def test_manifests_record_the_recipe_and_old_ones_read_as_unknown(tmp_path: Path) -> None:
    emb = HashEmbedder(dimension=32)
    store = _store(tmp_path)
    chunks = [make_chunk(i, t) for i, t in TEXTS.items()]
    first = store.publish("docs", add=chunks[:4], vectors=emb.embed_documents([c.text for c in chunks[:4]]), recipe=A)
    assert first.manifest.recipe == A
    # An incremental publish without a recipe keeps the version's (reconciling an ingest batch).
    second = store.publish("docs", add=chunks[4:5], vectors=emb.embed_documents([chunks[4].text]))
    assert second.manifest.recipe == A and second.version != first.version
    # Only the recipe changing is a change worth a version; the same recipe again is not.
    b = dataclasses.replace(A, chunk_tokens=120)
    third = store.publish("docs", recipe=b)
    assert third.version != second.version and third.manifest.recipe == b
    assert store.publish("docs", recipe=b).version == third.version
    assert _store(tmp_path).load("docs").manifest.recipe == b  # type: ignore[union-attr]

    # A manifest written before recipes existed: the index loads, its recipe is unknown.
    path = tmp_path / "docs" / "versions" / third.version / "manifest.json"
    data = json.loads(path.read_text())
    del data["recipe"]
    assert Manifest.from_json(data).recipe is None
    path.write_text(json.dumps(data))
    snap = _store(tmp_path).load("docs")
    assert snap is not None and snap.manifest.recipe is None and len(snap) == 5
    # A garbled recipe does not make the index unusable either.
    data["recipe"] = {"model_id": 3}
    assert Manifest.from_json(data).recipe is None


# ------------------------------------------------------------------ stored texts


TEXT = (
    "# Guide\n\nIntro words here and there.\n\n## Install\n\nStep one is to download it. Step two is to run it.\n\n"
    "## Use\n\nType a command. See what happens. Then type another command and read the output carefully.\n"
)


def test_a_stored_document_splits_exactly_like_the_loaded_one() -> None:
    loaded = LoadedDocument(
        text=TEXT + "a,b\n1,2\n3,4\n",
        format="markdown",
        title="Guide",
        pages=(PageSpan(0, len(TEXT), 1, "one"), PageSpan(len(TEXT), len(TEXT) + 12, 2, "sheet")),
        rows=(RowSpan(len(TEXT), len(TEXT) + 3, 1), RowSpan(len(TEXT) + 4, len(TEXT) + 7, 2)),
        page_unit="slide",
    )
    layout = json.loads(json.dumps(layout_of(loaded)))  # through the JSON column
    again = stored_document(loaded.text, layout, format=loaded.format, title=loaded.title)
    splitter = Splitter(Words(), chunk_tokens=12, overlap_tokens=3, context_tokens=4, window_tokens=40)
    assert splitter.split(again) == splitter.split(loaded)
    with pytest.raises(ValueError, match="malformed document layout"):
        stored_document("x", {"pages": [[0, "a"]]}, format="text", title=None)


def test_a_document_without_stored_text_is_rebuilt_from_its_chunks() -> None:
    splitter = Splitter(Words(), chunk_tokens=12, overlap_tokens=3)
    loaded = LoadedDocument(text=TEXT, format="markdown", pages=(PageSpan(0, 40, 1), PageSpan(40, len(TEXT), 2)))
    pieces = splitter.split(loaded)
    rebuilt = rebuilt_document([(p.text, p.start, p.end, p.page) for p in pieces], format="markdown", title=None)
    # Every character a chunk held is where it was; what no chunk held was whitespace, now newlines.
    assert len(rebuilt.text) == len(TEXT.rstrip())
    for original, new in zip(TEXT, rebuilt.text, strict=False):
        assert new == original or (original.isspace() and new == "\n")
    assert [p.page for p in rebuilt.pages] == [1, 2]
    again = Splitter(Words(), chunk_tokens=30, overlap_tokens=3).split(rebuilt)
    assert all(rebuilt.text[p.start : p.end] == p.text for p in again)
    assert "".join(rebuilt.text.split()) == "".join(TEXT.split())


# ------------------------------------------------------------------ the API and the job check


@pytest.fixture
def api(make_api: Callable[..., Api], database_url: str) -> Api:  # noqa: F811
    return make_api(database_url)


def _set_recipe(api: Api, name: str, recipe: IndexRecipe | None) -> None:
    async def work() -> None:
        async with api.resources.sessionmaker() as session:
            coll = await session.scalar(select(Collection).where(Collection.name == name))
            assert coll is not None
            coll.recipe = None if recipe is None else recipe.to_json()
            await session.commit()

    api.run(work)


def test_the_collections_api_reports_the_recipe_and_queues_reindexes(api: Api) -> None:
    c = api.client
    configured = api.resources.recipe
    assert configured.model_id == "fake-hash" and configured.chunk_tokens == api.settings.chunking.chunk_tokens
    assert c.post("/v1/collections", json={"name": "empty"}).status_code == 201
    api.seed("docs", CORPUS)

    listed = {x["name"]: x for x in c.get("/v1/collections").json()["collections"]}
    assert listed["empty"]["reindex_needed"] is False and listed["empty"]["recipe"] is None
    # Seeded rows have no recorded recipe: unknown, so a reindex is due (it records one).
    assert listed["docs"]["reindex_needed"] is True and listed["docs"]["recipe"] is None

    old = dataclasses.replace(configured, chunk_tokens=configured.chunk_tokens * 2)
    _set_recipe(api, "docs", old)
    docs = c.get("/v1/collections/docs").json()
    assert docs["reindex_needed"] is True
    assert docs["recipe"] == {"fingerprint": old.fingerprint(), **old.to_json()}
    # Search still answers from the index it has.
    assert c.post("/v1/search", json={"query": "join paths", "collection": "docs"}).json()["hits"]

    r = c.post("/v1/collections/docs/reindex")
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["kind"] == "reindex" and job["status"] == "queued" and job["collection"] == "docs"
    # A second request while it is queued gets the same job.
    assert c.post("/v1/collections/docs/reindex", json={}).json()["id"] == job["id"]
    jobs = c.get("/v1/jobs").json()["jobs"]
    assert [(j["id"], j["kind"]) for j in jobs] == [(job["id"], "reindex")]

    _set_recipe(api, "docs", configured)
    assert c.get("/v1/collections/docs").json()["reindex_needed"] is False
    refused = c.post("/v1/collections/empty/reindex")
    assert refused.status_code == 409 and "no chunks" in refused.json()["error"]["message"]
    c.post(f"/v1/jobs/{job['id']}/cancel")
    same = c.post("/v1/collections/docs/reindex")
    assert same.status_code == 409 and "configured recipe" in same.json()["error"]["message"]
    forced = c.post("/v1/collections/docs/reindex", json={"force": True})
    assert forced.status_code == 202 and forced.json()["id"] != job["id"]
    assert c.post("/v1/collections/nope/reindex").status_code == 404
    assert c.post("/v1/collections/docs/reindex", json={"force": 1, "x": 2}).status_code == 422


def test_a_scoped_key_reindexes_only_its_collections(make_api: Callable[..., Api], database_url: str) -> None:  # noqa: F811
    api = make_api(database_url, auth={"enabled": True})
    api.seed("docs", CORPUS)
    api.seed("other", CORPUS)
    key = api.key("alice", ["docs"])
    assert api.client.post("/v1/collections/docs/reindex", headers=key).status_code == 202
    assert api.client.post("/v1/collections/other/reindex", headers=key).status_code == 404


def test_an_ingest_job_refuses_to_mix_recipes(api: Api) -> None:
    configured = api.resources.recipe
    api.seed("docs", CORPUS)

    async def work() -> None:
        async with api.resources.sessionmaker() as session:
            empty = await queue.get_or_create_collection(session, "fresh")
            await check_recipe(session, empty, configured)  # an empty collection adopts the recipe
            assert recipe_from_json(empty.recipe) == configured
            docs = await session.scalar(select(Collection).where(Collection.name == "docs"))
            assert docs is not None
            await check_recipe(session, docs, configured)  # unknown recipe: let through, unchanged
            assert docs.recipe is None
            docs.recipe = dataclasses.replace(configured, chunk_tokens=7).to_json()
            with pytest.raises(RecipeMismatchError, match=r"chunk_tokens: 7 -> .*rag reindex -c docs"):
                await check_recipe(session, docs, configured)
            statuses = {s.collection: s for s in await recipe_statuses(session, configured)}
            assert statuses["docs"].reindex_needed and statuses["docs"].chunks == len(CORPUS)
            assert not statuses["fresh"].reindex_needed and statuses["fresh"].chunks == 0
            assert await session.scalar(select(ChunkRow.id).limit(1)) is not None
            assert await session.scalar(select(IngestJob.id).limit(1)) is None

    api.run(work)


# ------------------------------------------------------------------ the job, on fakes


def test_a_reindex_job_rebuilds_with_another_model_and_a_cancelled_one_changes_nothing(api: Api) -> None:
    """A model change on the local backend: the old index cannot be searched with the new model; the
    worker's reconcile leaves it alone (no crash), the reindex rebuilds it from the chunk texts (the
    seeded documents have no stored text: the fallback path) and publishes a version of the new model."""
    from ingest.indexer import reconcile
    from ingest.reindex import Reindexer
    from retrieval.types import IndexMismatchError

    api.seed("docs", CORPUS)
    sessionmaker = api.resources.sessionmaker
    embedder = HashEmbedder(dimension=16, model_id="fake-hash-2")
    store = IndexStore(api.settings.index_dir, model_id=embedder.model_id, dimension=embedder.dimension)
    recipe = index_recipe(api.settings, model_id=embedder.model_id, dimension=embedder.dimension)
    splitter = Splitter(Words(), chunk_tokens=6, overlap_tokens=1)
    reindexer = Reindexer(
        sessionmaker=sessionmaker,
        store=store,
        embedder=embedder,
        splitter=splitter,
        recipe=recipe,
        worker_id="w",
        batch_chunks=4,
    )

    async def chunks() -> dict[int, tuple[str, int, int, str]]:
        async with sessionmaker() as session:
            found = await session.execute(
                select(ChunkRow.id, ChunkRow.text, ChunkRow.start, ChunkRow.end, Document.path).join(
                    Document, Document.id == ChunkRow.document_id
                )
            )
            return {i: (t, s, e, p) for i, t, s, e, p in found}

    async def run(cancel_first: bool) -> str:
        async with sessionmaker() as session:
            coll = await session.scalar(select(Collection).where(Collection.name == "docs"))
            assert coll is not None
            job, created = await queue.enqueue_reindex(session, collection=coll)
            assert created
            await session.commit()
            claimed = await queue.claim(session, worker_id="w", stale_after=60, job_id=job.id)
            assert claimed is not None and claimed.kind == "reindex"
            if cancel_first:
                await queue.request_cancel(session, job.id)
                await session.commit()
        return (await reindexer.run(job.id)).status

    async def work() -> None:
        before = await chunks()
        with pytest.raises(IndexMismatchError, match="rag reindex -c docs"):
            store.load("docs")
        assert (await reconcile(sessionmaker, store, "docs")).version is None  # left alone, no crash

        assert await run(cancel_first=True) == "cancelled"
        assert await chunks() == before  # nothing swapped, the old index untouched
        with pytest.raises(IndexMismatchError):
            store.load("docs")

        assert await run(cancel_first=False) == "succeeded"
        after = await chunks()
        assert not set(after) & set(before) and len(after) > len(before)
        texts = {p: t for t, _s, _e, p in before.values()}
        for chunk_text, start, end, path in after.values():
            assert texts[path][start:end] == chunk_text
        snapshot = store.load("docs")
        assert snapshot is not None and set(snapshot.ids.tolist()) == set(after)
        assert snapshot.manifest.model_id == "fake-hash-2" and snapshot.manifest.recipe == recipe
        async with sessionmaker() as session:
            [status] = await recipe_statuses(session, recipe, ["docs"])
            assert status.recorded == recipe and not status.reindex_needed and status.chunks == len(after)
            job = await session.scalar(select(IngestJob).order_by(IngestJob.id.desc()).limit(1))
            assert job is not None and (job.files_changed, job.chunks_removed) == (len(CORPUS), len(before))

    api.run(work)


class _Failing(HashEmbedder):
    """Embeds a few batches, then fails like a process dying mid-job."""

    def __init__(self, after: int, *, dimension: int, model_id: str) -> None:
        super().__init__(dimension=dimension, model_id=model_id)
        self.left = after

    def embed_documents(self, texts: list[str]) -> object:  # type: ignore[override]
        if self.left <= 0:
            raise RuntimeError("killed mid-reindex")
        self.left -= 1
        return super().embed_documents(texts)


def test_a_reindex_that_dies_midway_leaves_the_old_index_and_one_that_dies_after_its_swap_is_published(
    api: Api,
) -> None:
    """Before the swap commits, nothing changed: the old rows and snapshot serve and a new attempt
    succeeds. After it commits, the rows and the recipe agree and the next reconcile publishes them."""
    from ingest.indexer import reconcile
    from ingest.reindex import Reindexer

    api.seed("docs", CORPUS)
    sessionmaker = api.resources.sessionmaker
    store = api.resources.store
    assert isinstance(store, IndexStore)
    recipe = index_recipe(api.settings, model_id=store.model_id, dimension=store.dimension)
    splitter = Splitter(Words(), chunk_tokens=6, overlap_tokens=1)

    def reindexer(embedder: HashEmbedder) -> Reindexer:
        return Reindexer(
            sessionmaker=sessionmaker,
            store=store,
            embedder=embedder,
            splitter=splitter,
            recipe=recipe,
            worker_id="w",
            batch_chunks=4,
        )

    async def ids() -> set[int]:
        async with sessionmaker() as session:
            return set(await session.scalars(select(ChunkRow.id)))

    async def claimed_job() -> int:
        async with sessionmaker() as session:
            coll = await session.scalar(select(Collection).where(Collection.name == "docs"))
            assert coll is not None
            job, _ = await queue.enqueue_reindex(session, collection=coll)
            await session.commit()
            assert await queue.claim(session, worker_id="w", stale_after=60, job_id=job.id) is not None
            return job.id

    async def work() -> None:
        before = await ids()
        version = store.load("docs").version  # type: ignore[union-attr]
        same = HashEmbedder(dimension=store.dimension, model_id=store.model_id)

        failing = _Failing(after=1, dimension=store.dimension, model_id=store.model_id)
        summary = await reindexer(failing).run(await claimed_job())
        assert summary.status == "failed"
        assert await ids() == before
        snapshot = store.load("docs")
        assert snapshot is not None and snapshot.version == version  # the old index serves

        # Dies right after the swap committed (no publish): the rows and the recipe agree ...
        job_id = await claimed_job()
        await reindexer(same)._reindex(job_id, await _cid(), "docs", None)
        after = await ids()
        assert after and not after & before
        assert store.load("docs").version == version  # type: ignore[union-attr]
        # ... and the next reconcile (the worker's start-up or periodic check) publishes them.
        result = await reconcile(sessionmaker, store, "docs")
        published = store.load("docs")
        assert published is not None and result.version == published.version != version
        assert set(published.ids.tolist()) == after and published.manifest.recipe == recipe

    async def _cid() -> int:
        async with sessionmaker() as session:
            cid = await session.scalar(select(Collection.id).where(Collection.name == "docs"))
            assert cid is not None
            return cid

    api.run(work)
