"""The service as users meet it: a real uvicorn server on a free port, the packaged embedding model,
really ingested documents (FAISS + BM25 snapshots), SQLite, and for answers the real model server
(vLLM CPU, fixture ``llm_server``; skipped with its reason when ``.venv-llm`` is missing, unless CI).

Latency figures are printed and written to ``tests/artifacts/service.json``; no timed assertions.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import statistics
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
import websockets
from openai import AsyncOpenAI, NotFoundError

from app.main import create_app
from app.services import keys
from core.settings import Settings
from ingest.worker import build_ingest_context, enqueue_path, run_job
from serving.launcher import find_free_port
from tests.corpus_factory import Corpus, write_corpus
from tests.llm_server import LLMServerInfo

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
SECRET = "The vault combination of tenant B is 5-17-42."


class LiveServer:
    """uvicorn serving ``app`` in a thread of this process, on a free loopback port."""

    def __init__(self, app: Any) -> None:
        self.port = find_free_port("127.0.0.1")
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name=f"uvicorn-{self.port}", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 120
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


class UpstreamProxy:
    """A TCP proxy between the service and the model server that watches streamed completions.

    vLLM's Prometheus gauges are off in the launcher's configuration (``--disable-log-stats``), so
    whether the service let go of an upstream request is observed on the wire: a connection that
    started an event stream and closed before ``data: [DONE]`` is an aborted generation (vLLM
    aborts a request whose client disconnects). Runs its own event loop in a thread.
    """

    def __init__(self, target: str) -> None:
        url = httpx.URL(target)
        self.host, self.port = url.host, url.port or 80
        self.streaming = 0
        self.completed = 0
        self.aborted = 0
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="upstream-proxy", daemon=True)
        self.listen_port = 0
        self.down = False
        self.live: set[asyncio.StreamWriter] = set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.listen_port}"

    async def _pipe_up(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()

    def kill(self) -> None:
        """Behave like a model server that died: cut every connection, refuse new ones."""

        def cut() -> None:
            self.down = True
            for writer in list(self.live):
                writer.transport.abort()

        self.loop.call_soon_threadsafe(cut)

    def revive(self) -> None:
        """Accept connections again (the model server is back)."""
        self.loop.call_soon_threadsafe(setattr, self, "down", False)

    async def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        if self.down:
            client_w.transport.abort()
            return
        up_r, up_w = await asyncio.open_connection(self.host, self.port)
        self.live.update((client_w, up_w))
        upstream = asyncio.ensure_future(self._pipe_up(client_r, up_w))
        streaming, tail = False, b""
        try:
            while data := await up_r.read(65536):
                window = tail + data
                if not streaming and b"text/event-stream" in window:
                    streaming = True
                    self.streaming += 1
                if streaming and b"data: [DONE]" in window:
                    streaming = False
                    self.streaming -= 1
                    self.completed += 1
                tail = window[-64:]
                client_w.write(data)
                await client_w.drain()
                if upstream.done():  # the service closed its side mid-response
                    break
        except ConnectionError:
            pass
        finally:
            if streaming:
                self.streaming -= 1
                self.aborted += 1
            upstream.cancel()
            up_w.close()
            client_w.close()
            self.live.difference_update((client_w, up_w))

    def __enter__(self) -> UpstreamProxy:
        self.thread.start()

        async def start() -> int:
            server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
            return int(server.sockets[0].getsockname()[1])

        self.listen_port = asyncio.run_coroutine_threadsafe(start(), self.loop).result(10)
        return self

    def __exit__(self, *exc: object) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)

    async def wait_released(self, aborted_before: int, within: float) -> float:
        """Seconds until no streamed completion is open and one more was aborted (fails after ``within``)."""
        started = time.perf_counter()
        while self.streaming > 0 or self.aborted <= aborted_before:
            assert time.perf_counter() - started < within, "the upstream request is still open"
            await asyncio.sleep(0.02)
        return time.perf_counter() - started


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Corpus:
    return write_corpus(tmp_path_factory.mktemp("service") / "corpus")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, corpus: Corpus, embedder: Any) -> dict[str, Any]:
    """Ingest the corpus into ``manuals`` and a secret into ``vault``; create keys. Returns settings and keys."""
    data = tmp_path_factory.mktemp("service-data")
    vault = tmp_path_factory.mktemp("vault")
    (vault / "vault.txt").write_text(SECRET)
    settings = Settings(
        data_dir=data,
        database={"url": f"sqlite+aiosqlite:///{data / 'rag.db'}"},
        auth={"enabled": True},
        llm={"base_url": f"http://127.0.0.1:{find_free_port('127.0.0.1')}"},  # nothing listens there
    )

    async def prepare() -> dict[str, str]:
        ctx = await build_ingest_context(settings, embedder=embedder)
        try:
            for folder, name in ((corpus.root, "manuals"), (vault, "vault")):
                job_id, _ = await enqueue_path(ctx.sessionmaker, folder, collection=name)
                summary = await run_job(ctx, job_id)
                assert summary is not None and summary.status == "succeeded"
            tokens = {}
            async with ctx.sessionmaker() as session:
                for who, scope in (("a", ["manuals"]), ("b", ["vault"])):
                    tokens[who] = (await keys.create_key(session, name=who, collections=scope)).token
                tokens["admin"] = (await keys.create_key(session, name="admin", admin=True)).token
                await session.commit()
            return tokens
        finally:
            await ctx.aclose()

    return {"settings": settings, "tokens": asyncio.run(prepare())}


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture(scope="module")
def query_threads() -> Iterator[None]:
    """One torch thread while serving, as ``rag serve`` configures it (the shared test embedder
    was loaded with torch's default; two threads collapse when the other core is busy)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def service(stack: dict[str, Any], embedder: Any, query_threads: None) -> Iterator[LiveServer]:
    """The API without a model server (search, isolation, operations)."""
    with LiveServer(create_app(stack["settings"], embedder=embedder)) as server:
        yield server


@pytest.fixture(scope="module")
def upstream(llm_server: LLMServerInfo) -> Iterator[UpstreamProxy]:
    with UpstreamProxy(llm_server.base_url) as proxy:
        yield proxy


@pytest.fixture(scope="module")
def llm_service(
    stack: dict[str, Any], embedder: Any, llm_server: LLMServerInfo, upstream: UpstreamProxy, query_threads: None
) -> Iterator[LiveServer]:
    """The API answering with the real model server (through the watching proxy).

    The grounding guard is off here: these tests are about the transports (token-by-token streaming,
    cancellation reaching the model server, usage accounting), which need the model's own stream;
    the guard holds text per sentence and may answer from quotes without the model. The guard has
    its own tests against the real server (tests/integration/test_generation.py, the chat page).
    """
    base = stack["settings"]
    settings = base.model_copy(
        update={
            "llm": base.llm.model_copy(update={"base_url": upstream.url, "model": llm_server.model}),
            "grounding": base.grounding.model_copy(update={"policy": "off"}),
        }
    )
    with LiveServer(create_app(settings, embedder=embedder)) as server:
        yield server


def record(name: str, values: dict[str, Any]) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / "service.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    data[name] = values
    path.write_text(json.dumps(data, indent=2) + "\n")
    print(f"\n{name}: {values}")


# --- without the model server ------------------------------------------------------------------


def test_search_over_http_and_its_latency(service: LiveServer, stack: dict[str, Any], corpus: Corpus) -> None:
    headers = auth(stack["tokens"]["a"])
    fact = corpus.facts[0]
    with httpx.Client(base_url=service.url, headers=headers, timeout=30) as client:
        first = client.post("/v1/search", json={"query": fact.query, "k": 5})
        assert first.status_code == 200, first.text
        hits = first.json()["hits"]
        assert hits[0]["path"] == str(fact.path) and fact.answer in hits[0]["text"]
        assert hits[0]["dense"] is not None and hits[0]["sparse"] is not None
        latencies = []
        for i in range(50):
            query = corpus.facts[i % len(corpus.facts)].query
            started = time.perf_counter()
            r = client.post("/v1/search", json={"query": query, "k": 10})
            latencies.append((time.perf_counter() - started) * 1000.0)
            assert r.status_code == 200
    quantiles = statistics.quantiles(latencies, n=20)
    record(
        "search_latency_ms",
        {"requests": 50, "p50": round(statistics.median(latencies), 2), "p95": round(quantiles[18], 2)},
    )


def test_readiness_and_metrics(service: LiveServer, stack: dict[str, Any]) -> None:
    admin = auth(stack["tokens"]["admin"])  # auth is on: the details and the metrics are an admin's
    ready = httpx.get(f"{service.url}/readyz", headers=admin, timeout=30)
    assert ready.status_code == 200  # the model server is down: degraded, not unavailable
    assert ready.json()["status"] == "degraded" and ready.json()["checks"]["database"]["ok"]
    assert ready.json()["checks"]["index"]["detail"] == "2 collection(s) readable"
    assert httpx.get(f"{service.url}/readyz", timeout=30).json() == {"status": "degraded", "checks": {}}
    assert httpx.get(f"{service.url}/metrics", timeout=30).status_code == 401
    metrics = httpx.get(f"{service.url}/metrics", headers=admin, timeout=30).text
    assert 'rag_ingest_jobs{status="succeeded"} 2.0' in metrics


def test_answers_get_503_while_the_model_server_is_down(service: LiveServer, stack: dict[str, Any]) -> None:
    r = httpx.post(
        f"{service.url}/v1/ask/stream", json={"question": "hi"}, headers=auth(stack["tokens"]["a"]), timeout=60
    )
    assert r.status_code == 503 and int(r.headers["retry-after"]) > 0
    assert r.json()["error"]["code"] == "llm_unavailable"


async def test_key_a_cannot_reach_collection_b(service: LiveServer, stack: dict[str, Any]) -> None:
    a, b = auth(stack["tokens"]["a"]), auth(stack["tokens"]["b"])
    async with httpx.AsyncClient(base_url=service.url, timeout=30) as client:
        listed = (await client.get("/v1/collections", headers=a)).json()["collections"]
        assert [c["name"] for c in listed] == ["manuals"]
        assert (await client.get("/v1/collections/vault", headers=a)).status_code == 404
        assert (await client.get("/v1/collections/vault", headers=b)).status_code == 200
        hits = (await client.post("/v1/search", headers=a, json={"query": "vault combination", "k": 50})).json()
        assert SECRET not in json.dumps(hits) and {h["collection"] for h in hits["hits"]} == {"manuals"}
        named = await client.post("/v1/search", headers=a, json={"query": "x", "filters": {"collections": ["vault"]}})
        assert named.status_code == 404
        ask = await client.post("/v1/ask", headers=a, json={"question": "combination?", "collection": "vault"})
        assert ask.status_code == 404
        chat = await client.post(
            "/v1/chat/completions",
            headers=a,
            json={"model": "rag:vault", "messages": [{"role": "user", "content": "combination?"}]},
        )
        assert chat.status_code == 404
    openai = AsyncOpenAI(base_url=f"{service.url}/v1", api_key=stack["tokens"]["a"], max_retries=0)
    with pytest.raises(NotFoundError):
        await openai.chat.completions.create(model="rag:vault", messages=[{"role": "user", "content": "combination?"}])
    await openai.close()
    ws_url = service.url.replace("http", "ws") + "/v1/chat"
    async with websockets.connect(ws_url, additional_headers=a) as ws:
        assert json.loads(await ws.recv())["type"] == "ready"
        await ws.send(json.dumps({"type": "ask", "id": "x", "question": "combination?", "collection": "vault"}))
        refused = json.loads(await ws.recv())
        assert refused == {**refused, "id": "x", "type": "error", "code": "not_found"}
    async with websockets.connect(ws_url) as ws:  # no credentials: the first message must authenticate
        await ws.send(json.dumps({"type": "ask", "id": "x", "question": "x"}))
        assert json.loads(await ws.recv())["code"] == "unauthorized"
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await ws.recv()
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008


# --- with the real model server ----------------------------------------------------------------


LONG = {
    "question": "Describe in great detail everything about the quokka daemon, its port, its logs and its lock file.",
    "collection": "manuals",
    "max_tokens": 400,
}


async def sse(response: httpx.Response) -> AsyncIterator[tuple[float, dict[str, Any]]]:
    """(arrival time, data) of each SSE event."""
    async for line in response.aiter_lines():
        if line.startswith("data: "):
            yield time.perf_counter(), json.loads(line[len("data: ") :])


@pytest.mark.llm
async def test_sse_tokens_arrive_incrementally(llm_service: LiveServer, stack: dict[str, Any], llm_server: Any) -> None:
    headers = auth(stack["tokens"]["a"])
    question = {"question": "Which port does the quokka daemon listen on?", "collection": "manuals", "max_tokens": 48}
    async with httpx.AsyncClient(base_url=llm_service.url, headers=headers, timeout=300) as client:
        started = time.perf_counter()
        async with client.stream("POST", "/v1/ask/stream", json=question) as r:
            assert r.status_code == 200 and r.headers["x-accel-buffering"] == "no"
            events = [e async for e in sse(r)]
    kinds = [d["type"] for _, d in events]
    assert kinds[0] == "retrieval" and kinds[-1] == "done", kinds
    tokens = [(t, d) for t, d in events if d["type"] == "token"]
    assert len(tokens) >= 3
    first_token, last = tokens[0][0] - started, events[-1][0] - started
    # Streamed, not delivered in one block: the retrieval event precedes the first token, and the
    # tokens arrive spread over the generation (judged on arrival times, so a slow time to first
    # token on a loaded machine does not decide it).
    assert events[0][0] < tokens[0][0]
    arrivals = {round(t, 2) for t, _ in tokens}
    assert len(arrivals) >= 3, arrivals
    assert tokens[-1][0] - tokens[0][0] > 0.2, (tokens[0][0], tokens[-1][0])
    done = events[-1][1]
    assert "".join(d["text"] for _, d in tokens) == done["answer"]
    # Raw model-server TTFT for comparison (same host, same moment).
    raw = await raw_ttft(llm_server)
    record(
        "ttft_ms",
        {
            "ask_stream_first_token": round(first_token * 1000, 1),
            "service_reported_ttft": round(done["timings"]["ttft_ms"], 1),
            "raw_model_server": round(raw * 1000, 1),
            "answer_total": round(last * 1000, 1),
        },
    )


async def raw_ttft(llm_server: LLMServerInfo) -> float:
    body = {
        "model": llm_server.model,
        "prompt": "<|im_start|>user\nWhich port does the quokka daemon listen on?<|im_end|>\n<|im_start|>assistant\n",
        "max_tokens": 16,
        "stream": True,
        "temperature": 0.0,
    }
    async with httpx.AsyncClient(timeout=120) as client:
        started = time.perf_counter()
        async with client.stream("POST", f"{llm_server.base_url}/v1/completions", json=body) as r:
            async for line in r.aiter_lines():
                if line.startswith("data: ") and '"text"' in line:
                    return time.perf_counter() - started
    raise AssertionError("no token from the model server")


@pytest.mark.llm
async def test_disconnect_mid_answer_frees_the_upstream_request(
    llm_service: LiveServer, stack: dict[str, Any], upstream: UpstreamProxy
) -> None:
    headers = auth(stack["tokens"]["a"])
    aborted = upstream.aborted
    async with (
        httpx.AsyncClient(base_url=llm_service.url, headers=headers, timeout=300) as client,
        client.stream("POST", "/v1/ask/stream", json=LONG) as r,
    ):
        seen = 0
        async for _, data in sse(r):
            assert data["type"] not in ("done", "error"), data
            seen += data["type"] == "token"
            if seen == 3:
                assert upstream.streaming == 1  # the model is generating for us right now
                break  # leaving the block closes the connection mid-answer
    started = time.perf_counter()
    await upstream.wait_released(aborted, within=5)
    record("sse_disconnect_to_upstream_closed_ms", {"ms": round((time.perf_counter() - started) * 1000, 1)})


@pytest.mark.llm
async def test_model_server_killed_mid_stream_then_back(
    llm_service: LiveServer, stack: dict[str, Any], upstream: UpstreamProxy
) -> None:
    # Issue 17's fault list: the model server dies while answers stream. SSE and websocket end with an
    # error event (never a hang or a silent end), a new ask is a 503 with Retry-After before any stream,
    # and answers work again once the server is back.
    headers = auth(stack["tokens"]["a"])
    try:
        async with (
            httpx.AsyncClient(base_url=llm_service.url, headers=headers, timeout=300) as client,
            client.stream("POST", "/v1/ask/stream", json=LONG) as r,
        ):
            assert r.status_code == 200
            kinds = []
            async for _, data in sse(r):
                kinds.append(data["type"])
                if kinds.count("token") == 3:
                    upstream.kill()
            assert kinds[-1] == "error", kinds[-5:]
        async with websockets.connect(
            llm_service.url.replace("http", "ws") + "/v1/chat", additional_headers=headers
        ) as ws:
            assert json.loads(await ws.recv())["type"] == "ready"
            await ws.send(json.dumps({"type": "ask", "id": "down", **LONG}))
            while (message := json.loads(await ws.recv()))["type"] not in ("done", "error"):
                pass
            assert message["type"] == "error" and message["retryable"], message
        async with httpx.AsyncClient(base_url=llm_service.url, headers=headers, timeout=300) as client:
            refused = await client.post("/v1/ask/stream", json=LONG)
            assert refused.status_code == 503 and "retry-after" in refused.headers, refused.text
    finally:
        upstream.revive()
    async with httpx.AsyncClient(base_url=llm_service.url, headers=headers, timeout=300) as client:
        back = await client.post("/v1/ask", json={**LONG, "max_tokens": 16})
        assert back.status_code == 200, back.text


@pytest.mark.llm
async def test_websocket_cancel_stops_generation(
    llm_service: LiveServer, stack: dict[str, Any], upstream: UpstreamProxy
) -> None:
    url = llm_service.url.replace("http", "ws") + f"/v1/chat?api_key={stack['tokens']['a']}"
    aborted = upstream.aborted
    async with websockets.connect(url) as ws:
        assert json.loads(await ws.recv())["type"] == "ready"
        await ws.send(json.dumps({"type": "ask", "id": "long", **LONG}))
        tokens = 0
        while tokens < 3:
            message = json.loads(await ws.recv())
            assert message["type"] not in ("done", "error"), message
            tokens += message["type"] == "token"
        assert upstream.streaming == 1
        cancelled = time.perf_counter()
        await ws.send(json.dumps({"type": "cancel", "id": "long"}))
        while (message := json.loads(await ws.recv()))["type"] == "token":
            pass
        assert message == {**message, "id": "long", "type": "error", "code": "cancelled"}
        to_event = time.perf_counter() - cancelled
        released = await upstream.wait_released(aborted, within=5)
        await ws.send(json.dumps({"type": "ping"}))
        assert json.loads(await ws.recv()) == {"type": "pong"}
    record(
        "ws_cancel_ms",
        {"cancel_to_error_event": round(to_event * 1000, 1), "then_upstream_closed": round(released * 1000, 1)},
    )


@pytest.mark.llm
async def test_two_concurrent_questions_on_one_socket(llm_service: LiveServer, stack: dict[str, Any]) -> None:
    url = llm_service.url.replace("http", "ws") + "/v1/chat"
    async with websockets.connect(url, additional_headers=auth(stack["tokens"]["a"])) as ws:
        assert json.loads(await ws.recv())["type"] == "ready"
        for i, fact in enumerate(("What is the capital of Veldoria?", "How fast does the ZX-9 coolant pump turn?")):
            await ws.send(json.dumps({"type": "ask", "id": f"q{i}", "question": fact, "max_tokens": 32}))
        finished: dict[str, dict[str, Any]] = {}
        interleaved: list[str] = []
        while len(finished) < 2:
            message = json.loads(await asyncio.wait_for(ws.recv(), 300))
            if message["type"] == "ping":
                continue
            interleaved.append(message["id"])
            if message["type"] in ("done", "error"):
                finished[message["id"]] = message
    assert {m["type"] for m in finished.values()} == {"done"}, finished
    assert all(m["answer"].strip() for m in finished.values())
    assert set(interleaved) == {"q0", "q1"}


@pytest.mark.llm
async def test_openai_client_streaming_and_not(llm_service: LiveServer, stack: dict[str, Any]) -> None:
    client = AsyncOpenAI(base_url=f"{llm_service.url}/v1", api_key=stack["tokens"]["a"], max_retries=0, timeout=300)
    try:
        messages = [{"role": "user", "content": "At what temperature does the zorblax reactor run?"}]
        completion = await client.chat.completions.create(model="rag:manuals", messages=messages, max_tokens=48)  # type: ignore[arg-type]
        content = completion.choices[0].message.content or ""
        assert content.strip() and completion.usage is not None
        citations = (completion.model_extra or {}).get("citations")
        assert isinstance(citations, list)
        stream = await client.chat.completions.create(
            model="rag:manuals",
            messages=messages,  # type: ignore[arg-type]
            max_tokens=48,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [c async for c in stream]
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert streamed.strip()
        assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) >= 3
        assert chunks[-1].usage is not None
    finally:
        await client.close()


@pytest.mark.llm
def test_conversation_over_http(llm_service: LiveServer, stack: dict[str, Any]) -> None:
    headers = auth(stack["tokens"]["a"])
    with httpx.Client(base_url=llm_service.url, headers=headers, timeout=300) as client:
        cid = client.post("/v1/conversations", json={"collection": "manuals"}).json()["id"]
        first = client.post(
            "/v1/ask", json={"question": "Which port does quokka use?", "conversation_id": cid, "max_tokens": 32}
        )
        assert first.status_code == 200, first.text
        second = client.post(
            "/v1/ask", json={"question": "And where are its logs?", "conversation_id": cid, "max_tokens": 32}
        )
        assert second.status_code == 200
        messages = client.get(f"/v1/conversations/{cid}").json()["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant"]
    with contextlib.suppress(KeyError):
        assert messages[1]["usage"]["completion_tokens"] > 0
