"""FLARE with and without vLLM's automatic prefix caching: time per question on the same answers.

Start two servers on the same checkpoint, one with prefix caching (vLLM's default) and one
without, e.g.::

    .venv/bin/rag llm serve --port 8011 --no-prepare &
    .venv/bin/rag llm serve --port 8012 --no-prepare -- --no-enable-prefix-caching &

then::

    RAG_DATA_DIR=/tmp/x/data .venv/bin/python bench/flare_prefix_cache.py \\
        --dataset ../shared/eval/faq-dev-small --cached http://127.0.0.1:8011 \\
        --uncached http://127.0.0.1:8012 --questions 10

Two measurements, alternating which server goes first for each question so both see the same
machine load:

``answers`` (end to end)
    Each question is answered in ``flare`` mode (greedy) once per server. Caching changes the
    numerics slightly (cached and freshly computed prefixes take different kernels), and with a
    small model whose top tokens are near ties and a θ near the bulk of its probabilities, the
    answers (and so the number of retrievals) can differ: the report says how many are identical.

``replay`` (same work)
    The next ``--questions`` questions (ones the first measurement did not touch, so no prompt of
    theirs is already cached) are each answered once on the uncached server through a recording
    client; then the exact request sequence of that answer (same prompts, same log-probabilities,
    as many tokens as were read) is replayed on both servers. This is the clean comparison:
    identical requests, only prefix caching differs.

Prints a table and writes ``bench/results/flare_prefix_cache.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


async def run(args: argparse.Namespace) -> dict[str, Any]:
    from core.settings import Settings
    from core.wiring import answer_defaults, build_llm_client, flare_defaults, generation_params
    from evaluation.answers import load_items, open_scratch_collection
    from evaluation.beir import load_dataset
    from generation.rag import answer
    from generation.types import DoneEvent, ErrorEvent
    from retrieval.types import SearchFilters

    base = Settings()
    dataset = load_dataset(Path(args.dataset))
    items = load_items(dataset, args.questions)
    scratch = await open_scratch_collection(base, dataset, log=print)
    servers = {"cached": args.cached, "uncached": args.uncached}
    clients = {
        name: build_llm_client(base.model_copy(update={"llm": base.llm.model_copy(update={"base_url": url})}))
        for name, url in servers.items()
    }
    flare = flare_defaults(base)
    if args.theta is not None:
        flare = replace(flare, theta=args.theta)
    kwargs = answer_defaults(base).kwargs() | {"flare": flare}
    params = generation_params(base, max_tokens=args.max_tokens)
    filters = SearchFilters(collections=(scratch.collection,))
    rows: dict[str, list[dict[str, Any]]] = {name: [] for name in servers}
    try:
        for index, item in enumerate(items):
            order = list(servers) if index % 2 == 0 else list(reversed(servers))
            for name in order:
                started = time.perf_counter()
                done: Any = None
                async for event in answer(
                    item.question,
                    retriever=scratch.retriever,
                    llm=clients[name],
                    mode="flare",
                    params=params,
                    filters=filters,
                    **kwargs,
                ):
                    if isinstance(event, DoneEvent):
                        done = event
                    elif isinstance(event, ErrorEvent):
                        raise RuntimeError(f"{name}: {event.code}: {event.message}")
                seconds = time.perf_counter() - started
                rows[name].append(
                    {
                        "qid": item.qid,
                        "seconds": round(seconds, 3),
                        "answer": done.answer,
                        "retrievals": len(done.retrievals),
                        "prompt_tokens": done.usage.prompt_tokens,
                        "completion_tokens": done.usage.completion_tokens,
                    }
                )
                print(f"{item.qid} {name:9s} {seconds:6.1f}s retrievals={len(done.retrievals)}", flush=True)
    finally:
        for client in clients.values():
            await client.aclose()
        await scratch.aclose()

    def summary(name: str) -> dict[str, float]:
        secs = [r["seconds"] for r in rows[name]]
        return {
            "mean_s": round(statistics.fmean(secs), 2),
            "median_s": round(statistics.median(secs), 2),
            "total_s": round(sum(secs), 1),
            "prompt_tokens_mean": round(statistics.fmean(r["prompt_tokens"] for r in rows[name]), 1),
            "retrievals_mean": round(statistics.fmean(r["retrievals"] for r in rows[name]), 2),
        }

    same = sum(1 for a, b in zip(rows["cached"], rows["uncached"], strict=True) if a["answer"] == b["answer"])
    result = {
        "questions": len(items),
        "flare": flare.to_dict(),
        "max_tokens": params.max_tokens,
        "load_average": os.getloadavg(),
        "cached": summary("cached"),
        "uncached": summary("uncached"),
        "identical_answers": same,
        "speedup_mean": round(summary("uncached")["mean_s"] / summary("cached")["mean_s"], 3),
        "speedup_median": round(summary("uncached")["median_s"] / summary("cached")["median_s"], 3),
        "rows": rows,
    }
    return result


class RecordingClient:
    """Wraps an LLM client; records every request and how many tokens were read from it."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.requests: list[tuple[str, Any, int]] = []

    @property
    def model(self) -> str:
        return str(self.inner.model)

    @property
    def supports_logprobs(self) -> bool:
        return bool(self.inner.supports_logprobs)

    async def stream(self, prompt: str, params: Any) -> Any:
        read = 0
        try:
            async for delta in self.inner.stream(prompt, params):
                read += max(len(delta.tokens), 1 if delta.text else 0)
                yield delta
        finally:
            self.requests.append((prompt, params, read))

    async def complete(self, prompt: str, params: Any) -> Any:
        completion = await self.inner.complete(prompt, params)
        self.requests.append((prompt, params, max(len(completion.tokens), 1)))
        return completion

    async def count_tokens(self, text: str) -> int:
        return int(await self.inner.count_tokens(text))

    async def tokenize(self, text: str) -> list[int]:
        return list(await self.inner.tokenize(text))

    async def aclose(self) -> None:
        await self.inner.aclose()


