"""Two throw-away PostgreSQL clusters as retrieval shards (``pg_createcluster``, Debian's tools).

The clusters use the machine's PostgreSQL binaries (pgvector installed by ``tools/install-pgvector``),
listen on free local ports with trust authentication, and are dropped when the session ends.
Without the tools the tests skip, unless ``CI`` is set: then they fail.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _major() -> str | None:
    root = Path("/usr/lib/postgresql")
    majors = sorted((p.name for p in root.iterdir() if p.name.isdigit()), key=int) if root.is_dir() else []
    return majors[-1] if majors else None


@pytest.fixture(scope="session")
def pg_shards() -> Iterator[list[str]]:
    """libpq connection strings of two empty shard databases (``rag_shard`` on two clusters)."""
    major = _major()
    if major is None or shutil.which("pg_createcluster") is None:
        reason = "pg_createcluster (postgresql-common) is not installed"
        if os.environ.get("CI"):
            pytest.fail(f"{reason} (CI is set, so shard tests must run)")
        pytest.skip(reason)
    names: list[str] = []
    dsns: list[str] = []
    try:
        for i in range(2):
            name = f"ragshard{i}_{uuid.uuid4().hex[:6]}"
            port = _free_port()
            subprocess.run(
                ["pg_createcluster", major, name, "--port", str(port), "--", "--auth=trust"],
                check=True,
                capture_output=True,
            )
            names.append(name)
            subprocess.run(
                ["pg_ctlcluster", "--skip-systemctl-redirect", major, name, "start"], check=True, capture_output=True
            )
            subprocess.run(
                ["psql", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "-q", "-c", "CREATE DATABASE rag_shard"],
                check=True,
                capture_output=True,
            )
            dsns.append(f"host=127.0.0.1 port={port} dbname=rag_shard user=postgres")
        yield dsns
    finally:
        for name in names:
            subprocess.run(["pg_dropcluster", "--stop", major, name], check=False, capture_output=True)
