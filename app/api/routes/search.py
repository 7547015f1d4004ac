"""``POST /v1/search``."""

from __future__ import annotations

from fastapi import APIRouter

from app.api.deps import PrincipalDep, ResourcesDep, SessionDep
from app.api.errors import RESPONSES
from app.schemas.search import SearchRequest, SearchResponse
from app.services import search

router = APIRouter(prefix="/v1", tags=["search"], responses=RESPONSES)


@router.post("/search", summary="Hybrid search")
async def search_chunks(
    body: SearchRequest, session: SessionDep, principal: PrincipalDep, resources: ResourcesDep
) -> SearchResponse:
    """Dense + BM25 search with the mode, fusion and parameters of this request; every hit says
    where each leg ranked it. Without `collections`, searches every collection the key may read.
    With `group_by: "document"`, returns documents, each with its best chunks as evidence.
    Works while the model server is down."""
    options = search.search_options(
        resources.retriever.defaults,
        mode=body.mode,
        fusion=body.fusion,
        alpha=body.alpha,
        rrf_k=body.rrf_k,
        depth=body.depth,
    )
    outcome = await search.search(
        session,
        principal,
        retriever=resources.retriever,
        store=resources.store,
        metrics=resources.metrics,
        gate=resources.admission.searches,
        query=body.query,
        k=body.k,
        collections=body.requested(),
        path_prefix=body.filters.path_prefix,
        options=options,
        group_by=body.group_by,
        evidence=body.evidence,
    )
    return SearchResponse.build(
        body.query,
        outcome.options,
        outcome.collections,
        outcome.hits,
        outcome.took_ms,
        outcome.unavailable,
        outcome.documents,
    )
