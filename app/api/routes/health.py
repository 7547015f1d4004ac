"""Operations: liveness, readiness, Prometheus metrics."""

from __future__ import annotations

import logging

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response

from app.api.deps import AdminDep, OptionalPrincipalDep, ResourcesDep
from app.schemas.health import Check, Health, Readiness
from app.services import health

router = APIRouter(tags=["operations"])
logger = logging.getLogger(__name__)


@router.get("/healthz", summary="Liveness: the process answers")
async def healthz() -> Health:
    """Always ``{"status": "ok"}`` while the process serves requests."""
    return Health()


@router.get(
    "/readyz",
    summary="Readiness: database, index store, model server",
    responses={503: {"model": Readiness, "description": "The database is unreachable."}},
)
async def readyz(resources: ResourcesDep, principal: OptionalPrincipalDep) -> JSONResponse:
    """Each check with its result and duration. 503 only when the database is down: without the
    model server the service still searches (answers get 503), so it reports ``degraded``.

    With auth on, only an admin key sees the checks (their details name hosts, paths and errors);
    anyone else — a load balancer's probe — gets the status alone."""
    status, checks = await health.readiness(
        sessionmaker=resources.sessionmaker,
        store=resources.store,
        llm_probe=resources.llm_probe,
        limit_seconds=resources.settings.api.readiness_timeout_seconds,
    )
    show = principal is not None and principal.admin
    body = Readiness(
        status=status,  # type: ignore[arg-type]
        checks={name: Check(ok=c.ok, detail=c.detail, ms=c.ms) for name, c in checks.items()} if show else {},
    )
    return JSONResponse(body.model_dump(mode="json"), status_code=503 if status == "unavailable" else 200)


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=Response,
    responses={200: {"content": {"text/plain; version=0.0.4": {}}, "description": "Prometheus text format."}},
)
async def metrics(resources: ResourcesDep, _admin: AdminDep) -> Response:
    """Request counts and latency by route, retrieval latency per leg, TTFT, tokens, ingestion jobs,
    event-loop lag. With auth on it needs an admin key (Prometheus: ``authorization`` in the scrape
    config)."""
    try:
        async with resources.sessionmaker() as session:
            await health.update_ingest_gauges(session, resources.metrics)
    except Exception as e:  # a scrape must still return the in-process metrics
        logger.warning("could not read ingestion gauges", extra={"error": str(e)})
    return Response(resources.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")
