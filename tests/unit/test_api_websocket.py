"""The websocket chat protocol with a scripted LLM: concurrency, cancel, malformed messages, auth."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from starlette.testclient import WebSocketTestSession
from starlette.websockets import WebSocketDisconnect

from app.schemas.events import ANSWER_EVENT_ADAPTER
from tests.unit.api_support import CORPUS, Api, make_api  # noqa: F401
from tests.unit.fakes_llm import FakeLLM

pytestmark = pytest.mark.unit


def until_terminal(ws: WebSocketTestSession, ids: set[str]) -> dict[str, list[dict[str, Any]]]:
    """Read messages until every id in ``ids`` got its ``done`` or ``error``."""
    got: dict[str, list[dict[str, Any]]] = {i: [] for i in ids}
    open_ids = set(ids)
    while open_ids:
        message = ws.receive_json()
        if message["type"] == "ping":
            continue
        got[message["id"]].append(message)
        if message["type"] in ("done", "error"):
            open_ids.discard(message["id"])
    return got


@pytest.fixture
def api(make_api: Callable[..., Api]) -> Api:  # noqa: F811
    llm = FakeLLM(responder=lambda c: [f" word{i}" for i in range(20)], token_delay=0.01)
    api = make_api(llm=llm)
    api.seed("docs", CORPUS)
    return api


def test_ask_streams_events_tagged_with_the_id(api: Api) -> None:
    with api.client.websocket_connect("/v1/chat") as ws:
        assert ws.receive_json() == {"type": "ready", "principal": "anonymous"}
        ws.send_json({"type": "ask", "id": "q1", "question": "join paths?", "collection": "docs", "k": 2})
        events = until_terminal(ws, {"q1"})["q1"]
    assert events[0]["type"] == "retrieval" and events[-1]["type"] == "done"
    for e in events:
        assert e["id"] == "q1"
        ANSWER_EVENT_ADAPTER.validate_python({k: v for k, v in e.items() if k != "id"})


def test_two_questions_in_flight_on_one_socket_both_complete(api: Api) -> None:
    with api.client.websocket_connect("/v1/chat") as ws:
        ws.receive_json()
        ws.send_json({"type": "ask", "id": "a", "question": "join paths?"})
        ws.send_json({"type": "ask", "id": "b", "question": "install packages?"})
        got = until_terminal(ws, {"a", "b"})
    assert got["a"][-1]["type"] == "done" and got["b"][-1]["type"] == "done"
    assert got["a"][-1]["answer"] == got["b"][-1]["answer"]
    assert api.llm.open_streams == 0


def test_cancel_stops_the_generation(make_api: Callable[..., Api]) -> None:  # noqa: F811
    llm = FakeLLM(responder=lambda c: [f" w{i}" for i in range(1000)], token_delay=0.01)
    api = make_api(llm=llm)
    with api.client.websocket_connect("/v1/chat") as ws:
        ws.receive_json()
        ws.send_json({"type": "ask", "id": "long", "question": "tell me everything"})
        tokens = 0
        while tokens < 3:
            if ws.receive_json()["type"] == "token":
                tokens += 1
        ws.send_json({"type": "cancel", "id": "long"})
        last = until_terminal(ws, {"long"})["long"][-1]
        assert last["type"] == "error" and last["code"] == "cancelled"
        ws.send_json({"type": "ping"})
        assert ws.receive_json() == {"type": "pong"}  # the socket is still usable
    assert llm.open_streams == 0 and llm.closed_streams == 1


def test_disconnect_cancels_answers_in_flight(make_api: Callable[..., Api]) -> None:  # noqa: F811
    llm = FakeLLM(responder=lambda c: [f" w{i}" for i in range(1000)], token_delay=0.01)
    api = make_api(llm=llm)
    with api.client.websocket_connect("/v1/chat") as ws:
        ws.receive_json()
        ws.send_json({"type": "ask", "id": "x", "question": "long"})
        while ws.receive_json()["type"] != "token":
            pass
    # Leaving the block closed the socket; the server's cleanup awaits the cancelled answer.
    for _ in range(100):
        if llm.closed_streams == 1:
            break
        api.run(_tick)
    assert llm.open_streams == 0 and llm.closed_streams == 1


async def _tick() -> None:
    import asyncio

    await asyncio.sleep(0.02)


def test_malformed_messages_get_error_events_and_the_socket_stays_open(api: Api) -> None:
    with api.client.websocket_connect("/v1/chat") as ws:
        ws.receive_json()
        ws.send_text("not json")
        assert ws.receive_json()["code"] == "invalid_message"
        ws.send_json({"type": "ask", "id": "q", "question": ""})
        bad = ws.receive_json()
        assert bad["type"] == "error" and bad["id"] == "q" and "question" in bad["message"]
        ws.send_json({"type": "shout"})
        assert ws.receive_json()["code"] == "invalid_message"
        ws.send_json({"type": "cancel", "id": "nothing"})
        assert ws.receive_json()["code"] == "not_found"
        ws.send_json({"type": "ask", "id": "m", "question": "x", "collection": "nope"})
        missing = until_terminal(ws, {"m"})["m"][-1]
        assert missing["type"] == "error" and missing["code"] == "not_found"
        ws.send_json({"type": "ask", "id": "ok", "question": "join paths?"})
        assert until_terminal(ws, {"ok"})["ok"][-1]["type"] == "done"


def test_duplicate_ids_and_the_in_flight_limit(make_api: Callable[..., Api]) -> None:  # noqa: F811
    llm = FakeLLM(responder=lambda c: [f" w{i}" for i in range(200)], token_delay=0.01)
    api = make_api(llm=llm, api={"ws_max_in_flight": 1})
    with api.client.websocket_connect("/v1/chat") as ws:
        ws.receive_json()
        ws.send_json({"type": "ask", "id": "a", "question": "x"})
        ws.send_json({"type": "ask", "id": "a", "question": "x"})
        ws.send_json({"type": "ask", "id": "b", "question": "x"})
        codes = set()
        while len(codes) < 2:
            m = ws.receive_json()
            if m["type"] == "error":
                codes.add((m["id"], m["code"]))
        assert codes == {("a", "conflict"), ("b", "too_many_requests")}
        ws.send_json({"type": "cancel", "id": "a"})
        assert until_terminal(ws, {"a"})["a"][-1]["code"] == "cancelled"


def test_idle_sockets_get_pings(make_api: Callable[..., Api]) -> None:  # noqa: F811
    api = make_api(api={"ws_ping_seconds": 0.05})
    with api.client.websocket_connect("/v1/chat") as ws:
        ws.receive_json()
        assert ws.receive_json() == {"type": "ping"}


def test_auth_by_header_query_or_first_message(make_api: Callable[..., Api]) -> None:  # noqa: F811
    api = make_api(auth={"enabled": True})
    api.seed("docs", CORPUS)
    header = api.key("alice", ["docs"])
    token = header["Authorization"].removeprefix("Bearer ")
    with api.client.websocket_connect("/v1/chat", headers=header) as ws:
        assert ws.receive_json() == {"type": "ready", "principal": "alice"}
    with api.client.websocket_connect(f"/v1/chat?api_key={token}") as ws:
        assert ws.receive_json()["type"] == "ready"
    with api.client.websocket_connect("/v1/chat") as ws:
        ws.send_json({"type": "auth", "api_key": token})
        assert ws.receive_json()["type"] == "ready"
        ws.send_json({"type": "ask", "id": "q", "question": "join paths?"})
        assert until_terminal(ws, {"q"})["q"][-1]["type"] == "done"
    with api.client.websocket_connect("/v1/chat") as ws:
        ws.send_json({"type": "ask", "id": "q", "question": "x"})
        refused = ws.receive_json()
        assert refused["type"] == "error" and refused["code"] == "unauthorized"
        with pytest.raises(WebSocketDisconnect) as closed:
            ws.receive_json()
        assert closed.value.code == 1008
    with api.client.websocket_connect("/v1/chat?api_key=rag_wrong") as ws:
        assert ws.receive_json()["code"] == "unauthorized"
        with pytest.raises(WebSocketDisconnect):
            ws.receive_json()


def test_revoking_a_key_closes_its_open_websockets(make_api: Callable[..., Api]) -> None:  # noqa: F811
    # Issue 17: REST refused a revoked key at once, but sockets opened with it kept working.
    from app.services import keys

    api = make_api(auth={"enabled": True, "recheck_seconds": 0.2})
    api.seed("docs", CORPUS)
    header = api.key("mallory", ["docs"])
    with api.client.websocket_connect("/v1/chat", headers=header) as ws:
        assert ws.receive_json()["type"] == "ready"

        async def revoke() -> None:
            async with api.resources.sessionmaker() as session:
                await keys.revoke_key(session, "mallory")
                await session.commit()

        api.run(revoke)
        refused = ws.receive_json()
        assert refused["type"] == "error" and refused["code"] == "unauthorized" and "revoked" in refused["message"]
        with pytest.raises(WebSocketDisconnect) as closed:
            ws.receive_json()
        assert closed.value.code == 1008
    assert api.client.get("/v1/collections", headers=header).status_code == 401


def _job_with_events(api: Api, *, status: str, paths: list[str]) -> int:
    """A job of ``docs`` with a started and an indexed event per path (as a worker would write them)."""
    from core.db.base import utcnow
    from core.db.models import IngestJob, IngestJobEvent
    from ingest import queue

    async def work() -> int:
        async with api.resources.sessionmaker() as session:
            coll = await queue.get_or_create_collection(session, "docs")
            job = IngestJob(
                collection_id=coll.id, root_path="/srv/docs", prune=True, status=status, errors=[], attempts=1,
                files_total=len(paths), started_at=utcnow(), progress=1.0 if status != "running" else 0.5,
                files_new=len(paths), chunks_added=3 * len(paths),
            )  # fmt: skip
            session.add(job)
            await session.flush()
            for path in paths:
                session.add(IngestJobEvent(job_id=job.id, type="file", data={"path": path, "status": "started"}))
                session.add(
                    IngestJobEvent(
                        job_id=job.id, type="file", data={"path": path, "status": "indexed", "chunks": 3, "error": None}
                    )
                )
            await session.commit()
            return job.id

    return api.run(work)


def _finish(api: Api, job_id: int) -> None:
    from core.db.base import utcnow
    from core.db.models import IngestJob

    async def work() -> None:
        async with api.resources.sessionmaker() as session:
            job = await session.get(IngestJob, job_id)
            assert job is not None
            job.status, job.finished_at, job.progress = "succeeded", utcnow(), 1.0
            await session.commit()

    api.run(work)


def test_watch_job_sends_the_jobs_events_then_job_end(make_api: Callable[..., Api]) -> None:  # noqa: F811
    from app.schemas.events import JOB_EVENT_ADAPTER

    api = make_api(api={"job_events_poll_seconds": 0.05})
    job_id = _job_with_events(api, status="running", paths=["/srv/docs/a.md", "/srv/docs/b.md"])
    with api.client.websocket_connect("/v1/chat") as ws:
        ws.receive_json()
        ws.send_json({"type": "watch_job", "id": "w", "job_id": job_id})
        first = [ws.receive_json() for _ in range(5)]
        assert [(e["type"], e.get("status")) for e in first] == [
            ("file", "started"), ("file", "indexed"), ("file", "started"), ("file", "indexed"), ("progress", "running")
        ]  # fmt: skip
        assert all(e["id"] == "w" and e["job_id"] == job_id for e in first)
        for e in first:
            JOB_EVENT_ADAPTER.validate_python({k: v for k, v in e.items() if k != "id"})
        assert first[-1]["done"] == 1 and first[-1]["total"] == 2 and first[-1]["eta_seconds"] is not None
        ids = [e["event_id"] for e in first[:4]]
        assert ids == sorted(ids) and len(set(ids)) == 4
        _finish(api, job_id)
        end = ws.receive_json()
        assert end["type"] == "job_end" and end["id"] == "w" and end["job"]["status"] == "succeeded"
        # A watch can be stopped (the job is not touched); a job the key cannot see is not_found.
        job2 = _job_with_events(api, status="running", paths=["/srv/docs/c.md"])
        ws.send_json({"type": "watch_job", "id": "w2", "job_id": job2})
        assert ws.receive_json()["type"] == "file"
        ws.send_json({"type": "cancel", "id": "w2"})
        while (message := ws.receive_json())["type"] != "error":
            assert message["id"] == "w2"
        assert message["code"] == "cancelled"
        ws.send_json({"type": "watch_job", "id": "w3", "job_id": 999})
        assert ws.receive_json() | {"message": ""} == {
            "type": "error", "id": "w3", "code": "not_found", "message": "", "retryable": False
        }  # fmt: skip


def test_job_events_over_sse_resume_after_the_last_event_id(make_api: Callable[..., Api]) -> None:  # noqa: F811
    api = make_api(api={"job_events_poll_seconds": 0.05})
    job_id = _job_with_events(api, status="succeeded", paths=["/srv/docs/a.md", "/srv/docs/b.md"])
    with api.client.stream("GET", f"/v1/jobs/{job_id}/events") as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    ids = [int(line[3:]) for line in lines if line.startswith("id:")]
    assert len(ids) == 4 and ids == sorted(ids)
    assert lines[-2:] == ["event: job_end", lines[-1]] and '"status":"succeeded"' in lines[-1]
    with api.client.stream("GET", f"/v1/jobs/{job_id}/events", headers={"Last-Event-ID": str(ids[1])}) as r:
        again = [int(line[3:]) for line in r.iter_lines() if line.startswith("id:")]
    assert again == ids[2:]
    assert api.client.get("/v1/jobs/999/events").status_code == 404


def test_a_cancel_through_this_api_reaches_its_job_watchers_at_once(make_api: Callable[..., Api]) -> None:  # noqa: F811
    """Job events are polled; a cancel request made through the same process wakes the watchers,
    so they report it even when the worker stops before the next poll."""
    import time

    api = make_api(api={"job_events_poll_seconds": 30.0})
    job_id = _job_with_events(api, status="running", paths=["/srv/docs/a.md"])
    with api.client.websocket_connect("/v1/chat") as ws:
        ws.receive_json()
        ws.send_json({"type": "watch_job", "id": "w", "job_id": job_id})
        first = [ws.receive_json() for _ in range(3)]
        assert first[-1]["type"] == "progress" and first[-1]["cancel_requested"] is False
        started = time.monotonic()
        assert api.client.post(f"/v1/jobs/{job_id}/cancel").status_code == 200
        update = ws.receive_json()
        assert time.monotonic() - started < 10, "the watcher waited for its next poll"
        assert update["type"] == "progress" and update["cancel_requested"] is True
        _finish(api, job_id)
        api.resources.job_wakeups.wake(job_id)
        assert ws.receive_json()["type"] == "job_end"
