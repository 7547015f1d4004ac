"""``rag search`` and ``rag eval retrieval`` as a user runs them (subprocesses, real model)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration]

RAG = str(Path(sys.executable).with_name("rag"))

PASSAGES = {
    "p1": "To undo the last git commit but keep the changes, run git reset --soft HEAD~1.",
    "p2": "Python strings are immutable so that they can be used as dictionary keys and hashed once.",
    "p3": "The Debian package manager apt resolves dependencies; use apt-get install to add a package.",
    "p4": "In R, the apply family (lapply, sapply, vapply) applies a function over a list or vector.",
    "p5": "Node.js streams emit 'data' events; pipe() connects a readable stream to a writable one.",
    "p6": "Floating point numbers are stored in binary, so 0.1 cannot be represented exactly.",
    "p7": "The Perl function chomp removes a trailing newline from a string.",
    "p8": "Use 'dpkg -L package' to list the files that a Debian package installed.",
}
QUERIES = {
    "q1": ("How do I undo my last commit in git?", "p1"),
    "q2": ("Why are strings immutable in Python?", "p2"),
    "q3": ("How can I see which files a Debian package installed?", "p8"),
    "q4": ("Why is 0.1 not exact with floats?", "p6"),
    "q5": ("How to remove the newline at the end of a string in Perl?", "p7"),
}


def write_beir(root: Path) -> Path:
    (root / "qrels").mkdir(parents=True)
    with (root / "corpus.jsonl").open("w") as fh:
        for pid, text in PASSAGES.items():
            fh.write(json.dumps({"_id": pid, "title": "", "text": text}) + "\n")
    with (root / "queries.jsonl").open("w") as fh:
        for qid, (text, _) in QUERIES.items():
            fh.write(json.dumps({"_id": qid, "text": text}) + "\n")
    with (root / "qrels" / "test.tsv").open("w") as fh:
        fh.write("query-id\tcorpus-id\tscore\n")
        for qid, (_, pid) in QUERIES.items():
            fh.write(f"{qid}\t{pid}\t1\n")
    return root


def run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([RAG, *args], env=env, capture_output=True, text=True, timeout=300, check=False)


def test_eval_retrieval_and_search_json(tmp_path: Path) -> None:
    dataset = write_beir(tmp_path / "tiny")
    env = {**os.environ, "RAG_DATA_DIR": str(tmp_path / "data"), "HF_HUB_OFFLINE": "1"}

    result = run(env, "eval", "retrieval", "--dataset", str(dataset), "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["queries"] == len(QUERIES)
    assert report["dataset"] == str(dataset.resolve())
    for mode in ("dense", "sparse", "hybrid"):
        metrics = report["results"][mode]
        assert set(metrics) >= {"ndcg@10", "recall@10", "recall@100", "mrr@10"}
        assert all(0.0 <= v <= 1.0 for v in metrics.values())
    # With 8 passages every relevant one is in the top 10 of the dense leg and the default hybrid.
    assert report["results"]["dense"]["recall@10"] == 1.0
    assert report["results"]["hybrid"]["recall@10"] == 1.0
    assert report["results"]["hybrid"]["mrr@10"] >= 0.8
    # The plain baseline of the same run: whole passages, dense only, its passage vectors cached.
    baseline = report["results"]["passage-dense (baseline)"]
    assert baseline["recall@10"] == 1.0 and baseline["mrr@10"] >= 0.8
    assert list((tmp_path / "data" / "eval" / report["collection"]).glob("baseline-*.npy"))

    # The eval collection is reused (incremental) and searchable from the CLI.
    collection = report["collection"]
    found = run(env, "search", "undo last git commit", "-c", collection, "--k", "3", "--json", "--local")
    assert found.returncode == 0, found.stderr
    hits = json.loads(found.stdout)["hits"]
    assert len(hits) == 3
    assert "git reset --soft" in hits[0]["text"]
    assert hits[0]["dense"]["rank"] >= 1 and hits[0]["rank"] == 1
    sparse = run(env, "search", "chomp newline", "-c", collection, "--mode", "sparse", "--json", "--local")
    assert "chomp" in json.loads(sparse.stdout)["hits"][0]["text"]
    grouped = run(
        env,
        "search",
        "undo last git commit",
        "-c",
        collection,
        "-k",
        "2",
        "--group-by",
        "document",
        "--json",
        "--local",
    )
    assert grouped.returncode == 0, grouped.stderr
    documents = json.loads(grouped.stdout)["documents"]
    assert len(documents) == 2 and "git reset --soft" in documents[0]["evidence"][0]["text"]
    table = run(env, "search", "undo last git commit", "-c", collection, "--group-by", "document", "--local")
    assert table.returncode == 0 and "documents" in table.stdout

    bad = run(env, "search", "x", "--mode", "fuzzy")
    assert bad.returncode != 0 and "--mode" in bad.stderr
    missing = run(env, "eval", "retrieval", "--dataset", str(tmp_path / "nope"))
    assert missing.returncode != 0 and "corpus.jsonl is missing" in missing.stderr
