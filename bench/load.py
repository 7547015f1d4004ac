"""Load and fault behaviour of a real ``rag serve``: mixed chats, streamed asks and searches while a
folder is being ingested, all on 127.0.0.1, bounded in count and time.

    .venv/bin/python bench/load.py [--llm-url http://127.0.0.1:8001] [--chats 50] [--questions 2]
        [--asks 20] [--searches 600] [--search-concurrency 200] [--passages 300]
        [--data-dir data/bench-load] [--out bench/results/load.json] [--max-seconds 900]

What it does:

1. Prepares a data dir (once; reused): ``--passages`` passages of ``../shared/eval/faq-dev-small`` as
   files, ingested into collection ``load`` with ``rag ingest``; another ``--passages`` are written to
   a second folder that is ingested *during* the load (collection ``load-ingest``).
2. Starts ``rag serve`` on a free port (its own process, so its RSS, connections and event loop are
   measured alone) with the service's default limits, pointing at ``--llm-url`` (a running model
   server, e.g. ``make llm-serve``; without one the answer parts are skipped and said so).
3. Measures search latency unloaded (``--baseline`` sequential searches).
4. Warms up (40 searches, 8 at a time, one SSE ask, one websocket question; not measured), so
   that one-time allocations are not counted as growth over the run (the cold RSS is kept too).
5. Runs, at once: ``rag ingest`` of the second folder; ``--chats`` websocket chats of ``--questions``
   questions each; ``--asks`` SSE asks; ``--searches`` searches with ``--search-concurrency`` in
   flight; a ``/healthz`` probe every 100 ms; a sampler of the server's RSS and of its open
   connections to the model server every 250 ms.
6. Prints a table and writes JSON: per operation the outcomes (ok, refused with 429/503 + the time
   it took to be refused, errors by kind, 5xx, dropped websockets) and p50/p95/p99 latency; TTFT of
   chats and asks; ``/healthz`` p50/p99/max; event-loop lag from ``/metrics``; RSS before/after; the
   most upstream connections seen vs the configured answer concurrency; the machine's load.

Compare ratios within one run (admitted search p95 vs unloaded p50): absolute times depend on the
machine and on what else runs on it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import psutil
import websockets

ROOT = Path(__file__).resolve().parents[1]
DATASET = ROOT.parent / "shared" / "eval" / "faq-dev-small"
RAG = str(Path(sys.executable).with_name("rag"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))], 1)


@dataclass
class Op:
    """Outcomes and latencies (ms) of one kind of operation."""

    name: str
    latencies: list[float] = field(default_factory=list)
    ttft: list[float] = field(default_factory=list)
    refusal_ms: list[float] = field(default_factory=list)
    outcomes: Counter[str] = field(default_factory=Counter)

    def summary(self) -> dict[str, Any]:
        return {
            "count": sum(self.outcomes.values()),
            "outcomes": dict(self.outcomes),
            "p50_ms": pct(self.latencies, 0.5),
            "p95_ms": pct(self.latencies, 0.95),
            "p99_ms": pct(self.latencies, 0.99),
            "ttft_p50_ms": pct(self.ttft, 0.5),
            "ttft_p95_ms": pct(self.ttft, 0.95),
            "refused_within_ms_max": max(self.refusal_ms) if self.refusal_ms else None,
        }


def outcome_of(status: int) -> str:
    if status in (429, 503):
        return f"refused_{status}"
    if status >= 500:
        return f"5xx_{status}"
    if status >= 400:
        return f"4xx_{status}"
    return "ok"


def prepare(data_dir: Path, passages: int) -> tuple[Path, Path]:
    """Write two folders of passages; ingest the first (once). Returns (ingested, to ingest during load)."""
    rows = [json.loads(line) for line in (DATASET / "corpus.jsonl").read_text(encoding="utf-8").splitlines()]
    folders = (data_dir / "docs-base", data_dir / "docs-during")
    for folder, part in zip(folders, (rows[:passages], rows[passages : 2 * passages]), strict=True):
        folder.mkdir(parents=True, exist_ok=True)
        for row in part:
            title = row.get("title") or ""
            name = re.sub(r"[^A-Za-z0-9._-]+", "_", row["_id"])
            (folder / f"{name}.md").write_text(f"# {title}\n\n{row['text']}\n", encoding="utf-8")
    marker = data_dir / ".base-ingested"
    if not marker.exists():
        env = {**os.environ, "RAG_DATA_DIR": str(data_dir / "rag")}
        subprocess.run(
            [RAG, "ingest", str(folders[0]), "-c", "load", "--json"], env=env, check=True, stdout=subprocess.DEVNULL
        )
        marker.touch()
    # The during-load ingestion must do work every run: forget what an earlier run ingested.
    return folders


class Server:
    """``rag serve`` in its own process."""

    def __init__(self, data_dir: Path, llm_url: str, extra_env: dict[str, str]) -> None:
        self.port = free_port()
        self.env = {
            **os.environ,
            "RAG_DATA_DIR": str(data_dir / "rag"),
            "RAG_LLM__BASE_URL": llm_url,
            "RAG_SERVER__PORT": str(self.port),
            "RAG_SERVER__LOG_LEVEL": "warning",
            **extra_env,
        }
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> Server:
        self.log = open(Path(self.env["RAG_DATA_DIR"]).parent / "serve.log", "wb")
        self.proc = subprocess.Popen([RAG, "serve"], env=self.env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"rag serve exited with {self.proc.returncode}; see {self.log.name}")
            time.sleep(0.25)
        raise RuntimeError("rag serve did not start in 180 s")

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(30)
            if self.proc.poll() is None:
                self.proc.kill()
        self.log.close()


QUESTIONS = [
    json.loads(line)["text"] for line in (DATASET / "queries.jsonl").read_text(encoding="utf-8").splitlines()[:50]
]


async def search_load(url: str, total: int, concurrency: int, op: Op, stop_at: float) -> None:
    """``total`` searches, ``concurrency`` at a time, through aiohttp: httpx at 200 connections spent
    seconds per request in its own pool and event loop on these 2 cores (measured: client p50 3.2 s
    while the server's own histogram said 150 ms), so the figures were the client's, not the server's."""
    connector = aiohttp.TCPConnector(limit=concurrency + 10)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(url, connector=connector, timeout=timeout) as client:
        gate = asyncio.Semaphore(concurrency)

        async def one(i: int) -> None:
            async with gate:
                if time.monotonic() > stop_at:
                    op.outcomes["skipped_time_cap"] += 1
                    return
                started = time.perf_counter()
                try:
                    body = {"query": QUESTIONS[i % len(QUESTIONS)], "k": 10}
                    async with client.post("/v1/search", json=body) as r:
                        await r.read()
                        status = r.status
                except (aiohttp.ClientError, TimeoutError) as e:
                    op.outcomes[f"transport_{type(e).__name__}"] += 1
                    return
                elapsed = (time.perf_counter() - started) * 1000
                kind = outcome_of(status)
                op.outcomes[kind] += 1
                if kind == "ok":
                    op.latencies.append(elapsed)
                elif kind.startswith("refused"):
                    op.refusal_ms.append(round(elapsed, 1))

        await asyncio.gather(*(one(i) for i in range(total)))


async def sse_asks(url: str, total: int, op: Op) -> None:
    async def one(i: int) -> None:
        started = time.perf_counter()
        seen: list[str] = []
        try:
            async with (
                httpx.AsyncClient(base_url=url, timeout=300) as client,
                client.stream(
                    "POST", "/v1/ask/stream", json={"question": QUESTIONS[i % len(QUESTIONS)], "max_tokens": 64}
                ) as r,
            ):
                kind = outcome_of(r.status_code)
                if kind != "ok":
                    await r.aread()
                    op.outcomes[kind] += 1
                    if kind.startswith("refused"):
                        op.refusal_ms.append(round((time.perf_counter() - started) * 1000, 1))
                    return
                last = None
                async for line in r.aiter_lines():
                    if line.startswith("event: "):
                        if line[7:] == "token" and last != "token" and not any(e == "token" for e in seen):
                            op.ttft.append((time.perf_counter() - started) * 1000)
                        last = line[7:]
                        seen.append(last)
                op.outcomes["ok" if last == "done" else f"ended_{last}"] += 1
                op.latencies.append((time.perf_counter() - started) * 1000)
        except httpx.HTTPError as e:
            op.outcomes[f"transport_{type(e).__name__}"] += 1

    await asyncio.gather(*(one(i) for i in range(total)))


async def chats(url: str, sockets: int, questions: int, op: Op) -> None:
    ws_url = url.replace("http://", "ws://") + "/v1/chat"

    async def chat(n: int) -> None:
        try:
            async with websockets.connect(ws_url, open_timeout=60, max_size=2**24) as ws:
                json.loads(await ws.recv())  # ready
                for q in range(questions):
                    started = time.perf_counter()
                    first = True
                    await ws.send(
                        json.dumps(
                            {
                                "type": "ask",
                                "id": f"{n}-{q}",
                                "question": QUESTIONS[(n + q) % len(QUESTIONS)],
                                "max_tokens": 64,
                            }
                        )
                    )
                    while True:
                        message = json.loads(await ws.recv())
                        if message.get("type") == "token" and first:
                            first = False
                            op.ttft.append((time.perf_counter() - started) * 1000)
                        if message.get("type") == "done":
                            op.outcomes["ok"] += 1
                            op.latencies.append((time.perf_counter() - started) * 1000)
                            break
                        if message.get("type") == "error":
                            code = message.get("code")
                            retryable = message.get("retryable")
                            op.outcomes[f"error_{code}" + ("_retryable" if retryable else "")] += 1
                            if code in ("overloaded", "rate_limited"):
                                op.refusal_ms.append(round((time.perf_counter() - started) * 1000, 1))
                            break
        except websockets.ConnectionClosed as e:
            op.outcomes[f"dropped_{e.code if hasattr(e, 'code') else 'x'}"] += 1
        except (OSError, TimeoutError) as e:
            op.outcomes[f"transport_{type(e).__name__}"] += 1

    await asyncio.gather(*(chat(n) for n in range(sockets)))


PROBE = """
import http.client, sys, time
conn = http.client.HTTPConnection("127.0.0.1", int(sys.argv[1]), timeout=10)
while True:
    started = time.perf_counter()
    try:
        conn.request("GET", "/healthz")
        status = conn.getresponse().read() and 200
        print(round((time.perf_counter() - started) * 1000, 2), flush=True)
    except Exception as e:
        print("error", type(e).__name__, flush=True)
        conn = http.client.HTTPConnection("127.0.0.1", int(sys.argv[1]), timeout=10)
    time.sleep(0.1)
"""


async def start_probe(port: int) -> asyncio.subprocess.Process:
    """``/healthz`` every 100 ms from a process of its own: the load generator's busy event loop
    must not be measured as the server's latency (started before the generator lowers its priority)."""
    return await asyncio.create_subprocess_exec(sys.executable, "-c", PROBE, str(port), stdout=asyncio.subprocess.PIPE)


async def probe_health(
    proc: asyncio.subprocess.Process, latencies: list[float], failures: Counter[str], stop: asyncio.Event
) -> None:
    """Collect what the probe process prints until ``stop``."""
    assert proc.stdout is not None
    try:
        while not stop.is_set():
            try:
                line = await asyncio.wait_for(proc.stdout.readline(), 0.5)
            except TimeoutError:
                continue
            text = line.decode().strip()
            if text.startswith("error"):
                failures[text.split()[-1]] += 1
            elif text:
                latencies.append(float(text))
    finally:
        proc.kill()
        await proc.wait()


def sample(pid: int, llm_port: int | None, samples: dict[str, list[float]], stop: asyncio.Event) -> asyncio.Task[None]:
    proc = psutil.Process(pid)

    async def run() -> None:
        while not stop.is_set():
            with contextlib.suppress(psutil.Error):
                samples["rss_mb"].append(proc.memory_info().rss / 2**20)
                if llm_port is not None:
                    conns = [c for c in proc.net_connections(kind="tcp") if c.raddr and c.raddr.port == llm_port]
                    samples["upstream"].append(len(conns))
            await asyncio.sleep(0.25)

    return asyncio.create_task(run())


def loop_lag(metrics_text: str) -> dict[str, Any]:
    buckets = [
        (float(m.group(1)) if m.group(1) != "+Inf" else float("inf"), float(m.group(2)))
        for m in re.finditer(r'rag_event_loop_lag_seconds_bucket\{le="([^"]+)"\} (\S+)', metrics_text)
    ]
    total = buckets[-1][1] if buckets else 0
    out: dict[str, Any] = {"samples": total}
    for q in (0.5, 0.99):
        bound = next((le for le, n in buckets if total and n >= q * total), None)
        out[f"p{int(q * 100)}_le_ms"] = None if bound is None else round(bound * 1000, 1)
    worst = re.search(r"^rag_event_loop_lag_max_seconds (\S+)$", metrics_text, re.M)
    out["recent_max_ms"] = round(float(worst.group(1)) * 1000, 1) if worst else None
    return out


async def run(args: argparse.Namespace) -> dict[str, Any]:
    data_dir = Path(args.data_dir).resolve()
    _base, during = prepare(data_dir, args.passages)
    llm_ok = False
    async with httpx.AsyncClient(timeout=3) as probe:
        with contextlib.suppress(httpx.HTTPError):
            llm_ok = (await probe.get(f"{args.llm_url}/v1/models")).status_code == 200
    llm_port = httpx.URL(args.llm_url).port
    with Server(data_dir, args.llm_url, {}) as server:
        url = server.url
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            baseline = []
            for i in range(args.baseline):
                started = time.perf_counter()
                r = await client.post("/v1/search", json={"query": QUESTIONS[i % len(QUESTIONS)], "k": 10})
                r.raise_for_status()
                baseline.append((time.perf_counter() - started) * 1000)
        assert server.proc is not None
        rss_cold = psutil.Process(server.proc.pid).memory_info().rss / 2**20
        # Warm-up, not measured: one answer of each transport and a burst of searches, so that the
        # one-time allocations (the tokenizer, the first streams, the inference sessions' arenas
        # for concurrent searches) are not counted as growth over the run; "cold" is kept too.
        warmup = Op("warmup")
        await search_load(url, 40, 8, warmup, time.monotonic() + 60)
        if llm_ok:
            await sse_asks(url, 1, warmup)
            await chats(url, 1, 1, warmup)
        rss_before = psutil.Process(server.proc.pid).memory_info().rss / 2**20
        stop = asyncio.Event()
        samples: dict[str, list[float]] = {"rss_mb": [], "upstream": []}
        sampler = sample(server.proc.pid, llm_port, samples, stop)
        health: list[float] = []
        health_failures: Counter[str] = Counter()
        prober = asyncio.create_task(probe_health(await start_probe(server.port), health, health_failures, stop))
        if args.client_nice:
            # The clients stand for other machines: on a shared 2-core box they must not take the CPU
            # the server under test would have (a starved client only makes latencies look worse).
            os.nice(args.client_nice)
        env = {**server.env}
        ingest = await asyncio.create_subprocess_exec(
            RAG,
            "ingest",
            str(during),
            "-c",
            f"load-ingest-{int(time.time())}",
            "--json",
            env=env,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        ops = {name: Op(name) for name in ("search", "sse_ask", "chat")}
        started = time.monotonic()
        stop_at = started + args.max_seconds
        work = [search_load(url, args.searches, args.search_concurrency, ops["search"], stop_at)]
        if llm_ok:
            work += [sse_asks(url, args.asks, ops["sse_ask"]), chats(url, args.chats, args.questions, ops["chat"])]
        await asyncio.wait_for(asyncio.gather(*work), args.max_seconds + 120)
        load_seconds = time.monotonic() - started
        async with httpx.AsyncClient(timeout=30) as scraper:
            metrics_text = (await scraper.get(f"{url}/metrics")).text
        stop.set()
        await asyncio.gather(prober, sampler)
        rss_after = psutil.Process(server.proc.pid).memory_info().rss / 2**20
        with contextlib.suppress(ProcessLookupError):
            ingest.terminate()
        await ingest.wait()
    concurrency = int(os.environ.get("RAG_API__MAX_CONCURRENT_ANSWERS", "4"))
    result = {
        "dataset": "faq-dev-small",
        "passages": args.passages,
        "client_nice": args.client_nice,
        "llm": args.llm_url if llm_ok else None,
        "machine": {"cpus": os.cpu_count(), "load_before": os.getloadavg(), "python": platform.python_version()},
        "seconds": round(load_seconds, 1),
        "unloaded_search_p50_ms": pct(baseline, 0.5),
        "operations": {name: op.summary() for name, op in ops.items()},
        "healthz": {
            "probes": len(health),
            "p50_ms": pct(health, 0.5),
            "p99_ms": pct(health, 0.99),
            "max_ms": round(max(health), 1) if health else None,
            "failures": dict(health_failures),
        },
        "loop_lag": loop_lag(metrics_text),
        "rss_mb": {
            "cold": round(rss_cold, 1),
            "before": round(rss_before, 1),
            "growth_pct": round((rss_after / rss_before - 1) * 100, 1),
            "after": round(rss_after, 1),
            "max": round(max(samples["rss_mb"]), 1) if samples["rss_mb"] else None,
        },
        "upstream_connections_max": max(samples["upstream"]) if samples["upstream"] else 0,
        "answer_concurrency": concurrency,
        "load_after": os.getloadavg(),
    }
    search = result["operations"]["search"]
    if search["p95_ms"] and result["unloaded_search_p50_ms"]:
        result["search_p95_over_unloaded_p50"] = round(search["p95_ms"] / result["unloaded_search_p50_ms"], 1)
    return result


def print_table(result: dict[str, Any]) -> None:
    print(
        f"load run: {result['seconds']} s, llm {'on' if result['llm'] else 'OFF (answers skipped)'}, "
        f"load {result['machine']['load_before'][0]:.1f} -> {result['load_after'][0]:.1f}"
    )
    print(f"{'operation':10} {'count':>6} {'p50':>8} {'p95':>8} {'p99':>8} {'ttft50':>8} {'ttft95':>8}  outcomes")
    for name, op in result["operations"].items():

        def f(v: Any) -> str:
            return "-" if v is None else f"{v:.0f}"

        print(
            f"{name:10} {op['count']:>6} {f(op['p50_ms']):>8} {f(op['p95_ms']):>8} {f(op['p99_ms']):>8} "
            f"{f(op['ttft_p50_ms']):>8} {f(op['ttft_p95_ms']):>8}  {op['outcomes']} "
            f"(refused within {op['refused_within_ms_max']} ms max)"
        )
    h = result["healthz"]
    print(
        f"/healthz: {h['probes']} probes, p50 {h['p50_ms']} ms, p99 {h['p99_ms']} ms, max {h['max_ms']} ms, "
        f"failures {h['failures']}"
    )
    print(f"event-loop lag: {result['loop_lag']}")
    print(
        f"search p95 / unloaded p50: {result.get('search_p95_over_unloaded_p50')} "
        f"(unloaded p50 {result['unloaded_search_p50_ms']} ms)"
    )
    print(
        f"RSS MB: {result['rss_mb']}; upstream connections max {result['upstream_connections_max']} "
        f"(answer concurrency {result['answer_concurrency']})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--llm-url", default=os.environ.get("RAG_LLM__BASE_URL", "http://127.0.0.1:8001"))
    parser.add_argument("--chats", type=int, default=50)
    parser.add_argument("--questions", type=int, default=2)
    parser.add_argument("--asks", type=int, default=20)
    parser.add_argument("--searches", type=int, default=600)
    parser.add_argument("--search-concurrency", type=int, default=200)
    parser.add_argument("--baseline", type=int, default=20)
    parser.add_argument("--passages", type=int, default=300)
    parser.add_argument("--data-dir", default=str(ROOT / "data" / "bench-load"))
    parser.add_argument("--max-seconds", type=float, default=900)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "load.json"))
    parser.add_argument(
        "--client-nice", type=int, default=5, help="niceness of the load-generating clients (0: same as the server)"
    )
    args = parser.parse_args()
    if shutil.which(RAG) is None and not Path(RAG).exists():
        sys.exit(f"{RAG} not found: run `make venv` first")
    result = asyncio.run(run(args))
    print_table(result)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
