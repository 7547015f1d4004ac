"""Watched folders: how soon a change is seen, and what watching costs while nothing changes.

For inotify (watchfiles' default) and polling (``force_polling``, the folder listed every 0.3 s),
over a folder of ``--files`` files: the time from writing a file to :func:`ingest.watch.changes`
yielding it (with the smallest debounce, so the watcher's own delay is what is measured), and the
CPU seconds the process spends per wall second while the folder is idle. Both modes run in the
same process, alternately. Writes a table and ``bench/results/watch.json``.

    .venv/bin/python bench/watch.py [--files 2000] [--changes 10] [--idle 5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

QUIET = 0.05


async def latency(folder: Path, *, polling: bool, changes: int) -> list[float]:
    """Seconds from each write to the watcher's yield."""
    from ingest.watch import changes as watch

    stop = asyncio.Event()
    seen: asyncio.Queue[float] = asyncio.Queue()

    async def consume() -> None:
        async for _burst in watch(folder, quiet=QUIET, longest=QUIET, force_polling=polling, stop=stop):
            seen.put_nowait(time.perf_counter())

    task = asyncio.create_task(consume())
    await asyncio.sleep(1.0)  # let the watcher start (and a poller take its first listing)
    out = []
    for i in range(changes):
        t0 = time.perf_counter()
        (folder / f"changed-{polling}-{i}.txt").write_text(f"change {i}", encoding="utf-8")
        t1 = await asyncio.wait_for(seen.get(), timeout=30)
        out.append(t1 - t0)
        await asyncio.sleep(0.4)
        while not seen.empty():
            seen.get_nowait()
    stop.set()
    await task
    return out


async def idle_cpu(folder: Path, *, polling: bool, seconds: float) -> float:
    """Process CPU seconds per wall second while watching a folder where nothing changes."""
    from ingest.watch import changes as watch

    stop = asyncio.Event()

    async def consume() -> None:
        async for _burst in watch(folder, quiet=QUIET, force_polling=polling, stop=stop):
            pass

    task = asyncio.create_task(consume())
    await asyncio.sleep(1.0)
    c0, t0 = time.process_time(), time.perf_counter()
    await asyncio.sleep(seconds)
    c1, t1 = time.process_time(), time.perf_counter()
    stop.set()
    await task
    return (c1 - c0) / (t1 - t0)


async def run(files: int, changes: int, idle: float) -> dict[str, object]:
    with tempfile.TemporaryDirectory(prefix="bench-watch-") as tmp:
        folder = Path(tmp) / "docs"
        for i in range(files):
            sub = folder / f"d{i % 20:02d}"
            sub.mkdir(parents=True, exist_ok=True)
            (sub / f"f{i:05d}.md").write_text(f"# File {i}\n\nText of file {i}.\n", encoding="utf-8")
        modes: dict[str, dict[str, float]] = {}
        load0 = os.getloadavg()[0]
        for name, polling in (("inotify", False), ("polling", True)):
            lat = await latency(folder, polling=polling, changes=changes)
            cpu = await idle_cpu(folder, polling=polling, seconds=idle)
            modes[name] = {
                "latency_ms_p50": round(statistics.median(lat) * 1000, 1),
                "latency_ms_max": round(max(lat) * 1000, 1),
                "idle_cpu_fraction": round(cpu, 4),
            }
        load1 = os.getloadavg()[0]
    return {
        "benchmark": "watch",
        "files": files,
        "changes": changes,
        "idle_seconds": idle,
        "modes": modes,
        "note": "latency: write -> watcher yield with a 50 ms debounce; the configured debounce "
        "(RAG_INGEST__WATCH_DEBOUNCE_SECONDS, 1 s) comes on top",
        "load_average_before_after": [round(load0, 2), round(load1, 2)],
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=2000)
    parser.add_argument("--changes", type=int, default=10)
    parser.add_argument("--idle", type=float, default=5.0, help="Seconds of idle watching per mode.")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "watch.json")
    args = parser.parse_args()
    result = asyncio.run(run(args.files, args.changes, args.idle))

    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"watching a folder of {args.files} files")
    for col in ("mode", "latency p50 ms", "latency max ms", "idle CPU (fraction of a core)"):
        table.add_column(col, justify="left" if col == "mode" else "right")
    modes = result["modes"]
    assert isinstance(modes, dict)
    for name, m in modes.items():
        table.add_row(name, str(m["latency_ms_p50"]), str(m["latency_ms_max"]), str(m["idle_cpu_fraction"]))
    Console().print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
