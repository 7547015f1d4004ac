"""Answer metrics, question selection and θ calibration (pure functions, no model)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from evaluation.answers import citation_precision, exact_match, load_items, normalize_answer, rouge_l, token_f1
from evaluation.beir import load_dataset
from evaluation.calibration import calibrate, quantile

pytestmark = pytest.mark.unit


def test_normalize_and_exact_match() -> None:
    assert normalize_answer("The  Answer [1], is: 42!") == "answer is 42"
    assert exact_match("the answer is 42 [2].", ["Answer is 42"]) == 1.0
    assert exact_match("43", ["42"]) == 0.0


def test_token_f1_takes_the_best_gold() -> None:
    assert token_f1("paris is big", ["paris is big"]) == 1.0
    assert token_f1("paris", ["rome", "paris is big"]) == pytest.approx(0.5)
    assert token_f1("", ["x"]) == 0.0


def test_rouge_l_uses_rouge_score() -> None:
    assert rouge_l("Paris is the capital [1].", ["Paris is the capital."]) == pytest.approx(1.0)
    assert 0.0 < rouge_l("the capital is Paris", ["Paris is the capital of France"]) < 1.0


def test_citation_precision() -> None:
    assert citation_precision([], ["a"]) is None
    assert citation_precision(["a", "b", None, "a"], ["a"]) == 0.5


def test_load_items_takes_the_first_questions_by_id(tmp_path: Path) -> None:
    root = tmp_path / "qa"
    (root / "qrels").mkdir(parents=True)
    passages = [{"_id": f"p{i}", "title": "", "text": f"answer {i}"} for i in range(4)]
    (root / "corpus.jsonl").write_text("\n".join(json.dumps(p) for p in passages))
    queries = [{"_id": qid, "text": f"question {qid}?"} for qid in ("q3", "q1", "q2", "q9")]
    (root / "queries.jsonl").write_text("\n".join(json.dumps(q) for q in queries))
    (root / "qrels" / "test.tsv").write_text(
        "query-id\tcorpus-id\tscore\nq3\tp3\t1\nq1\tp1\t1\nq2\tp2\t1\nq9\tmissing\t1\n"
    )
    items = load_items(load_dataset(root), 2)
    assert [(i.qid, i.gold_ids, i.gold_texts) for i in items] == [
        ("q1", ("p1",), ("answer 1",)),
        ("q2", ("p2",), ("answer 2",)),
    ]
    assert [i.qid for i in load_items(load_dataset(root))] == ["q1", "q2", "q3"]  # q9's passage is missing


def test_quantile() -> None:
    assert quantile([3.0, 1.0, 2.0], 0.5) == 2.0
    assert quantile([0.0, 1.0], 0.25) == 0.25


def test_calibrate_picks_the_target_quantile() -> None:
    per_question = [[0.01, 0.2, 0.5], [0.05, 0.9], [0.3, 0.6, 0.7, 0.8, 0.95]]
    cal = calibrate(per_question, [0.5, 0.9], target=0.4)
    assert cal.sentences == 10 and cal.questions == 3
    assert cal.theta == pytest.approx(0.42)  # 40th percentile of the ten minima (interpolated)
    assert cal.rate_at_theta == pytest.approx(0.4)
    assert cal.beta == 0.21  # β = θ / 2, at most 0.4
    assert cal.trigger_rates[0.05] == pytest.approx(0.2)
    assert cal.question_trigger_rates[0.05] == pytest.approx(2 / 3)
    assert cal.as_json()["min_prob_percentiles"]["p50"] == pytest.approx(0.55)
    with pytest.raises(ValueError):
        calibrate([[], []], [])


def test_derived_sets_are_stable_and_need_their_source(tmp_path: Path) -> None:
    from evaluation.beir import load_dataset
    from evaluation.derived import FOLLOW_UPS, derive_followups, derive_unanswerable

    root = tmp_path / "ds"
    (root / "qrels").mkdir(parents=True)
    (root / "corpus.jsonl").write_text(
        "".join(json.dumps({"_id": f"p{i}", "title": "", "text": f"passage {i}"}) + "\n" for i in range(4)),
        encoding="utf-8",
    )
    (root / "queries.jsonl").write_text(
        "".join(json.dumps({"_id": f"q{i}", "text": f"question {i}?"}) + "\n" for i in range(3)), encoding="utf-8"
    )
    (root / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq0\tp0\t1\nq1\tp1\t1\nq2\tp2\t1\n")
    data = load_dataset(root)
    folder = derive_unanswerable(data, tmp_path / "scratch", 2)
    derived = load_dataset(folder)
    assert sorted(derived.queries) == ["q0", "q1"]
    ids = [json.loads(line)["_id"] for line in (folder / "corpus.jsonl").read_text().splitlines()]
    assert ids == ["p2", "p3"]  # the gold passages of q0 and q1 are gone, the rest stays
    stamp = (folder / "corpus.jsonl").stat().st_mtime_ns
    assert derive_unanswerable(data, tmp_path / "scratch", 2) == folder
    assert (folder / "corpus.jsonl").stat().st_mtime_ns == stamp  # not rewritten
    items = load_items(derived, unanswerable=True)
    assert [(i.qid, i.gold_ids, i.gold_texts) for i in items] == [("q0", ("p0",), ()), ("q1", ("p1",), ())]
    followups = derive_followups(data, 3)
    assert [f.first for f in followups] == ["question 0?", "question 1?", "question 2?"]
    assert all(f.follow_up in FOLLOW_UPS for f in followups)
    assert followups == derive_followups(data, 3)
    assert followups[0].gold_ids == ("p0",)
