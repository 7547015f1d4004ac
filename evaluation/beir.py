"""Datasets in BEIR layout: ``corpus.jsonl``, ``queries.jsonl``, ``qrels/test.tsv``.

``corpus.jsonl`` rows are ``{"_id", "title", "text"}``; ``queries.jsonl`` rows are
``{"_id", "text"}``; ``qrels/test.tsv`` has a header and ``query-id corpus-id score`` rows.
To evaluate the real ingestion path, passages are written out as one file each
(``materialize``: markdown with the title as its heading, or plain text when there is no
title) and ingested like any folder; a chunk maps back to its passage id through its file name.
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path


class DatasetError(Exception):
    """A dataset folder that is not in BEIR layout."""


@dataclass(frozen=True, slots=True)
class Passage:
    """One corpus row."""

    id: str
    title: str
    text: str


@dataclass(frozen=True, slots=True)
class Dataset:
    """A BEIR-layout dataset, with queries restricted to those that have judgments."""

    root: Path
    name: str
    queries: dict[str, str]
    qrels: dict[str, dict[str, int]]

    def passages(self) -> Iterator[Passage]:
        """Stream the corpus (it may be large)."""
        with (self.root / "corpus.jsonl").open(encoding="utf-8") as fh:
            for line in fh:
                if line.strip():
                    row = json.loads(line)
                    yield Passage(str(row["_id"]), str(row.get("title") or ""), str(row.get("text") or ""))


def load_dataset(root: Path, *, split: str = "test") -> Dataset:
    """Read queries and judgments of ``root`` (the corpus is streamed on demand).

    Raises:
        DatasetError: a file is missing or malformed, with which one in the message.
    """
    root = root.expanduser().resolve()
    for required in ("corpus.jsonl", "queries.jsonl", f"qrels/{split}.tsv"):
        if not (root / required).is_file():
            raise DatasetError(f"{root} is not a BEIR-layout dataset: {required} is missing")
    qrels: dict[str, dict[str, int]] = {}
    with (root / "qrels" / f"{split}.tsv").open(encoding="utf-8", newline="") as fh:
        reader = csv.reader(fh, delimiter="\t")
        for i, row in enumerate(reader):
            if not row or (i == 0 and not row[-1].strip().lstrip("-").isdigit()):
                continue  # header
            if len(row) < 3:
                raise DatasetError(f"qrels line {i + 1}: expected 3 columns, got {row!r}")
            qrels.setdefault(row[0], {})[row[1]] = int(row[2])
    queries: dict[str, str] = {}
    with (root / "queries.jsonl").open(encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                row = json.loads(line)
                if str(row["_id"]) in qrels:
                    queries[str(row["_id"])] = str(row["text"])
    if not queries:
        raise DatasetError(f"{root}: no query has a judgment in qrels/{split}.tsv")
    return Dataset(root=root, name=root.name, queries=queries, qrels=qrels)


def file_name(passage_id: str, *, titled: bool = False) -> str:
    """A safe, unique, stable file name for a passage id (``.md`` for a passage with a title)."""
    digest = hashlib.sha1(passage_id.encode("utf-8")).hexdigest()[:16]
    return f"{digest}.md" if titled else f"{digest}.txt"


def materialize(dataset: Dataset, target: Path) -> dict[str, str]:
    """Write each passage to ``target/<hash>.md`` or ``.txt`` (skipping identical files) and return
    ``{file name: passage id}``; the mapping is also saved as ``target/../ids.json``.

    A passage with a title is written as markdown, ``# title`` then the text, to
    ``<hash>.md``: the markdown loader reads that line as the document's title and the
    heading of every chunk, as it would for a real document (a plain-text file's title
    would be its hash-named stem). The file of the other suffix, left by an earlier run of
    a changed dataset, is removed.
    """
    target.mkdir(parents=True, exist_ok=True)
    mapping: dict[str, str] = {}
    for passage in dataset.passages():
        titled = bool(passage.title.strip())
        name = file_name(passage.id, titled=titled)
        mapping[name] = passage.id
        body = f"# {' '.join(passage.title.split())}\n\n{passage.text}" if titled else passage.text
        path = target / name
        if not path.exists() or path.read_text(encoding="utf-8") != body:
            path.write_text(body, encoding="utf-8")
        (target / file_name(passage.id, titled=not titled)).unlink(missing_ok=True)
    (target.parent / "ids.json").write_text(json.dumps(mapping), encoding="utf-8")
    return mapping
