"""Time to first token and tokens/s: `rag ask`'s path vs the raw model server, same prompts.

For each question the service path runs `generation.rag.answer` (hybrid retrieval over a small
ingested corpus, context fitting with the server's tokenizer, streamed completion, citation
parsing). A recording wrapper captures the exact prompt and sampling parameters it sent; the same
request is then replayed straight to the server's `/v1/completions` with httpx. Both are timed in
the same run, alternately, so the difference is the service's overhead; the retrieval share of
the service's TTFT is reported too. The server this script starts has prefix caching off, or the
replay would reuse the prefill of the service's identical prompt; with ``--base-url`` make sure
the server has it off too.

    .venv/bin/python bench/generation.py [--base-url URL --model NAME] [--questions 6] [--max-tokens 64]

Without --base-url the embedded vLLM CPU server is started (needs .venv-llm; `make llm`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

QUESTIONS = [
    "At what temperature does the zorblax reactor run?",
    "Which port does the quokka daemon listen on?",
    "What is the capital of Veldoria?",
    "How fast does the ZX-9 coolant pump turn?",
    "At what pressure does the ZX-9 emergency valve open?",
    "Where does quokka store its logs on Windows?",
    "How often should the ZX-9 quantum gasket be inspected?",
    "What track gauge do Veldorian trains use?",
]


class Recorder:
    """An LLMClient proxy that remembers the prompts and parameters of its streamed completions."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.calls: list[tuple[str, Any]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def stream(self, prompt: str, params: Any) -> AsyncIterator[Any]:
        self.calls.append((prompt, params))
        result: AsyncIterator[Any] = self._inner.stream(prompt, params)
        return result


