"""Documents: upload into a collection, list, inspect, delete.

Uploads are kept under ``<data_dir>/uploads/<collection>/<file name>`` and ingested by the
worker through an ordinary job, so an uploaded file goes through exactly the same pipeline
as a folder ingested from the command line. A file whose bytes equal the stored one is left
untouched (no job is queued for it): re-uploading is a no-op. Each file is written to a
hidden temporary name first (the worker skips hidden names) and renamed into place.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import secrets
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Literal

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.services import collections as collections_service
from app.services.errors import InvalidInput, NotFound, PayloadTooLarge
from app.services.keys import Principal
from core.db.models import Chunk as ChunkRow
from core.db.models import Collection, Document
from ingest import queue
from ingest.indexer import reconcile
from ingest.loaders import loader_for, supported_extensions
from ingest.pipeline import sha256_file
from retrieval.types import Chunk, IndexCatalog

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# Browsers and HTTP clients percent-encode control characters and quotes in a multipart file name
# (WHATWG: "\n" is sent as "%0A"); decoded before the checks, so "a\nb.md" is refused as such
# instead of being stored as "a%0Ab.md".
_ENCODED_CONTROL = re.compile(r"%(0[0-9A-Fa-f]|1[0-9A-Fa-f]|7[Ff]|22)")
_COPY_CHUNK = 1 << 20
MAX_NAME_BYTES = 200

UploadStatus = Literal["new", "replaced", "unchanged", "rejected"]


@dataclass(frozen=True, slots=True)
class IncomingFile:
    """An uploaded file as the HTTP layer received it (``stream`` is a readable binary file)."""

    filename: str
    stream: BinaryIO


@dataclass(frozen=True, slots=True)
class StoredUpload:
    """What happened to one uploaded file: stored (``new``, ``replaced``, ``unchanged``) or
    ``rejected`` with the ``error`` (then ``path``, ``size`` and ``sha256`` are empty)."""

    filename: str
    path: str | None
    size: int | None
    sha256: str | None
    status: UploadStatus
    error: str | None = None


@dataclass(frozen=True, slots=True)
class UploadResult:
    """The files of an upload and the job queued for them (``None`` when nothing changed)."""

    collection: str
    files: list[StoredUpload]
    job_id: int | None


def safe_filename(raw: str, index: int) -> str:
    """A file name safe to create inside the uploads folder, or ``InvalidInput``.

    Directory parts are dropped (``../../etc/passwd`` becomes ``passwd``); hidden names, control
    characters and unsupported extensions are refused.
    """
    field = f"body.files[{index}]"
    raw = _ENCODED_CONTROL.sub(lambda m: chr(int(m.group(1), 16)), raw)
    name = PurePosixPath(unicodedata.normalize("NFC", raw).replace("\\", "/")).name.strip()
    if not name or name in {".", ".."} or _CONTROL.search(name):
        raise InvalidInput(f"invalid file name {raw!r}", field=field)
    if name.startswith("."):
        raise InvalidInput(f"hidden file names are not ingested: {name!r}", field=field)
    if len(name.encode("utf-8")) > MAX_NAME_BYTES:
        raise InvalidInput(f"file name longer than {MAX_NAME_BYTES} bytes: {name[:40]!r}...", field=field)
    if loader_for(name) is None:
        raise InvalidInput(
            f"unsupported file type {PurePosixPath(name).suffix or '(none)'!r} for {name!r}; "
            f"supported: {' '.join(supported_extensions())}",
            field=field,
        )
    return name


def _sha256_file(path: Path) -> str | None:
    try:
        return sha256_file(path)
    except FileNotFoundError:
        return None


def _stage(stream: BinaryIO, folder: Path, budget: int) -> tuple[Path, int, str]:
    """Copy ``stream`` to a hidden temporary file in ``folder``; returns (path, size, sha256). Blocking.

    Raises:
        PayloadTooLarge: More than ``budget`` bytes (the temporary file is removed).
    """
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".upload-{secrets.token_hex(8)}.tmp"
    digest = hashlib.sha256()
    size = 0
    try:
        with tmp.open("wb") as out:
            while block := stream.read(_COPY_CHUNK):
                size += len(block)
                if size > budget:
                    raise PayloadTooLarge("upload too large")
                digest.update(block)
                out.write(block)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp, size, digest.hexdigest()


def _place(tmp: Path, target: Path, sha: str) -> UploadStatus:
    """Move a staged file into place unless the target already has these bytes. Blocking."""
    existing = _sha256_file(target)
    if existing == sha:
        tmp.unlink()
        return "unchanged"
    tmp.replace(target)  # atomic: the worker never sees a half-written file
    return "new" if existing is None else "replaced"


def _discard(paths: Sequence[Path]) -> None:
    for path in paths:
        path.unlink(missing_ok=True)


async def upload(
    session: AsyncSession,
    principal: Principal,
    *,
    collection: str,
    files: Sequence[IncomingFile],
    uploads_dir: Path,
    max_bytes: int,
) -> UploadResult:
    """Store ``files`` in the collection's uploads folder and queue one ingestion job for them.

    Each file is accepted or refused on its own: a bad name (hidden, unsupported type, too long),
    or a name already used earlier in the same upload, makes that file ``rejected`` with the
    reason while the others are stored. Only when every file is refused does the upload fail as
    a whole (nothing was done). Size is checked for the request as a whole: if the files together
    exceed ``max_bytes``, none is kept. Files identical to the stored ones are ``unchanged`` and
    need no job. Flushes, never commits.

    Raises:
        NotFound: The collection is missing or outside the principal's scope.
        InvalidInput: No files, or every file refused (the first reason, with its field).
        PayloadTooLarge: The files together exceed ``max_bytes``.
    """
    coll = await collections_service.require(session, principal, collection)
    if not files:
        raise InvalidInput("no files in the upload", field="body.files")
    names: list[str | None] = []
    refused: dict[int, InvalidInput] = {}
    taken: set[str] = set()
    for i, f in enumerate(files):
        try:
            name = safe_filename(f.filename, i)
            if name in taken:
                raise InvalidInput(
                    f"{name!r} appears twice in this upload; the first one is kept", field=f"body.files[{i}]"
                )
        except InvalidInput as e:
            refused[i] = e
            names.append(None)
            continue
        taken.add(name)
        names.append(name)
    if len(refused) == len(files):
        raise refused[0]
    folder = (uploads_dir / coll.name).resolve()
    staged: dict[int, tuple[Path, int, str]] = {}
    budget = max_bytes
    try:
        for i, f in enumerate(files):
            if names[i] is None:
                continue
            tmp, size, sha = await asyncio.to_thread(_stage, f.stream, folder, budget)
            staged[i] = (tmp, size, sha)
            budget -= size
    except PayloadTooLarge as e:
        await asyncio.to_thread(_discard, [tmp for tmp, _, _ in staged.values()])
        raise PayloadTooLarge(
            f"the upload is larger than the limit of {max_bytes // (1024 * 1024)} MB (RAG_API__MAX_UPLOAD_MB)"
        ) from e
    except BaseException:
        await asyncio.to_thread(_discard, [tmp for tmp, _, _ in staged.values()])
        raise
    stored: list[StoredUpload] = []
    for i, f in enumerate(files):
        accepted = names[i]
        if accepted is None:
            stored.append(StoredUpload(f.filename, None, None, None, "rejected", str(refused[i])))
            continue
        tmp, size, sha = staged[i]
        status = await asyncio.to_thread(_place, tmp, folder / accepted, sha)
        stored.append(StoredUpload(accepted, str(folder / accepted), size, sha, status))
    job_id: int | None = None
    changed = [s for s in stored if s.status in ("new", "replaced") and s.path is not None]
    if changed:
        # One file: a job for that file; several: one job for the folder (unchanged files are
        # recognised by hash and skipped). Never prune: other uploads live in the same folder.
        root = changed[0].path if len(changed) == 1 else str(folder)
        assert root is not None
        job = await queue.enqueue(session, collection=coll, root_path=root, prune=False)
        job_id = job.id
    return UploadResult(coll.name, stored, job_id)


async def list_documents(
    session: AsyncSession,
    principal: Principal,
    *,
    collection: str,
    status: str | None = None,
    limit: int = 100,
    offset: int = 0,
) -> tuple[list[Document], int]:
    """A page of the collection's documents (by path) and the total count.

    Raises:
        NotFound: The collection is missing or outside the principal's scope.
    """
    coll = await collections_service.require(session, principal, collection)
    where = [Document.collection_id == coll.id]
    if status is not None:
        where.append(Document.status == status)
    total = await session.scalar(select(func.count(Document.id)).where(*where)) or 0
    rows = await session.scalars(select(Document).where(*where).order_by(Document.path).limit(limit).offset(offset))
    return list(rows), int(total)


async def get_document(session: AsyncSession, principal: Principal, *, collection: str, document_id: int) -> Document:
    """One document of a collection.

    Raises:
        NotFound: Missing, in another collection, or outside the principal's scope.
    """
    coll = await collections_service.require(session, principal, collection)
    doc = await session.scalar(select(Document).where(Document.id == document_id, Document.collection_id == coll.id))
    if doc is None:
        raise NotFound(f"document {document_id} not found in collection {collection!r}")
    return doc


async def delete_document(
    session: AsyncSession, principal: Principal, *, collection: str, document_id: int
) -> Document:
    """Delete a document's rows (its chunks cascade). Flushes, never commits.

    The caller commits and then calls :func:`finish_delete`, which removes an uploaded file and
    reconciles the collection's index (dropping the chunks from FAISS and BM25). A document
    ingested from a folder comes back if that folder is ingested again while the file is there.

    Raises:
        NotFound: Missing, in another collection, or outside the principal's scope.
    """
    doc = await get_document(session, principal, collection=collection, document_id=document_id)
    await session.delete(doc)
    await session.flush()
    return doc


async def finish_delete(
    sessionmaker: async_sessionmaker[AsyncSession],
    store: IndexCatalog,
    *,
    collection: str,
    path: str,
    uploads_dir: Path,
) -> None:
    """After the commit of :func:`delete_document`: delete the uploaded file, reconcile the index."""
    uploaded = Path(path)
    if uploaded.parent == (uploads_dir / collection).resolve():
        await asyncio.to_thread(uploaded.unlink, True)
    await reconcile(sessionmaker, store, collection)


async def get_chunk(session: AsyncSession, principal: Principal, chunk_id: int) -> Chunk:
    """One chunk, whole, with its document's path and title.

    Raises:
        NotFound: No such chunk, or its collection is outside the principal's scope (the same
            answer, so a key cannot probe for ids of other collections).
    """
    row = (
        await session.execute(
            select(ChunkRow, Document.path, Document.title, Collection.name)
            .join(Document, Document.id == ChunkRow.document_id)
            .join(Collection, Collection.id == ChunkRow.collection_id)
            .where(ChunkRow.id == chunk_id)
        )
    ).first()
    if row is None or not principal.can_read(row[3]):
        raise NotFound(f"chunk {chunk_id} not found")
    chunk, path, title, collection = row.tuple()
    return chunk.as_chunk(collection=collection, path=path, title=title)


async def document_text(session: AsyncSession, principal: Principal, *, collection: str, document_id: int) -> str:
    """A document's extracted text, put back together from its chunks.

    Chunks overlap and carry exact character offsets; the text between two chunks that the
    splitter dropped (whitespace at a cut) comes back as one newline.

    Raises:
        NotFound: Missing, in another collection, or outside the principal's scope.
    """
    doc = await get_document(session, principal, collection=collection, document_id=document_id)
    rows = await session.execute(
        select(ChunkRow.start, ChunkRow.end, ChunkRow.text)
        .where(ChunkRow.document_id == doc.id)
        .order_by(ChunkRow.start)
    )
    parts: list[str] = []
    cursor = 0
    for start, end, text in rows:
        if end <= cursor:
            continue
        if start > cursor and parts:
            parts.append("\n")
        parts.append(text[max(0, cursor - start) :])
        cursor = end
    return "".join(parts)
