"""Service latency: ``POST /v1/search`` p50/p95 over a real uvicorn server, and time to first token of
``POST /v1/ask/stream`` vs ``rag ask`` vs the raw model server.

Ingests the markdown part of ``../shared/corpus`` (64 Node.js API docs) into a fresh data dir with the
packaged embedding model, serves it with uvicorn on a free port (query embedding on one torch thread,
as ``rag serve`` does), then

* sends N searches (default 50, a fixed rotation of questions) and reports p50/p95 client latency and
  the server's own ``took_ms``;
* with a model server (``--llm-url``, e.g. ``rag llm serve``'s ``http://127.0.0.1:8001``): for the same
  questions, the client-side time to the first ``token`` event of ``/v1/ask/stream``, the ``ttft_ms`` the
  answer reports, ``rag ask --json``'s ``ttft_ms`` (same code path, no HTTP), and the raw server's time
  to first token for a prompt of the same sources and question sent straight to ``/v1/completions``.

Machine load is recorded with the numbers: compare ratios from one run, not absolute values across runs.

    .venv/bin/python bench/service.py [--llm-url URL] [--model NAME] [--requests 50] [--data-dir DIR]
                                      [--out bench/results/service.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

CORPUS = ROOT.parent / "shared" / "corpus" / "md"
QUESTIONS = [
    "How do I read a file line by line?",
    "How can I create an HTTP server?",
    "What does process.nextTick do?",
    "How do I spawn a child process and read its output?",
    "How are streams paused and resumed?",
    "How do I resolve a hostname to an IP address?",
    "What is the difference between Buffer.alloc and Buffer.allocUnsafe?",
    "How do I run code in a worker thread?",
]


def ms(seconds: float) -> float:
    return round(seconds * 1000.0, 1)


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


class LiveServer:
    def __init__(self, app: Any) -> None:
        import uvicorn

        from serving.launcher import find_free_port

        self.port = find_free_port("127.0.0.1")
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        while not self.server.started:
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


async def ingest(settings: Any) -> dict[str, Any]:
    """Ingest (incrementally: a reused ``--data-dir`` only re-hashes) the markdown corpus."""
    from ingest.worker import build_ingest_context, enqueue_path, run_job

    folder = settings.data_dir / "corpus-md"
    folder.mkdir(parents=True, exist_ok=True)
    for path in sorted(CORPUS.glob("*.md")):
        target = folder / path.name
        if not target.exists():
            target.write_bytes(path.read_bytes())
    ctx = await build_ingest_context(settings)
    try:
        job_id, _ = await enqueue_path(ctx.sessionmaker, folder, collection="nodejs")
        summary = await run_job(ctx, job_id)
        assert summary is not None
        return summary.as_json()
    finally:
        await ctx.aclose()


async def first_token(client: Any, question: str) -> tuple[float, float]:
    """(client-side seconds to the first token event, the answer's own ttft_ms)."""
    started = time.perf_counter()
    first: float | None = None
    reported = float("nan")
    body = {"question": question, "collection": "nodejs", "max_tokens": 32}
    async with client.stream("POST", "/v1/ask/stream", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            event = json.loads(line[6:])
            if event["type"] == "token" and first is None:
                first = time.perf_counter() - started
            elif event["type"] == "done":
                reported = event["timings"]["ttft_ms"]
            elif event["type"] == "error":
                raise RuntimeError(event)
    assert first is not None
    return first, reported


async def raw_first_token(llm_url: str, model: str, prompt: str) -> float:
    import httpx

    body = {"model": model, "prompt": prompt, "max_tokens": 32, "stream": True, "temperature": 0.0}
    async with httpx.AsyncClient(timeout=300) as client:
        started = time.perf_counter()
        async with client.stream("POST", f"{llm_url}/v1/completions", json=body) as r:
            async for line in r.aiter_lines():
                if line.startswith("data: ") and line[6:].strip() != "[DONE]":
                    chunk = json.loads(line[6:])
                    if chunk.get("choices") and chunk["choices"][0].get("text"):
                        return time.perf_counter() - started
    raise RuntimeError("no token")


def rag_prompt(question: str, hits: list[dict[str, Any]]) -> str:
    """A prompt with the same sources and question as the service builds (ChatML)."""
    from generation.prompts import SYSTEM_PROMPT

    sources = "\n\n".join(f"[{i}] {h['title'] or ''} ({h['path']})\n{h['text']}" for i, h in enumerate(hits, 1))
    return (
        f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\nSources:\n\n{sources}\n\n"
        f"Question: {question}<|im_end|>\n<|im_start|>assistant\n"
    )


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    import httpx

    from app.main import create_app
    from core.settings import Settings

    data = args.data_dir or Path(tempfile.mkdtemp(prefix="bench-service-"))
    llm = {"base_url": args.llm_url, "model": args.model} if args.llm_url else {}
    settings = Settings(data_dir=data, llm=llm)
    started = time.perf_counter()
    summary = await ingest(settings)
    assert summary["chunks"]["total"] > 0, summary
    result: dict[str, Any] = {
        "corpus": f"{len(list(CORPUS.glob('*.md')))} markdown files, {summary['chunks']['total']} chunks",
        "data_dir": data.name,  # a name, never a path of this machine
        "ingest_seconds": round(time.perf_counter() - started, 1),
        "load_before": os.getloadavg(),
    }
    with LiveServer(create_app(settings)) as server:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}", timeout=300) as client:
            await client.post("/v1/search", json={"query": "warm up"})
            latencies, took = [], []
            for i in range(args.requests):
                t = time.perf_counter()
                r = await client.post("/v1/search", json={"query": QUESTIONS[i % len(QUESTIONS)], "k": 10})
                latencies.append(time.perf_counter() - t)
                assert r.status_code == 200 and r.json()["hits"], r.text
                took.append(r.json()["took_ms"])
            result["search"] = {
                "requests": args.requests,
                "p50_ms": ms(statistics.median(latencies)),
                "p95_ms": ms(quantile(latencies, 0.95)),
                "server_took_p50_ms": round(statistics.median(took), 1),
            }
            if args.llm_url:
                api_first, api_reported, raw, cli = [], [], [], []
                for question in QUESTIONS[: args.answers]:
                    hits = (await client.post("/v1/search", json={"query": question, "k": 5})).json()["hits"]
                    raw.append(await raw_first_token(args.llm_url, args.model, rag_prompt(question, hits)))
                    f, rep = await first_token(client, question)
                    api_first.append(f)
                    api_reported.append(rep)
                    cli.append(rag_ask_ttft(settings, question))
                result["ttft"] = {
                    "answers": len(api_first),
                    "ask_stream_client_first_token_p50_ms": ms(statistics.median(api_first)),
                    "ask_stream_reported_ttft_p50_ms": round(statistics.median(api_reported), 1),
                    "rag_ask_reported_ttft_p50_ms": round(statistics.median(cli), 1),
                    "raw_model_server_same_prompt_p50_ms": ms(statistics.median(raw)),
                }
    result["load_after"] = os.getloadavg()
    return result


def rag_ask_ttft(settings: Any, question: str) -> float:
    """``rag ask --json``'s ttft_ms (measured from the start of the answer, after model loading)."""
    env = {
        **os.environ,
        "RAG_DATA_DIR": str(settings.data_dir),
        "RAG_LLM__BASE_URL": settings.llm.base_url,
        "RAG_LLM__MODEL": settings.llm.model,
    }
    rag = str(Path(sys.executable).with_name("rag"))
    out = subprocess.run(
        [rag, "ask", question, "-c", "nodejs", "--max-tokens", "32", "--json"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
    )
    return float(json.loads(out.stdout)["timings"]["ttft_ms"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--llm-url", default=None, help="OpenAI-compatible model server (root, without /v1)")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--requests", type=int, default=50)
    parser.add_argument("--answers", type=int, default=5)
    parser.add_argument("--data-dir", type=Path, default=None, help="reuse (ingest incrementally into) this data dir")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "service.json")
    args = parser.parse_args()
    result = asyncio.run(measure(args))
    print(f"{'measure':45} value")
    for section in ("search", "ttft"):
        for key, value in result.get(section, {}).items():
            print(f"{section + '.' + key:45} {value}")
    print(f"{'load (1/5/15 min) before':45} {result['load_before']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
