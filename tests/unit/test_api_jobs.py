"""Folder ingestion jobs through the API: the allow-list of roots, job status and listing."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.unit.api_support import Api, make_api  # noqa: F401

pytestmark = pytest.mark.unit


@pytest.fixture
def tree(tmp_path: Path) -> dict[str, Path]:
    """An allowed root with a folder, a secret outside it, and links leading out."""
    root = tmp_path / "allowed"
    (root / "manuals").mkdir(parents=True)
    (root / "manuals" / "a.md").write_text("# A\nalpha")
    outside = tmp_path / "secret"
    outside.mkdir()
    (outside / "passwords.txt").write_text("hunter2")
    (root / "link-out").symlink_to(outside, target_is_directory=True)
    (root / "manuals" / "file-link").symlink_to(outside / "passwords.txt")
    (root / "loop").symlink_to(root / "loop")
    return {"root": root, "outside": outside}


@pytest.fixture
def api(make_api: Callable[..., Api], tree: dict[str, Path]) -> Api:  # noqa: F811
    api = make_api(ingest={"allowed_roots": [str(tree["root"])]})
    api.client.post("/v1/collections", json={"name": "docs"})
    return api


def test_a_folder_under_an_allowed_root_is_queued(api: Api, tree: dict[str, Path]) -> None:
    r = api.client.post("/v1/jobs", json={"path": str(tree["root"] / "manuals"), "collection": "docs"})
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["status"] == "queued" and job["root_path"] == str((tree["root"] / "manuals").resolve())
    assert job["files"]["total"] == 0 and job["progress"] == 0.0
    assert api.client.get(f"/v1/jobs/{job['id']}").json()["id"] == job["id"]
    listed = api.client.get("/v1/jobs", params={"collection": "docs", "status": "queued"}).json()
    assert [j["id"] for j in listed["jobs"]] == [job["id"]]
    assert api.client.get("/v1/jobs/999").status_code == 404


@pytest.mark.parametrize(
    "make_path",
    [
        lambda t: t["outside"],  # plainly outside
        lambda t: t["root"] / ".." / "secret",  # `..` out of the root
        lambda t: t["root"] / "manuals" / ".." / ".." / "secret" / "passwords.txt",
        lambda t: t["root"] / "link-out",  # a symlink leading out
        lambda t: t["root"] / "link-out" / "passwords.txt",
        lambda t: t["root"] / "manuals" / "file-link",  # a file symlink leading out
        lambda t: Path("/etc"),
        lambda t: t["outside"] / "missing",  # missing and outside: 403, not 404 (no probing)
    ],
)
def test_paths_leading_out_of_the_roots_are_403(
    api: Api, tree: dict[str, Path], make_path: Callable[[dict[str, Path]], Path]
) -> None:
    r = api.client.post("/v1/jobs", json={"path": str(make_path(tree)), "collection": "docs"})
    assert r.status_code == 403, r.text
    assert r.json()["error"]["code"] == "forbidden"
    assert api.client.get("/v1/jobs").json()["jobs"] == []


def test_other_refusals(api: Api, tree: dict[str, Path], make_api: Callable[..., Api]) -> None:  # noqa: F811
    c = api.client
    assert c.post("/v1/jobs", json={"path": "manuals", "collection": "docs"}).status_code == 422  # relative
    assert c.post("/v1/jobs", json={"path": str(tree["root"] / "nope"), "collection": "docs"}).status_code == 404
    assert c.post("/v1/jobs", json={"path": str(tree["root"] / "loop"), "collection": "docs"}).status_code in (403, 404)
    assert c.post("/v1/jobs", json={"path": str(tree["root"]), "collection": "missing"}).status_code == 404

    closed = make_api()  # no allowed roots configured: nothing may be ingested through the API
    closed.client.post("/v1/collections", json={"name": "docs"})
    r = closed.client.post("/v1/jobs", json={"path": str(tree["root"]), "collection": "docs"})
    assert r.status_code == 403 and "RAG_INGEST__ALLOWED_ROOTS" in r.json()["error"]["message"]


def test_a_queued_job_is_cancelled_at_once_and_a_finished_one_is_409(api: Api, tree: dict[str, Path]) -> None:
    job = api.client.post("/v1/jobs", json={"path": str(tree["root"] / "manuals"), "collection": "docs"}).json()
    r = api.client.post(f"/v1/jobs/{job['id']}/cancel")
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "cancelled" and r.json()["cancel_requested"] is True
    assert r.json()["error"] == "cancelled by request" and r.json()["finished_at"] is not None
    again = api.client.post(f"/v1/jobs/{job['id']}/cancel")
    assert again.status_code == 409 and again.json()["error"]["code"] == "conflict"
    assert "already ended (cancelled)" in again.json()["error"]["message"]
    assert api.client.post("/v1/jobs/999/cancel").status_code == 404
    listed = api.client.get("/v1/jobs", params={"status": "cancelled"}).json()
    assert [j["id"] for j in listed["jobs"]] == [job["id"]]


def test_another_tenants_job_cannot_be_cancelled(make_api: Callable[..., Api], tree: dict[str, Path]) -> None:  # noqa: F811
    api = make_api(ingest={"allowed_roots": [str(tree["root"])]}, auth={"enabled": True})
    admin = api.key("ops", [], admin=True)
    for name in ("a", "b"):
        assert api.client.post("/v1/collections", headers=admin, json={"name": name}).status_code == 201
    job = api.client.post(
        "/v1/jobs", headers=admin, json={"path": str(tree["root"] / "manuals"), "collection": "b"}
    ).json()
    key_a = api.key("tenant-a", ["a"])
    assert api.client.post(f"/v1/jobs/{job['id']}/cancel", headers=key_a).status_code == 404
    assert api.client.get(f"/v1/jobs/{job['id']}", headers=admin).json()["status"] == "queued"
