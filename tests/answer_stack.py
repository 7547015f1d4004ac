"""The stack answer-mode integration tests share: a corpus really ingested, a retriever, a real model server."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from sqlalchemy import select

from core.db.models import Chunk as ChunkRow
from generation.backends.openai_compat import OpenAICompatClient
from ingest.worker import build_ingest_context, enqueue_path, run_job
from retrieval.hybrid import HybridRetriever
from tests.llm_server import LLMServerInfo


@contextlib.asynccontextmanager
async def answer_stack(
    make_settings: Callable[..., Any], embedder: Any, corpus_dir: Path, server: LLMServerInfo, *, collection: str
) -> AsyncIterator[tuple[Any, HybridRetriever, OpenAICompatClient, set[int]]]:
    """Ingest ``corpus_dir`` into ``collection`` and yield ``(settings, retriever, llm client, chunk ids)``."""
    settings = make_settings(llm={"base_url": server.base_url, "model": server.model})
    ctx = await build_ingest_context(settings, embedder=embedder)
    try:
        job_id, _ = await enqueue_path(ctx.sessionmaker, corpus_dir, collection=collection)
        summary = await run_job(ctx, job_id)
        assert summary is not None and summary.status == "succeeded"
        async with ctx.sessionmaker() as session:
            chunk_ids = set(await session.scalars(select(ChunkRow.id)))
        llm = OpenAICompatClient(server.base_url, server.model)
        try:
            yield settings, HybridRetriever(ctx.store, ctx.embedder), llm, chunk_ids
        finally:
            await llm.aclose()
    finally:
        await ctx.aclose()