async def replay(args: argparse.Namespace) -> dict[str, Any]:
    from core.settings import Settings
    from core.wiring import answer_defaults, build_llm_client, flare_defaults, generation_params
    from evaluation.answers import load_items, open_scratch_collection
    from evaluation.beir import load_dataset
    from generation.rag import answer
    from retrieval.types import SearchFilters

    base = Settings()
    dataset = load_dataset(Path(args.dataset))
    # Questions the ``answers`` measurement did not use: their prompts are in neither server's cache.
    items = load_items(dataset, 2 * args.questions)[args.questions :]
    scratch = await open_scratch_collection(base, dataset, log=print)
    servers = {"cached": args.cached, "uncached": args.uncached}
    clients = {
        name: build_llm_client(base.model_copy(update={"llm": base.llm.model_copy(update={"base_url": url})}))
        for name, url in servers.items()
    }
    flare = flare_defaults(base)
    if args.theta is not None:
        flare = replace(flare, theta=args.theta)
    kwargs = answer_defaults(base).kwargs() | {"flare": flare}
    params = generation_params(base, max_tokens=args.max_tokens)
    filters = SearchFilters(collections=(scratch.collection,))
    rows: dict[str, list[dict[str, Any]]] = {name: [] for name in servers}
    try:
        for index, item in enumerate(items):
            recorder = RecordingClient(clients["uncached"])
            async for _ in answer(
                item.question,
                retriever=scratch.retriever,
                llm=recorder,
                mode="flare",
                params=params,
                filters=filters,
                **kwargs,
            ):
                pass
            order = list(servers) if index % 2 == 0 else list(reversed(servers))
            for name in order:
                started = time.perf_counter()
                for prompt, request, read in recorder.requests:
                    await clients[name].complete(prompt, replace(request, max_tokens=max(read, 1)))
                seconds = time.perf_counter() - started
                rows[name].append(
                    {
                        "qid": item.qid,
                        "seconds": round(seconds, 3),
                        "requests": len(recorder.requests),
                        "tokens": sum(r[2] for r in recorder.requests),
                    }
                )
                print(f"{item.qid} replay {name:9s} {seconds:6.1f}s requests={len(recorder.requests)}", flush=True)
    finally:
        for client in clients.values():
            await client.aclose()
        await scratch.aclose()
    summary = {
        name: {
            "mean_s": round(statistics.fmean(r["seconds"] for r in rows[name]), 2),
            "median_s": round(statistics.median(r["seconds"] for r in rows[name]), 2),
            "total_s": round(sum(r["seconds"] for r in rows[name]), 1),
            "requests_mean": round(statistics.fmean(r["requests"] for r in rows[name]), 2),
        }
        for name in servers
    }
    return {
        "questions": len(items),
        "flare": flare.to_dict(),
        "max_tokens": params.max_tokens,
        "load_average": os.getloadavg(),
        **summary,
        "speedup_mean": round(summary["uncached"]["mean_s"] / summary["cached"]["mean_s"], 3),
        "speedup_median": round(summary["uncached"]["median_s"] / summary["cached"]["median_s"], 3),
        "rows": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default=str(ROOT.parent / "shared" / "eval" / "faq-dev-small"))
    parser.add_argument("--cached", default="http://127.0.0.1:8011")
    parser.add_argument("--uncached", default="http://127.0.0.1:8012")
    parser.add_argument("--questions", type=int, default=10)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--theta", type=float, default=None)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "flare_prefix_cache.json"))
    parser.add_argument("--skip-answers", action="store_true", help="Only the replay measurement.")
    args = parser.parse_args()
    out = Path(args.out)
    result = json.loads(out.read_text()) if args.skip_answers and out.is_file() else asyncio.run(run(args))
    result["replay"] = asyncio.run(replay(args))
    print()
    print(f"{'server':10s} {'mean s':>8s} {'median s':>9s} {'prompt tok':>11s} {'retrievals':>11s}")
    for name in ("cached", "uncached"):
        s = result[name]
        tokens, rounds = s["prompt_tokens_mean"], s["retrievals_mean"]
        print(f"{name:10s} {s['mean_s']:8.2f} {s['median_s']:9.2f} {tokens:11.0f} {rounds:11.2f}")
    print(
        f"speed-up from prefix caching: {result['speedup_mean']:.2f}x mean, {result['speedup_median']:.2f}x median; "
        f"identical answers {result['identical_answers']}/{result['questions']}"
    )
    rep = result["replay"]
    print(
        f"replay of identical request sequences: cached {rep['cached']['mean_s']:.2f}s, "
        f"uncached {rep['uncached']['mean_s']:.2f}s per question; speed-up {rep['speedup_mean']:.2f}x mean, "
        f"{rep['speedup_median']:.2f}x median"
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
