"""``/v1/collections/{name}/documents``: upload, list, get, delete."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, File, Query, UploadFile, status

from app.api.deps import PrincipalDep, ResourcesDep, RowId, SessionDep
from app.api.errors import RESPONSES
from app.schemas.common import CollectionName, ErrorResponse, Page
from app.schemas.documents import DocumentList, DocumentOut, UploadedFile, UploadResponse
from app.services import documents
from app.services.errors import InvalidInput
from core.db.models import Document

router = APIRouter(prefix="/v1/collections/{name}/documents", tags=["documents"], responses=RESPONSES)


def _out(doc: Document, collection: str) -> DocumentOut:
    return DocumentOut(
        id=doc.id,
        collection=collection,
        path=doc.path,
        status=doc.status,
        error=doc.error,
        format=doc.format,
        title=doc.title,
        size=doc.size,
        sha256=doc.sha256,
        page_count=doc.page_count,
        chunk_count=doc.chunk_count,
        metadata=dict(doc.meta or {}),
        report=doc.report,
        last_job_id=doc.last_job_id,
        created_at=doc.created_at,
        updated_at=doc.updated_at,
    )


@router.post(
    "",
    status_code=status.HTTP_202_ACCEPTED,
    summary="Upload documents",
    responses={
        411: {"model": ErrorResponse, "description": "The upload did not state its Content-Length."},
        413: {"model": ErrorResponse, "description": "Larger than RAG_API__MAX_UPLOAD_MB."},
    },
)
async def upload_documents(
    name: CollectionName,
    files: Annotated[
        list[UploadFile],
        File(
            description="One or more documents: text, markdown, HTML, PDF, Word, PowerPoint, Excel, CSV, "
            "OpenDocument, EPUB, e-mail (docs/ingestion.md)."
        ),
    ],
    session: SessionDep,
    principal: PrincipalDep,
    resources: ResourcesDep,
) -> UploadResponse:
    """Store the files and queue one ingestion job for the new or changed ones (the worker runs it).

    Each file is accepted or refused on its own: the 202 body gives every file's `status`, and a
    refused file (`rejected`, with its `error`) does not cost its neighbours. A file with the same
    name and bytes as a stored one is `unchanged` and needs no job. 422 only when every file is
    refused.
    """
    api = resources.settings.api
    if len(files) > api.max_upload_files:
        raise InvalidInput(f"at most {api.max_upload_files} files per upload", field="body.files")
    incoming = [documents.IncomingFile(f.filename or "", f.file) for f in files]
    result = await documents.upload(
        session,
        principal,
        collection=name,
        files=incoming,
        uploads_dir=resources.settings.uploads_dir,
        max_bytes=api.max_upload_mb * 1024 * 1024,
    )
    await session.commit()
    return UploadResponse(
        collection=result.collection,
        files=[
            UploadedFile(filename=s.filename, path=s.path, size=s.size, sha256=s.sha256, status=s.status, error=s.error)
            for s in result.files
        ],
        job_id=result.job_id,
    )


@router.get("", summary="List documents")
async def list_documents(
    name: CollectionName,
    session: SessionDep,
    principal: PrincipalDep,
    status_filter: Annotated[Literal["indexed", "failed"] | None, Query(alias="status")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0, le=10_000_000)] = 0,
) -> DocumentList:
    """Documents by path, with their status and, for failed ones, the reason."""
    docs, total = await documents.list_documents(
        session, principal, collection=name, status=status_filter, limit=limit, offset=offset
    )
    return DocumentList(documents=[_out(d, name) for d in docs], page=Page(total=total, limit=limit, offset=offset))


@router.get("/{document_id}", summary="Get a document")
async def get_document(
    name: CollectionName,
    document_id: RowId,
    session: SessionDep,
    principal: PrincipalDep,
) -> DocumentOut:
    """One document."""
    return _out(await documents.get_document(session, principal, collection=name, document_id=document_id), name)


@router.delete("/{document_id}", status_code=status.HTTP_204_NO_CONTENT, summary="Delete a document")
async def delete_document(
    name: CollectionName,
    document_id: RowId,
    session: SessionDep,
    principal: PrincipalDep,
    resources: ResourcesDep,
) -> None:
    """Delete the document and its chunks, then reconcile the collection's index (and remove an uploaded file)."""
    doc = await documents.delete_document(session, principal, collection=name, document_id=document_id)
    await session.commit()
    await documents.finish_delete(
        resources.sessionmaker,
        resources.store,
        collection=name,
        path=doc.path,
        uploads_dir=resources.settings.uploads_dir,
    )
