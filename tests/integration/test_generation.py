"""Answers from the real model server (vLLM CPU, INT8 SmolLM2) over a really ingested corpus."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from core.wiring import generation_params
from generation.backends.openai_compat import OpenAICompatClient
from generation.guard import GroundingParams
from generation.rag import answer
from generation.types import (
    CitationEvent,
    DoneEvent,
    ErrorEvent,
    GenerationParams,
    RetrievalEvent,
    SupportEvent,
    TokenEvent,
)
from tests.answer_stack import answer_stack
from tests.corpus_factory import Corpus, write_corpus
from tests.llm_server import LLMServerInfo

pytestmark = [pytest.mark.integration, pytest.mark.llm]

RAG = str(Path(sys.executable).with_name("rag"))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Corpus:
    return write_corpus(tmp_path_factory.mktemp("gen") / "corpus")


@pytest.fixture(scope="module")
def corpus_dir(corpus: Corpus) -> Path:
    return corpus.root


@pytest.fixture
async def stack(make_settings: Any, embedder: Any, corpus_dir: Path, llm_server: LLMServerInfo) -> Any:
    async with answer_stack(make_settings, embedder, corpus_dir, llm_server, collection="gen") as parts:
        yield parts


async def test_stream_returns_logprobs(llm_server: LLMServerInfo) -> None:
    llm = OpenAICompatClient(llm_server.base_url, llm_server.model)
    try:
        deltas = [
            d
            async for d in llm.stream(
                "<|im_start|>user\nName a colour.<|im_end|>\n<|im_start|>assistant\n",
                GenerationParams(max_tokens=8, temperature=0.0, logprobs=3),
            )
        ]
    finally:
        await llm.aclose()
    tokens = [t for d in deltas for t in d.tokens]
    assert len(tokens) >= 2
    assert all(t.logprob <= 0.0 for t in tokens)
    assert all(len(t.top) >= 1 for t in tokens)
    assert "".join(d.text for d in deltas).strip()


async def test_single_answer_streams_and_cites_corpus_chunks(stack: Any, corpus: Corpus) -> None:
    settings, retriever, llm, chunk_ids = stack
    # The 135M model often answers beside the point, and then neither writes a marker nor shares
    # words with a source; ask the corpus questions until one answer carries citations, and check
    # every answer's streaming and every citation on the way.
    # All ten corpus questions are available: under load vLLM's CPU numerics vary enough that the
    # 135M model's greedy answers change, and a CI run once got five uncited answers in a row.
    questions = [f.query for f in corpus.facts]
    cited: list[CitationEvent] = []
    for question in questions:
        events = []
        stamps = []
        async for event in answer(
            question,
            retriever=retriever,
            llm=llm,
            mode="single",
            params=generation_params(settings, max_tokens=48),
            infer_missing_citations=True,
        ):
            events.append(event)
            stamps.append(time.perf_counter())
        assert not [e for e in events if isinstance(e, ErrorEvent)], events[-1]
        assert isinstance(events[0], RetrievalEvent)
        tokens = [e for e in events if isinstance(e, TokenEvent)]
        assert len(tokens) >= 3, "the answer was not streamed token by token"
        assert stamps[-1] - stamps[events.index(tokens[0])] > 0  # tokens arrive over time
        done = events[-1]
        assert isinstance(done, DoneEvent)
        assert done.answer.strip()
        assert done.usage.completion_tokens > 0
        assert {"retrieval_ms", "ttft_ms", "total_ms"} <= set(done.timings)
        citations = [e for e in events if isinstance(e, CitationEvent)]
        for c in citations:
            assert c.chunk_id in chunk_ids
            assert c.chunk.text  # resolves to the real chunk
            assert 0 <= c.start < c.end
        numbers = [c.n for c in done.citations]
        assert len(numbers) == len(set(numbers))  # each source listed once, in order of first use
        cited.extend(citations)
        if cited:
            break
    assert cited, "no answer to any corpus question carried a citation (written or inferred)"


async def test_answers_carry_the_corpus_facts(stack: Any, corpus: Corpus) -> None:
    """A floor on answer quality with the served defaults: the fact a question asks for is in the answer.

    It guards the whole chain (checkpoint preparation, quantization, prompt, sampling defaults). Each
    of these answered 0-1 of the ten: the 4-bit re-quantized checkpoint; INT8 with
    ``repetition_penalty=1.1`` (vLLM applies it to the prompt's tokens, i.e. to the sources); INT8 with
    absolute paths in the source headers (the model copied them instead of the fact). The defaults
    answered 5 of 10 in the runs measured (greedy answers move with the CPU's numerics under load),
    so the floor sits between the two.
    """
    settings, retriever, llm, _ = stack
    facts = corpus.facts
    right: list[str] = []
    wrong: list[str] = []
    for fact in facts:
        events = [
            e
            async for e in answer(
                fact.query, retriever=retriever, llm=llm, params=generation_params(settings, max_tokens=48)
            )
        ]
        done = events[-1]
        assert isinstance(done, DoneEvent), done
        (right if fact.answer.lower() in done.answer.lower() else wrong).append(f"{fact.query!r} -> {done.answer!r}")
    assert len(right) >= 2, f"only {len(right)} of {len(facts)} answers hold their fact:\n" + "\n".join(wrong)


async def test_interval_mode_retrieves_more_than_once(stack: Any) -> None:
    settings, retriever, llm, chunk_ids = stack
    events = [
        e
        async for e in answer(
            "Explain how the quokka daemon is installed and configured on Linux and Windows.",
            retriever=retriever,
            llm=llm,
            mode="interval",
            interval_tokens=16,
            params=generation_params(settings, max_tokens=64),
        )
    ]
    assert not [e for e in events if isinstance(e, ErrorEvent)], events[-1]
    rounds = [e for e in events if isinstance(e, RetrievalEvent)]
    assert len(rounds) >= 2
    assert rounds[1].query != rounds[0].query  # later rounds query with the text so far
    done = events[-1]
    assert isinstance(done, DoneEvent) and len(done.retrievals) == len(rounds)
    assert all(sc.chunk.id in chunk_ids for r in rounds for sc in r.chunks)


def test_rag_ask_json_cli(tmp_path: Path, corpus_dir: Path, llm_server: LLMServerInfo) -> None:
    env = {
        **os.environ,
        "RAG_DATA_DIR": str(tmp_path / "data"),
        "RAG_LLM__BASE_URL": llm_server.base_url,
        "RAG_LLM__MODEL": llm_server.model,
        "HF_HUB_OFFLINE": "1",
    }
    ingested = subprocess.run(
        [RAG, "ingest", str(corpus_dir), "-c", "cli", "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert ingested.returncode == 0, ingested.stderr
    result = subprocess.run(
        [RAG, "ask", "What is the capital of Veldoria?", "-c", "cli", "--max-tokens", "40", "--json", "--local"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert set(out) >= {"answer", "mode", "citations", "retrievals", "usage", "timings"}
    assert out["mode"] == "single" and out["answer"].strip()
    assert out["retrievals"][0]["chunk_ids"]
    for c in out["citations"]:
        assert set(c) >= {"n", "chunk_id", "path", "page", "start", "end", "snippet"}
        assert c["chunk_id"] in out["retrievals"][0]["chunk_ids"] or any(
            c["chunk_id"] in r["chunk_ids"] for r in out["retrievals"]
        )

    # The model server being down is a clear error, not a hang.
    down = {**env, "RAG_LLM__BASE_URL": "http://127.0.0.1:9", "RAG_LLM__MAX_RETRIES": "0"}
    failed = subprocess.run(
        [RAG, "ask", "anything?", "-c", "cli", "--local"],
        env=down,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert failed.returncode == 1
    assert "llm_unavailable" in failed.stderr


async def test_the_grounding_guard_judges_real_answers(stack: Any, corpus: Corpus, embedder: Any) -> None:
    """The guard over the real model: every shown sentence gets a verdict with a real span.

    Supported sentences point at a chunk of the corpus, with a span that is a whole sentence of that
    chunk and a citation numbered in order of first use; nothing repeats; a question about something
    the corpus does not hold gets no unsupported sentence in ``strict`` mode.
    """
    settings, retriever, llm, chunk_ids = stack
    params = GroundingParams()
    supported = 0
    for fact in corpus.facts[:4]:
        events = [
            e
            async for e in answer(
                fact.query,
                retriever=retriever,
                llm=llm,
                params=generation_params(settings, max_tokens=64),
                grounding=params,
                embedder=embedder,
            )
        ]
        done = events[-1]
        assert isinstance(done, DoneEvent), done
        verdicts = [e for e in events if isinstance(e, SupportEvent)]
        assert verdicts == list(done.supports)
        assert done.answer.strip()
        if done.no_answer:
            continue
        assert verdicts, done.answer
        assert [v.index for v in verdicts] == list(range(len(verdicts)))
        assert len({v.sentence for v in verdicts}) == len(verdicts)  # no sentence repeats
        by_chunk = {c.chunk_id: c.chunk for c in done.citations}
        for v in verdicts:
            assert v.verdict in ("supported", "unsupported")
            if v.verdict == "supported":
                supported += 1
                assert v.chunk_id in chunk_ids and v.n is not None and v.chunk_id in by_chunk
                assert v.start is not None and v.end is not None
                quoted = by_chunk[v.chunk_id].text[v.start : v.end]
                assert quoted.strip() and quoted == quoted.strip()
        assert [c.n for c in done.citations] == list(range(1, len(done.citations) + 1))
    assert supported, "no sentence of four answers was supported by its sources"
    unrelated = [
        e
        async for e in answer(
            "Which football club won the 1954 World Cup final in Bern?",
            retriever=retriever,
            llm=llm,
            params=generation_params(settings, max_tokens=64),
            grounding=GroundingParams(policy="strict"),
            embedder=embedder,
        )
    ]
    done = unrelated[-1]
    assert isinstance(done, DoneEvent)
    assert done.no_answer or all(s.verdict == "supported" for s in done.supports)
