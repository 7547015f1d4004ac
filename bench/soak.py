"""Soak: a steady, low request rate against a real ``rag serve`` for N minutes; does memory creep?

    .venv/bin/python bench/soak.py [--minutes 10] [--searches-per-second 5] [--ask-every 10]
        [--llm-url http://127.0.0.1:8001] [--passages 300] [--data-dir data/bench-load]
        [--out bench/results/soak.json]

Uses the data dir and server of ``bench/load.py``. Every 5 s it records the server's RSS; at the end
it reports the RSS at the start and the end, the least-squares slope in MiB per minute over the
second half of the run (the first half includes warm-up: caches and arenas filling), errors by kind
and search p50/p95 per minute. A leak shows as a slope that does not flatten.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from load import QUESTIONS, ROOT, Server, outcome_of, pct, prepare


def slope(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of (minutes, MiB)."""
    if len(points) < 3:
        return None
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return None if den == 0 else round(sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / den, 3)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    data_dir = Path(args.data_dir).resolve()
    prepare(data_dir, args.passages)
    async with httpx.AsyncClient(timeout=3) as probe:
        llm_ok = False
        with contextlib.suppress(httpx.HTTPError):
            llm_ok = (await probe.get(f"{args.llm_url}/v1/models")).status_code == 200
    outcomes: Counter[str] = Counter()
    per_minute: dict[int, list[float]] = {}
    rss: list[tuple[float, float]] = []
    with Server(data_dir, args.llm_url, {}) as server:
        assert server.proc is not None
        proc = psutil.Process(server.proc.pid)
        started = time.monotonic()
        end = started + args.minutes * 60
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:

            async def searches() -> None:
                i = 0
                while time.monotonic() < end:
                    t0 = time.perf_counter()
                    r = await client.post("/v1/search", json={"query": QUESTIONS[i % len(QUESTIONS)]})
                    kind = outcome_of(r.status_code)
                    outcomes[f"search_{kind}"] += 1
                    if kind == "ok":
                        minute = int((time.monotonic() - started) // 60)
                        per_minute.setdefault(minute, []).append((time.perf_counter() - t0) * 1000)
                    i += 1
                    await asyncio.sleep(max(0.0, 1 / args.searches_per_second - (time.perf_counter() - t0)))

            async def asks() -> None:
                i = 0
                while llm_ok and time.monotonic() < end:
                    r = await client.post("/v1/ask", json={"question": QUESTIONS[i % len(QUESTIONS)], "max_tokens": 32})
                    outcomes[f"ask_{outcome_of(r.status_code)}"] += 1
                    i += 1
                    await asyncio.sleep(args.ask_every)

            async def sampler() -> None:
                while time.monotonic() < end:
                    with contextlib.suppress(psutil.Error):
                        rss.append(((time.monotonic() - started) / 60, proc.memory_info().rss / 2**20))
                    await asyncio.sleep(5)

            await asyncio.gather(searches(), asks(), sampler())
    half = [p for p in rss if p[0] >= args.minutes / 2]
    return {
        "minutes": args.minutes,
        "searches_per_second": args.searches_per_second,
        "asks": llm_ok,
        "outcomes": dict(outcomes),
        "rss_mb": {
            "start": round(rss[0][1], 1) if rss else None,
            "end": round(rss[-1][1], 1) if rss else None,
            "max": round(max(p[1] for p in rss), 1) if rss else None,
            "slope_mb_per_min_second_half": slope(half),
        },
        "search_ms_per_minute": {
            str(m): {"p50": pct(v, 0.5), "p95": pct(v, 0.95), "n": len(v)} for m, v in sorted(per_minute.items())
        },
        "load": os.getloadavg(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--searches-per-second", type=float, default=5)
    parser.add_argument("--ask-every", type=float, default=10)
    parser.add_argument("--llm-url", default=os.environ.get("RAG_LLM__BASE_URL", "http://127.0.0.1:8001"))
    parser.add_argument("--passages", type=int, default=300)
    parser.add_argument("--data-dir", default=str(ROOT / "data" / "bench-load"))
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "soak.json"))
    args = parser.parse_args()
    result = asyncio.run(run(args))
    print(json.dumps(result, indent=2))
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
