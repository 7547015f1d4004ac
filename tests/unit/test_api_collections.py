"""Collections and documents through the API, on SQLite and PostgreSQL."""

from __future__ import annotations

import io
from collections.abc import Callable

import pytest

from tests.unit.api_support import CORPUS, Api, make_api  # noqa: F401

pytestmark = pytest.mark.unit


@pytest.fixture
def api(make_api: Callable[..., Api], database_url: str) -> Api:  # noqa: F811
    return make_api(database_url)


def test_create_list_get_delete(api: Api) -> None:
    c = api.client
    created = c.post("/v1/collections", json={"name": "manuals", "description": "how-tos"})
    assert created.status_code == 201, created.text
    assert created.json()["name"] == "manuals"
    assert created.json()["documents"] == 0
    assert c.post("/v1/collections", json={"name": "manuals"}).status_code == 409

    api.seed("docs", CORPUS)
    listed = c.get("/v1/collections").json()["collections"]
    assert [x["name"] for x in listed] == ["docs", "manuals"]
    docs = c.get("/v1/collections/docs").json()
    assert docs["documents"] == len(CORPUS) and docs["chunks"] == len(CORPUS)

    assert "docs" in api.resources.store.collections()
    assert c.delete("/v1/collections/docs").status_code == 204
    assert c.get("/v1/collections/docs").status_code == 404
    assert "docs" not in api.resources.store.collections()  # the index went with it
    assert c.post("/v1/search", json={"query": "join paths"}).json()["hits"] == []


def test_invalid_names_are_422_with_the_field(api: Api) -> None:
    r = api.client.post("/v1/collections", json={"name": "../etc"})
    assert r.status_code == 422
    body = r.json()["error"]
    assert body["code"] == "invalid_input"
    assert body["fields"][0]["field"] == "body.name"
    assert api.client.post("/v1/collections", json={"name": "ok", "extra": 1}).status_code == 422


@pytest.mark.parametrize("name", ["a..b", "x..", "..", ".hidden", "a/b", "a" * 129])
def test_names_the_index_store_refuses_are_refused_by_the_api(api: Api, name: str) -> None:
    # Regression: the API accepted "a..b", which the index store refuses as a directory name; the
    # first reconcile of that collection then raised inside the worker and the API.
    r = api.client.post("/v1/collections", json={"name": name})
    assert r.status_code == 422, r.text
    assert r.json()["error"]["fields"][0]["field"] == "body.name"
    assert api.client.post("/v1/search", json={"query": "q", "collection": name}).status_code in (404, 422)
    assert name not in [c["name"] for c in api.client.get("/v1/collections").json()["collections"]]


def test_upload_list_get_and_identical_reupload_is_a_noop(api: Api) -> None:
    c = api.client
    c.post("/v1/collections", json={"name": "up"})
    files = [
        ("files", ("a.md", b"# A\nalpha text", "text/markdown")),
        ("files", ("../../b.txt", b"beta text", "text/plain")),
    ]
    r = c.post("/v1/collections/up/documents", files=files)
    assert r.status_code == 202, r.text
    body = r.json()
    assert [f["filename"] for f in body["files"]] == ["a.md", "b.txt"]  # directory parts dropped
    assert all(f["status"] == "new" for f in body["files"])
    folder = (api.settings.uploads_dir / "up").resolve()
    assert {p.name for p in folder.iterdir()} == {"a.md", "b.txt"}
    job = c.get(f"/v1/jobs/{body['job_id']}").json()
    assert job["status"] == "queued" and job["root_path"] == str(folder) and job["prune"] is False

    again = c.post("/v1/collections/up/documents", files=files).json()
    assert again["job_id"] is None
    assert all(f["status"] == "unchanged" for f in again["files"])

    changed = c.post("/v1/collections/up/documents", files=[("files", ("a.md", b"# A\nnew", "text/markdown"))]).json()
    assert changed["files"][0]["status"] == "replaced"
    assert c.get(f"/v1/jobs/{changed['job_id']}").json()["root_path"] == str(folder / "a.md")


def test_upload_refusals(api: Api, make_api: Callable[..., Api]) -> None:  # noqa: F811
    c = api.client
    c.post("/v1/collections", json={"name": "up"})
    bad = c.post("/v1/collections/up/documents", files=[("files", ("x.exe", b"MZ", "application/octet-stream"))])
    assert bad.status_code == 422 and "unsupported file type" in bad.json()["error"]["message"]
    hidden = c.post("/v1/collections/up/documents", files=[("files", (".env", b"SECRET=1", "text/plain"))])
    assert hidden.status_code == 422
    missing = c.post("/v1/collections/nope/documents", files=[("files", ("a.txt", b"x", "text/plain"))])
    assert missing.status_code == 404


