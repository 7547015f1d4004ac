"""How much the ``rag`` CLI adds to the API's own latency when it talks to a running API.

Against an API that is already up (``make run``, or ``rag serve`` with a model server), for each
command it times, N times each, alternating:

* the API alone: the same request over HTTP from this process (``POST /v1/search``, and
  ``POST /v1/ask`` — the whole answer, as ``rag ask`` waits for it);
* the CLI: ``rag search ... --json`` / ``rag ask ... --json`` as a subprocess, wall time from
  spawn to exit (interpreter start, imports, the probe, the request, printing).

The overhead is CLI minus API (medians); the issue's target is under 0.5 s. ``python -c pass``
and ``rag --help`` are timed too, to show what interpreter start and imports cost alone on this
machine (2 cores shared with other work make every number noisy: compare medians).

    .venv/bin/python bench/cli_latency.py --collection manuals [--api http://127.0.0.1:8000] [-n 7]
        [--question "How do I join paths?"] [--query "join paths"] [--out bench/results/cli_latency.json]

Prints a table; writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
RAG = str(Path(sys.executable).with_name("rag"))


def timed_subprocess(args: list[str], env: dict[str, str]) -> float:
    started = time.perf_counter()
    proc = subprocess.run(args, env=env, capture_output=True, check=False)
    elapsed = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed ({proc.returncode}): {proc.stderr.decode()[-500:]}")
    return elapsed


def timed_http(client: httpx.Client, path: str, body: dict[str, Any]) -> float:
    started = time.perf_counter()
    resp = client.post(path, json=body)
    elapsed = time.perf_counter() - started
    resp.raise_for_status()
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--api", default="http://127.0.0.1:8000")
    parser.add_argument("--collection", "-c", required=True)
    parser.add_argument("--query", default="join paths")
    parser.add_argument("--question", default="How do I join paths?")
    parser.add_argument("--max-tokens", type=int, default=32, help="Answer length (the same for API and CLI).")
    parser.add_argument("-n", type=int, default=7, help="Repetitions of each measurement.")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "cli_latency.json")
    args = parser.parse_args()

    host_port = args.api.removeprefix("http://").rsplit(":", 1)
    env = {**os.environ, "RAG_SERVER__HOST": host_port[0], "RAG_SERVER__PORT": host_port[1]}
    client = httpx.Client(base_url=args.api, timeout=600, trust_env=False)
    client.get("/readyz").raise_for_status()

    search_body = {"query": args.query, "k": 10, "collections": args.collection}
    ask_body = {"question": args.question, "collections": args.collection, "max_tokens": args.max_tokens}
    commands: dict[str, tuple[list[str], str | None, dict[str, Any] | None]] = {
        "python -c pass": ([sys.executable, "-c", "pass"], None, None),
        "rag --help": ([RAG, "--help"], None, None),
        "rag search": ([RAG, "search", args.query, "-c", args.collection, "--json"], "/v1/search", search_body),
        "rag ask": (
            [RAG, "ask", args.question, "-c", args.collection, "--max-tokens", str(args.max_tokens), "--json"],
            "/v1/ask",
            ask_body,
        ),
    }
    rows: list[dict[str, Any]] = []
    for name, (argv, path, body) in commands.items():
        cli: list[float] = []
        api: list[float] = []
        # Warm-up: the first answer fills caches (prefix cache, page cache) for both paths alike.
        if path is not None and body is not None:
            timed_http(client, path, body)
        for _ in range(args.n):
            if path is not None and body is not None:
                api.append(timed_http(client, path, body))
            cli.append(timed_subprocess(argv, env))
        row: dict[str, Any] = {"command": name, "n": args.n, "cli_median_s": round(statistics.median(cli), 3)}
        row["cli_runs_s"] = [round(x, 3) for x in cli]
        if api:
            row["api_median_s"] = round(statistics.median(api), 3)
            row["api_runs_s"] = [round(x, 3) for x in api]
            row["overhead_s"] = round(row["cli_median_s"] - row["api_median_s"], 3)
        rows.append(row)
        print(f"measured {name}", file=sys.stderr)

    print(f"\n{'command':<16} {'API median s':>13} {'CLI median s':>13} {'overhead s':>11}")
    for r in rows:
        api_s = f"{r['api_median_s']:.3f}" if "api_median_s" in r else "-"
        over = f"{r['overhead_s']:.3f}" if "overhead_s" in r else "-"
        print(f"{r['command']:<16} {api_s:>13} {r['cli_median_s']:>13.3f} {over:>11}")
    result = {
        "bench": "cli_latency",
        "api": args.api,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "load": os.getloadavg()},
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"\nwritten: {args.out}")


if __name__ == "__main__":
    main()
