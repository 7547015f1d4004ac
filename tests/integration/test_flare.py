"""FLARE end to end on the real model server (vLLM CPU, INT8 SmolLM2) over a really ingested corpus,
and ``rag eval answers`` / ``rag flare calibrate`` as a user runs them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from core.wiring import generation_params
from generation.flare import FlareParams, SentenceJudgement
from generation.rag import answer
from generation.types import AnswerEvent, DoneEvent, ErrorEvent, RetrievalEvent, TokenEvent
from tests.answer_stack import answer_stack
from tests.corpus_factory import write_corpus
from tests.integration.test_cli_eval import write_beir
from tests.llm_server import LLMServerInfo

pytestmark = [pytest.mark.integration, pytest.mark.llm]

RAG = str(Path(sys.executable).with_name("rag"))
QUESTION = "Explain how the quokka daemon is installed, which port it listens on, and where it keeps its logs."


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("flare") / "corpus").root


@pytest.fixture
async def stack(make_settings: Any, embedder: Any, corpus_dir: Path, llm_server: LLMServerInfo) -> Any:
    async with answer_stack(make_settings, embedder, corpus_dir, llm_server, collection="flare") as parts:
        yield parts


async def _flare(stack: Any, params: FlareParams) -> tuple[list[AnswerEvent], list[SentenceJudgement]]:
    settings, retriever, llm, _ = stack
    seen: list[SentenceJudgement] = []
    events = [
        e
        async for e in answer(
            QUESTION,
            retriever=retriever,
            llm=llm,
            mode="flare",
            params=generation_params(settings, max_tokens=48),
            flare=params,
            flare_observer=seen.append,
        )
    ]
    assert not [e for e in events if isinstance(e, ErrorEvent)], events[-1]
    return events, seen


async def test_high_theta_triggers_retrieval(stack: Any) -> None:
    _, _, _, chunk_ids = stack
    # β = 0 keeps every token in the masked query, so the trigger tokens must be in it.
    events, seen = await _flare(stack, FlareParams(theta=0.99, beta=0.0, max_rounds=2, lookahead_tokens=32))
    rounds = [e for e in events if isinstance(e, RetrievalEvent)]
    assert rounds[0].reason == "initial" and rounds[0].query == QUESTION
    triggered = rounds[1:]
    assert triggered, "θ=0.99 should make at least one look-ahead re-retrieve"
    for r in triggered:
        assert r.reason == "low_confidence" and r.round >= 1
        assert r.trigger and all(t.prob <= 0.99 for t in r.trigger)
        assert r.query.strip()
        words = " ".join(r.query.split())
        assert all(" ".join(t.token.split()) in words for t in r.trigger), (r.query, [t.token for t in r.trigger])
        assert all(sc.chunk.id in chunk_ids for sc in r.chunks)
    assert any(j.triggered for j in seen)
    done = events[-1]
    assert isinstance(done, DoneEvent) and done.mode == "flare"
    assert done.answer == "".join(e.text for e in events if isinstance(e, TokenEvent))
    assert len(done.retrievals) == len(rounds) <= 3


async def test_theta_zero_never_retrieves_again(stack: Any) -> None:
    events, seen = await _flare(stack, FlareParams(theta=0.0, lookahead_tokens=32))
    rounds = [e for e in events if isinstance(e, RetrievalEvent)]
    assert len(rounds) == 1 and rounds[0].reason == "initial"
    assert seen and not any(j.triggered for j in seen)
    assert all(0.0 < j.min_prob <= 1.0 for j in seen)
    done = events[-1]
    assert isinstance(done, DoneEvent) and done.answer.strip()


def test_eval_answers_and_calibrate_cli(tmp_path: Path, llm_server: LLMServerInfo) -> None:
    dataset = write_beir(tmp_path / "tiny")
    env = {
        **os.environ,
        "RAG_DATA_DIR": str(tmp_path / "data"),
        "RAG_LLM__BASE_URL": llm_server.base_url,
        "RAG_LLM__MODEL": llm_server.model,
        "HF_HUB_OFFLINE": "1",
    }

    def rag(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([RAG, *args], env=env, capture_output=True, text=True, timeout=600, check=False)

    result = rag(
        "eval", "answers", "--dataset", str(dataset), "--mode", "flare", "-n", "2", "--max-tokens", "32", "--json"
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["mode"] == "flare" and [q["qid"] for q in report["questions"]] == ["q1", "q2"]
    metrics = report["metrics"]
    assert metrics["questions"] == 2 and metrics["errors"] == 0
    for key in ("exact_match", "f1", "rouge_l", "retrievals_per_question", "latency_ms_p50"):
        assert metrics[key] is not None
    assert 0.0 <= metrics["rouge_l"] <= 1.0 and metrics["retrievals_per_question"] >= 1
    assert report["flare"]["lookaheads"] >= 1

    cal = rag("flare", "calibrate", "--dataset", str(dataset), "-n", "2", "--max-tokens", "32", "--json")
    assert cal.returncode == 0, cal.stderr
    out = json.loads(cal.stdout)
    assert out["calibration"]["sentences"] >= 1
    assert 0.0 < out["calibration"]["theta"] < 1.0
    stored = json.loads(Path(out["saved_to"]).read_text())
    assert stored["params"]["theta"] == out["calibration"]["theta"]

    bad = rag("eval", "answers", "--dataset", str(dataset), "--mode", "nope")
    assert bad.returncode != 0 and "--mode" in bad.stderr