def test_each_file_of_an_upload_is_accepted_or_refused_on_its_own(api: Api) -> None:
    # Regression: a .pdf sent with an unsupported file got 422 for the whole upload; the good file was lost.
    c = api.client
    c.post("/v1/collections", json={"name": "up"})
    files = [
        ("files", ("guide.md", b"# Guide\nuseful text", "text/markdown")),
        ("files", ("setup.exe", b"MZ", "application/octet-stream")),
        ("files", (".env", b"SECRET=1", "text/plain")),
        ("files", ("guide.md", b"another guide", "text/markdown")),
        ("files", ("notes.txt", b"notes", "text/plain")),
    ]
    r = c.post("/v1/collections/up/documents", files=files)
    assert r.status_code == 202, r.text
    body = r.json()
    assert [(f["filename"], f["status"]) for f in body["files"]] == [
        ("guide.md", "new"),
        ("setup.exe", "rejected"),
        (".env", "rejected"),
        ("guide.md", "rejected"),
        ("notes.txt", "new"),
    ]
    refused = {i: f for i, f in enumerate(body["files"]) if f["status"] == "rejected"}
    assert "unsupported file type" in refused[1]["error"] and ".md" in refused[1]["error"]
    assert "hidden" in refused[2]["error"] and "twice" in refused[3]["error"]
    assert all(f["path"] is None and f["size"] is None for f in refused.values())
    assert all(f["error"] is None for i, f in enumerate(body["files"]) if i not in refused)
    folder = (api.settings.uploads_dir / "up").resolve()
    assert {p.name for p in folder.iterdir()} == {"guide.md", "notes.txt"}
    assert (folder / "guide.md").read_bytes() == b"# Guide\nuseful text"  # the first of the two is kept
    assert c.get(f"/v1/jobs/{body['job_id']}").json()["root_path"] == str(folder)


def test_upload_over_the_limit_is_413_with_a_clear_message(make_api: Callable[..., Api]) -> None:  # noqa: F811
    api = make_api(api={"max_upload_mb": 1})
    api.client.post("/v1/collections", json={"name": "up"})
    big = io.BytesIO(b"x" * (3 * 1024 * 1024))
    r = api.client.post("/v1/collections/up/documents", files=[("files", ("big.txt", big, "text/plain"))])
    assert r.status_code == 413
    assert "1 MB" in r.json()["error"]["message"] and "RAG_API__MAX_UPLOAD_MB" in r.json()["error"]["message"]
    # Just over the per-file limit but within the framing allowance: refused by the service.
    edge = io.BytesIO(b"x" * (1024 * 1024 + 10))
    r = api.client.post("/v1/collections/up/documents", files=[("files", ("edge.txt", edge, "text/plain"))])
    assert r.status_code == 413
    assert not (api.settings.uploads_dir / "up" / "edge.txt").exists()
    # Together over the limit: all or nothing, no file is kept and no job queued.
    halves = [("files", (f"half{i}.txt", b"y" * (600 * 1024), "text/plain")) for i in range(2)]
    r = api.client.post("/v1/collections/up/documents", files=halves)
    assert r.status_code == 413
    assert list((api.settings.uploads_dir / "up").iterdir()) == []
    assert api.client.get("/v1/jobs").json()["jobs"] == []


def test_documents_list_get_delete_reconciles_the_index(api: Api) -> None:
    c = api.client
    ids = api.seed("docs", CORPUS)
    listing = c.get("/v1/collections/docs/documents").json()
    assert listing["page"]["total"] == len(CORPUS)
    doc = next(d for d in listing["documents"] if d["path"].endswith("paths.md"))
    assert c.get(f"/v1/collections/docs/documents/{doc['id']}").json()["chunk_count"] == 1
    assert c.get("/v1/collections/docs/documents", params={"status": "failed"}).json()["documents"] == []

    def hit_ids() -> set[int]:
        r = c.post("/v1/search", json={"query": "join paths python", "k": 10})
        return {h["chunk_id"] for h in r.json()["hits"]}

    assert ids[0] in hit_ids()
    assert c.delete(f"/v1/collections/docs/documents/{doc['id']}").status_code == 204
    assert c.get(f"/v1/collections/docs/documents/{doc['id']}").status_code == 404
    assert ids[0] not in hit_ids()
    snapshot = api.resources.store.load("docs")
    assert snapshot is not None and ids[0] not in snapshot.chunks
    assert c.get("/v1/collections/docs").json()["documents"] == len(CORPUS) - 1


def test_out_of_range_ids_are_422_not_500(api: Api) -> None:
    api.seed("docs", CORPUS)
    assert api.client.get("/v1/collections/docs/documents/99999999999999999999").status_code == 422
    assert api.client.get("/v1/jobs/0").status_code == 422
