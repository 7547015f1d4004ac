"""Evaluation sets derived at run time from a shared BEIR-layout dataset (never committed copies).

``derive_unanswerable`` writes, into a scratch folder, a copy of a dataset whose corpus lacks the
gold passages of its first ``questions`` questions (by ``_id``, the subset ``rag eval answers
--questions N`` uses): each of those questions then has no answer in the corpus, and a trustworthy
answer says so (``no_answer``). Its ``qrels`` keep the original judgments (of passages that are no
longer there), so the removed passages stay known.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from evaluation.beir import Dataset

__all__ = ["FOLLOW_UPS", "FollowUp", "derive_followups", "derive_unanswerable", "first_judged"]


def first_judged(dataset: Dataset, questions: int | None) -> list[str]:
    """The first ``questions`` query ids (by ``_id``) that have a positive judgment."""
    qids = [q for q in sorted(dataset.queries) if any(r > 0 for r in dataset.qrels.get(q, {}).values())]
    return qids if questions is None else qids[:questions]


def derive_unanswerable(dataset: Dataset, scratch_dir: Path, questions: int | None) -> Path:
    """Write the unanswerable variant of ``dataset`` under ``scratch_dir`` and return its folder.

    The folder is ``<scratch_dir>/<name>-unanswerable-<N>``; it is rewritten only when the source
    or the selection changed (a stamp records both), so a repeated evaluation re-uses its ingested
    scratch collection.
    """
    qids = first_judged(dataset, questions)
    removed = {pid for q in qids for pid, rel in dataset.qrels[q].items() if rel > 0}
    out = scratch_dir / f"{dataset.name}-unanswerable-{len(qids)}"
    source_stat = (dataset.root / "corpus.jsonl").stat()
    stamp = hashlib.sha1(
        json.dumps([str(dataset.root), source_stat.st_size, source_stat.st_mtime_ns, qids]).encode()
    ).hexdigest()
    stamp_file = out / ".derived"
    if stamp_file.is_file() and stamp_file.read_text(encoding="utf-8") == stamp:
        return out
    (out / "qrels").mkdir(parents=True, exist_ok=True)
    with (
        (dataset.root / "corpus.jsonl").open(encoding="utf-8") as src,
        (out / "corpus.jsonl").open("w", encoding="utf-8") as dst,
    ):
        for line in src:
            if line.strip() and json.loads(line)["_id"] not in removed:
                dst.write(line if line.endswith("\n") else line + "\n")
    with (out / "queries.jsonl").open("w", encoding="utf-8") as fh:
        for q in qids:
            fh.write(json.dumps({"_id": q, "text": dataset.queries[q]}) + "\n")
    with (out / "qrels" / "test.tsv").open("w", encoding="utf-8") as fh:
        fh.write("query-id\tcorpus-id\tscore\n")
        for q in qids:
            for pid, rel in sorted(dataset.qrels[q].items()):
                fh.write(f"{q}\t{pid}\t{rel}\n")
    stamp_file.write_text(stamp, encoding="utf-8")
    return out


FOLLOW_UPS: tuple[str, ...] = (
    "Can you explain that in more detail?",
    "Why is that?",
    "What else should I know about it?",
    "Could you give me more details on that?",
)
"""Follow-ups that say nothing by themselves: only the first question says what they are about."""


@dataclass(frozen=True, slots=True)
class FollowUp:
    """A two-turn conversation: ``first`` is a dataset question, ``follow_up`` needs it to be understood.

    The gold passages of both turns are the first question's (the follow-up asks for more of the same
    answer), so a follow-up answered without the conversation (retrieval on the follow-up alone) misses.
    """

    qid: str
    first: str
    follow_up: str
    gold_ids: tuple[str, ...]


def derive_followups(dataset: Dataset, questions: int | None) -> list[FollowUp]:
    """The multi-turn dev set: each of the first ``questions`` questions with a follow-up.

    The follow-up is picked from :data:`FOLLOW_UPS` by a stable hash of the query id, so the set is
    the same in every run and on every machine.
    """
    out: list[FollowUp] = []
    for qid in first_judged(dataset, questions):
        pick = int(hashlib.sha1(qid.encode()).hexdigest(), 16) % len(FOLLOW_UPS)
        gold = tuple(pid for pid, rel in sorted(dataset.qrels[qid].items()) if rel > 0)
        out.append(FollowUp(qid, dataset.queries[qid], FOLLOW_UPS[pick], gold))
    return out