async def raw_stream(base_url: str, model: str, prompt: str, params: Any) -> tuple[float, int, float]:
    """Replay one completion directly; returns (ttft_ms, completion tokens, total_ms)."""
    import httpx

    body: dict[str, Any] = {
        "model": model,
        "prompt": prompt,
        "max_tokens": params.max_tokens,
        "temperature": params.temperature,
        "top_p": params.top_p,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if params.repetition_penalty is not None:
        body["repetition_penalty"] = params.repetition_penalty
    if params.stop:
        body["stop"] = list(params.stop)
    started = time.perf_counter()
    ttft = None
    tokens = 0
    async with (
        httpx.AsyncClient(timeout=120) as client,
        client.stream("POST", f"{base_url}/v1/completions", json=body) as response,
    ):
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("choices") and chunk["choices"][0].get("text") and ttft is None:
                ttft = (time.perf_counter() - started) * 1000
            if chunk.get("usage"):
                tokens = chunk["usage"].get("completion_tokens", tokens)
    total = (time.perf_counter() - started) * 1000
    return ttft or total, tokens, total


def pct(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def run(base_url: str, model: str, questions: int, max_tokens: int) -> dict[str, Any]:
    from core.settings import Settings
    from core.wiring import generation_params
    from generation.backends.openai_compat import OpenAICompatClient
    from generation.rag import answer
    from generation.types import DoneEvent, ErrorEvent, TokenEvent
    from ingest.worker import build_ingest_context, enqueue_path, run_job
    from retrieval.hybrid import HybridRetriever
    from tests.corpus_factory import write_corpus

    with tempfile.TemporaryDirectory(prefix="bench-gen-") as tmp:
        corpus = write_corpus(Path(tmp) / "corpus")
        settings = Settings(data_dir=Path(tmp) / "data", llm={"base_url": base_url, "model": model})
        ctx = await build_ingest_context(settings)
        job_id, _ = await enqueue_path(ctx.sessionmaker, corpus.root, collection="bench")
        await run_job(ctx, job_id)
        # Queries as the API embeds them (RAG_EMBEDDING__QUERY_BACKEND=onnx), the BM25 leg beside them.
        ctx.embedder.use_onnx_queries(settings.data_dir / "models" / "onnx")
        legs = ThreadPoolExecutor(max_workers=2, thread_name_prefix="bm25")
        retriever = HybridRetriever(ctx.store, ctx.embedder, leg_executor=legs)
        llm = Recorder(OpenAICompatClient(base_url, model))
        params = generation_params(settings, max_tokens=max_tokens)
        rows: list[dict[str, float]] = []
        # Warm-up: load caches on both paths (prefix cache, tokenizer cache, embedding model).
        async for _ in answer(QUESTIONS[0], retriever=retriever, llm=llm, params=params):  # type: ignore[arg-type]
            pass
        for q in (QUESTIONS * 4)[:questions]:
            llm.calls.clear()
            started = time.perf_counter()
            first = None
            done = None
            async for event in answer(q, retriever=retriever, llm=llm, params=params):  # type: ignore[arg-type]
                if isinstance(event, TokenEvent) and first is None:
                    first = (time.perf_counter() - started) * 1000
                if isinstance(event, ErrorEvent):
                    raise RuntimeError(event.message)
                if isinstance(event, DoneEvent):
                    done = event
            total = (time.perf_counter() - started) * 1000
            assert done is not None and llm.calls
            prompt, sent = llm.calls[-1]
            raw_ttft, raw_tokens, raw_total = await raw_stream(base_url, model, prompt, sent)
            svc_tokens = done.usage.completion_tokens
            rows.append(
                {
                    "service_ttft_ms": first or total,
                    "service_tok_s": svc_tokens / max((total - (first or total)) / 1000, 1e-6),
                    "service_total_ms": total,
                    "retrieval_ms": done.timings.get("retrieval_ms", 0.0),
                    "prompt_ms": done.timings.get("prompt_ms", 0.0),
                    "service_tokens": svc_tokens,
                    "raw_ttft_ms": raw_ttft,
                    "raw_tok_s": raw_tokens / max((raw_total - raw_ttft) / 1000, 1e-6),
                    "raw_tokens": raw_tokens,
                    "raw_total_ms": raw_total,
                }
            )
        await llm.aclose()
        await ctx.aclose()
        legs.shutdown(wait=False)

    def summary(key: str) -> dict[str, float]:
        values = [r[key] for r in rows]
        return {"p50": round(statistics.median(values), 1), "p95": round(pct(values, 0.95), 1)}

    keys = rows[0].keys()
    stats = {k: summary(k) for k in keys}
    return {
        "benchmark": "generation",
        "base_url": base_url,
        "model": model,
        "questions": len(rows),
        "max_tokens": max_tokens,
        "stats": stats,
        "service_overhead_ttft_ms_p50": round(stats["service_ttft_ms"]["p50"] - stats["raw_ttft_ms"]["p50"], 1),
        "retrieval_share_of_ttft_p50": round(stats["retrieval_ms"]["p50"] / stats["service_ttft_ms"]["p50"], 3),
        "rows": rows,
        "load_average": os.getloadavg(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-url", default=None)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--questions", type=int, default=6)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "generation.json")
    args = parser.parse_args()

    server = None
    base_url = args.base_url
    if base_url is None:
        from serving.launcher import (
            ManagedServer,
            default_model_dir,
            find_free_port,
            find_packaged_gguf,
            llm_python,
            prepare_command,
            serve_command,
            serve_env,
        )

        venv = ROOT / ".venv-llm"
        python = llm_python(venv)
        model_dir = default_model_dir(ROOT / "data")
        import subprocess

        subprocess.run(
            prepare_command(python, find_packaged_gguf(venv), model_dir), check=True, stdout=subprocess.DEVNULL
        )
        port = find_free_port()
        server = ManagedServer(
            # No prefix caching: the replay sends the service's prompt a second time and would
            # otherwise skip the prefill the service paid for (a 4-8x smaller raw TTFT, measured).
            serve_command(
                model_dir, args.model, "127.0.0.1", port, python=python, extra_args=("--no-enable-prefix-caching",)
            ),
            host="127.0.0.1",
            port=port,
            env=serve_env(kv_cache_gib=1),
            expected_model=args.model,
            startup_timeout=600,
        )
        server.start()
        base_url = server.base_url
    try:
        result = asyncio.run(run(base_url, args.model, args.questions, args.max_tokens))
    finally:
        if server is not None:
            server.stop()

    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"generation · {result['questions']} questions · max_tokens {result['max_tokens']}")
    table.add_column("measure")
    table.add_column("p50", justify="right")
    table.add_column("p95", justify="right")
    for key, value in result["stats"].items():
        table.add_row(key, str(value["p50"]), str(value["p95"]))
    console = Console()
    console.print(table)
    console.print(
        f"service TTFT overhead (p50): {result['service_overhead_ttft_ms_p50']} ms; "
        f"retrieval share of service TTFT: {result['retrieval_share_of_ttft_p50']:.0%}"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
