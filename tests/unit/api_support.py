"""Helpers for the API tests: an app on fakes (hash embedder, scripted LLM) driven in-process.

``make_api(...)`` builds ``create_app(settings, embedder=HashEmbedder(), llm=FakeLLM(...))``,
enters its lifespan with Starlette's ``TestClient`` and returns an :class:`Api` handle that can
seed collections straight into the database and the index store (the real reconciliation
publishes them), create API keys, and run coroutines on the app's event loop.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Coroutine, Iterator, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pytest
from fastapi import FastAPI
from starlette.testclient import TestClient

from app.main import create_app
from app.resources import Resources
from app.services import keys
from core.db.models import Chunk as ChunkRow
from core.db.models import Document
from core.settings import Settings
from ingest import queue
from ingest.indexer import reconcile, vector_to_bytes
from tests.unit.fakes_llm import FakeCall, FakeLLM
from tests.unit.fakes_retrieval import HashEmbedder

T = TypeVar("T")

ANSWER = "Use os.path.join to combine path parts [1]."


def default_responder(call: FakeCall) -> list[str]:
    """Every request answers ``ANSWER`` (word by word)."""
    from tests.unit.fakes_llm import split_tokens

    return split_tokens(ANSWER)


@dataclass
class Api:
    """A running app on fakes."""

    client: TestClient
    app: FastAPI
    llm: FakeLLM
    settings: Settings
    probe_error: list[BaseException] = field(default_factory=list)

    @property
    def resources(self) -> Resources:
        resources: Resources = self.app.state.resources
        return resources

    def run(self, fn: Callable[[], Coroutine[Any, Any, T]]) -> T:
        """Run a coroutine function on the app's event loop."""
        assert self.client.portal is not None
        return self.client.portal.call(fn)

    def seed(self, collection: str, docs: Mapping[str, str]) -> list[int]:
        """Create ``collection`` with one single-chunk document per ``path -> text``; publish its index.

        Returns the chunk ids in order.
        """
        resources = self.resources

        async def work() -> list[int]:
            ids: list[int] = []
            async with resources.sessionmaker() as session:
                coll = await queue.get_or_create_collection(session, collection)
                for path, text in docs.items():
                    doc = Document(
                        collection_id=coll.id,
                        path=path,
                        sha256=hashlib.sha256(text.encode()).hexdigest(),
                        size=len(text),
                        mtime=0.0,
                        status="indexed",
                        format="md",
                        title=path.rsplit("/", 1)[-1],
                        chunk_count=1,
                        meta={},
                    )
                    session.add(doc)
                    await session.flush()
                    vector = resources.embedder.embed_documents([text])[0]
                    chunk = ChunkRow(
                        document_id=doc.id,
                        collection_id=coll.id,
                        ordinal=0,
                        text=text,
                        start=0,
                        end=len(text),
                        page=None,
                        token_count=len(text.split()),
                        heading=None,
                        embedding=vector_to_bytes(vector),
                    )
                    session.add(chunk)
                    await session.flush()
                    ids.append(chunk.id)
                await session.commit()
            await reconcile(resources.sessionmaker, resources.store, collection)
            return ids

        return self.run(work)

    def key(self, name: str, collections: Sequence[str] = (), *, admin: bool = False) -> dict[str, str]:
        """Create an API key; returns the ``Authorization`` header for it."""
        resources = self.resources

        async def work() -> str:
            async with resources.sessionmaker() as session:
                created = await keys.create_key(session, name=name, collections=collections, admin=admin)
                await session.commit()
                return created.token

        return {"Authorization": f"Bearer {self.run(work)}"}


@pytest.fixture
def make_api(make_settings: Any) -> Iterator[Callable[..., Api]]:
    """Factory: ``make_api(database_url=None, llm=None, **settings_overrides) -> Api`` (closed at teardown)."""
    with ExitStack() as stack:

        def factory(database_url: str | None = None, llm: FakeLLM | None = None, **overrides: Any) -> Api:
            # The transport tests below script token streams without sentence ends; the grounding guard
            # (which holds tokens until a sentence ends) is tested on its own and turned on where needed.
            overrides.setdefault("grounding", {"policy": "off"})
            settings = make_settings(database_url, **overrides)
            fake = llm or FakeLLM(responder=default_responder)
            errors: list[BaseException] = []

            async def probe() -> None:
                if errors:
                    raise errors[0]

            app = create_app(settings, embedder=HashEmbedder(), llm=fake, llm_probe=probe)
            client = stack.enter_context(TestClient(app, raise_server_exceptions=False))
            return Api(client=client, app=app, llm=fake, settings=settings, probe_error=errors)

        yield factory


def sse_events(text: str) -> list[tuple[str, dict[str, Any]]]:
    """``(event name, data)`` of every SSE frame in ``text`` (comments skipped)."""
    import json

    out: list[tuple[str, dict[str, Any]]] = []
    for frame in text.split("\n\n"):
        name, data = "", []
        for line in frame.splitlines():
            if line.startswith("event: "):
                name = line[len("event: ") :]
            elif line.startswith("data: "):
                data.append(line[len("data: ") :])
        if data and data != ["[DONE]"]:
            out.append((name, json.loads("\n".join(data))))
    return out


CORPUS = {
    "/docs/python/paths.md": "How do I join paths in Python? Use os.path.join to combine path components.",
    "/docs/node/fs.md": "The fs.readFile function reads a whole file asynchronously in Node.js.",
    "/docs/git/rebase.md": "Use git rebase --interactive to squash commits before pushing a branch.",
    "/docs/debian/apt.md": "Debian packages are installed with apt-get install or with the apt command.",
}
