"""The same ``OpenAICompatClient`` against a second server implementation: llama-cpp-python.

The client is written for "any OpenAI-compatible server"; these tests hold it to that. The shared
checks run against both servers (``server`` is parametrized over the vLLM fixture ``llm_server`` and
``llamacpp_server``); the ones about llama-cpp-python's own behaviour (how it reports a prompt that
does not fit, its log on a client disconnect, a whole RAG answer) use ``llamacpp_server`` alone. The
vLLM-only suites (``test_llm_server.py``, ``test_generation.py``) stay as they are.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import AsyncIterator
from contextlib import aclosing
from pathlib import Path
from typing import Any

import httpx
import pytest

from core.wiring import generation_params
from generation.backends.openai_compat import OpenAICompatClient
from generation.errors import ContextTooLong, LLMUnavailable
from generation.rag import answer
from generation.types import (
    ChatMessage,
    CitationEvent,
    DoneEvent,
    ErrorEvent,
    GenerationParams,
    RetrievalEvent,
    StreamDelta,
    TokenEvent,
)
from serving.launcher import find_free_port
from tests.answer_stack import answer_stack
from tests.corpus_factory import write_corpus
from tests.llamacpp_server import LLAMACPP_N_CTX
from tests.llm_server import LLMServerInfo

pytestmark = [pytest.mark.integration, pytest.mark.llm]

# A raw ChatML prompt (SmolLM2's template), so both servers see exactly the same text.
CHAT_PROMPT = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "<|im_start|>user\nDescribe the sea in two sentences.<|im_end|>\n<|im_start|>assistant\n"
)
# Plain ASCII continuation: no multi-byte character can straddle two tokens, so the token strings
# must spell the text exactly.
PROSE_PROMPT = "The history of the city begins in the year 1200, when"
GREEDY = GenerationParams(max_tokens=16, temperature=0.0, top_p=1.0)
# Both fixtures serve a 2048-token window (vLLM: --max-model-len, llama-cpp-python: --n_ctx).
N_CTX = LLAMACPP_N_CTX


@pytest.fixture(params=["vllm", "llamacpp"])
def server(request: pytest.FixtureRequest) -> LLMServerInfo:
    """Each shared check runs once per server implementation."""
    name = "llm_server" if request.param == "vllm" else "llamacpp_server"
    info: LLMServerInfo = request.getfixturevalue(name)
    return info


@pytest.fixture
async def client(server: LLMServerInfo) -> AsyncIterator[OpenAICompatClient]:
    llm = OpenAICompatClient(server.base_url, server.model)
    yield llm
    await llm.aclose()


@pytest.fixture
async def llamacpp_client(llamacpp_server: LLMServerInfo) -> AsyncIterator[OpenAICompatClient]:
    llm = OpenAICompatClient(llamacpp_server.base_url, llamacpp_server.model)
    yield llm
    await llm.aclose()


async def _deltas(stream: AsyncIterator[StreamDelta]) -> list[StreamDelta]:
    return [d async for d in stream]


# --- shared checks: both servers ----------------------------------------------------------------


async def test_streamed_completion_has_tokens_with_finite_logprobs(client: OpenAICompatClient) -> None:
    params = GenerationParams(max_tokens=12, temperature=0.0, top_p=1.0, logprobs=3)
    deltas = await _deltas(client.stream(PROSE_PROMPT, params))

    with_tokens = [d for d in deltas if d.tokens]
    assert len(with_tokens) >= 3, "the completion was not streamed in several deltas"
    tokens = [t for d in deltas for t in d.tokens]
    assert 3 <= len(tokens) <= 12
    for t in tokens:
        assert math.isfinite(t.logprob) and t.logprob <= 0.0
        assert 1 <= len(t.top) <= 4  # the 3 best, plus the sampled token when it is not among them
        assert all(math.isfinite(lp) for _, lp in t.top)
        assert [lp for _, lp in t.top] == sorted((lp for _, lp in t.top), reverse=True)
    text = "".join(d.text for d in deltas)
    assert text.strip()
    assert "".join(t.token for t in tokens) == text
    assert [d.finish_reason for d in deltas if d.finish_reason] in (["length"], ["stop"])


async def test_complete_gathers_the_same_greedy_text(client: OpenAICompatClient) -> None:
    streamed = await _deltas(client.stream(PROSE_PROMPT, GREEDY))
    completion = await client.complete(PROSE_PROMPT, GREEDY)
    assert completion.text.strip()
    assert completion.text == "".join(d.text for d in streamed)
    assert completion.finish_reason == "length"  # 16 tokens of prose never reach an end of text


async def test_streamed_chat_answers(client: OpenAICompatClient) -> None:
    messages = [
        ChatMessage("system", "You are a helpful assistant."),
        ChatMessage("user", "What is the capital of France? Answer in one sentence."),
    ]
    deltas = await _deltas(
        client.stream_chat(messages, GenerationParams(max_tokens=40, temperature=0.0, top_p=1.0, logprobs=2))
    )
    text = "".join(d.text for d in deltas)
    assert "Paris" in text
    assert len([d for d in deltas if d.text]) >= 3, "the chat answer was not streamed"
    assert all(math.isfinite(t.logprob) for d in deltas for t in d.tokens)
    assert [d.finish_reason for d in deltas if d.finish_reason] in (["stop"], ["length"])
    assert "<|im_end|>" not in text  # the server stops at the template's end of turn, and hides it


async def test_max_tokens_is_honoured(client: OpenAICompatClient) -> None:
    # repetition_penalty goes out under both servers' names (vLLM and llama.cpp), and neither refuses it.
    params = GenerationParams(max_tokens=5, temperature=0.0, logprobs=1, repetition_penalty=1.2)
    completion = await client.complete(PROSE_PROMPT, params)
    assert completion.finish_reason == "length"
    assert len(completion.tokens) == 5


async def test_stop_sequence_is_honoured(client: OpenAICompatClient) -> None:
    free = await client.complete(PROSE_PROMPT, GREEDY)
    # A stop string taken from the middle of the greedy continuation: asked again with it, the server
    # must cut right before its first occurrence and say it stopped.
    words = free.text.split()
    assert len(words) >= 4, free.text
    stop = " " + words[2]
    cut = free.text.index(stop)
    stopped = await client.complete(PROSE_PROMPT, GenerationParams(max_tokens=16, temperature=0.0, stop=(stop,)))
    assert stopped.finish_reason == "stop"
    assert stopped.text == free.text[:cut]


async def test_token_count_matches_the_servers_prompt_usage(client: OpenAICompatClient, server: LLMServerInfo) -> None:
    # Non-streamed raw request: llama-cpp-python reports usage only there (it ignores include_usage).
    async with httpx.AsyncClient(base_url=server.base_url, timeout=120) as http:
        r = await http.post(
            "/v1/completions", json={"model": server.model, "prompt": CHAT_PROMPT, "max_tokens": 1, "temperature": 0}
        )
    r.raise_for_status()
    prompt_tokens = r.json()["usage"]["prompt_tokens"]
    assert await client.count_tokens(CHAT_PROMPT) == prompt_tokens
    ids = await client.tokenize(CHAT_PROMPT)
    assert len(ids) == prompt_tokens
    # Chat markers are single special tokens on both servers, not spelled out as text.
    assert await client.count_tokens("<|im_start|>") == 1


async def test_prompt_longer_than_the_context_is_context_too_long(client: OpenAICompatClient) -> None:
    long_prompt = "The quick brown fox jumps over the lazy dog. " * 400  # ~4,000 tokens > 2048
    with pytest.raises(ContextTooLong) as info:
        await client.complete(long_prompt, GenerationParams(max_tokens=8, temperature=0.0))
    assert not info.value.retryable
    assert info.value.max_context == N_CTX
    assert info.value.prompt_tokens is not None and info.value.prompt_tokens > N_CTX
    # The server survives it.
    assert (await client.complete(PROSE_PROMPT, GenerationParams(max_tokens=2, temperature=0.0))).text


async def test_closing_a_stream_midway_frees_the_server(client: OpenAICompatClient) -> None:
    params = GenerationParams(max_tokens=400, temperature=0.0, top_p=1.0)
    seen: list[StreamDelta] = []
    async with aclosing(client.stream(CHAT_PROMPT, params)) as stream:
        async for delta in stream:
            seen.append(delta)
            if len(seen) == 3:
                break
    assert len(seen) == 3 and not any(d.finish_reason for d in seen)
    # The next request is served (llama-cpp-python serves one request at a time: it would queue
    # behind a generation that went on).
    after = await client.complete(PROSE_PROMPT, GenerationParams(max_tokens=4, temperature=0.0))
    assert after.finish_reason == "length" and after.text


async def test_prompt_that_leaves_less_room_than_max_tokens_is_shortened(client: OpenAICompatClient) -> None:
    """Both servers (vLLM 0.32, llama-cpp-python 0.3.36) generate only what still fits and report
    ``length``, rather than refusing: only a prompt that alone overflows is ContextTooLong. Callers
    that must not lose the end of an answer budget ``prompt + max_tokens`` themselves, as rag does
    against ``RAG_LLM__MAX_MODEL_LEN``."""
    prompt = "The quick brown fox jumps over the lazy dog. " * 203  # 2,031 tokens of 2,048
    room = N_CTX - await client.count_tokens(prompt)
    assert 0 < room < 40
    completion = await client.complete(prompt, GenerationParams(max_tokens=200, temperature=0.0, logprobs=1))
    assert completion.finish_reason == "length"
    assert len(completion.tokens) == room


# --- client behaviour that needs no particular server ------------------------------------------------


async def test_closed_port_is_llm_unavailable() -> None:
    llm = OpenAICompatClient(f"http://127.0.0.1:{find_free_port()}", "nobody", max_retries=0)
    try:
        with pytest.raises(LLMUnavailable) as info:
            await llm.complete("hello", GREEDY)
    finally:
        await llm.aclose()
    assert info.value.retryable


# --- llama-cpp-python specifics ----------------------------------------------------------------------


async def test_llamacpp_aborts_the_generation_of_a_closed_stream(
    llamacpp_client: OpenAICompatClient, llamacpp_server: LLMServerInfo
) -> None:
    assert llamacpp_server.log_path is not None
    before = llamacpp_server.log_path.read_text(errors="replace").count("Disconnected from client")
    async with aclosing(llamacpp_client.stream(CHAT_PROMPT, GenerationParams(max_tokens=400, temperature=0.0))) as s:
        async for _ in s:
            break
    # Served only once the closed request released the model: by then it has logged how it ended.
    await llamacpp_client.complete(PROSE_PROMPT, GenerationParams(max_tokens=2, temperature=0.0))
    log = llamacpp_server.log_path.read_text(errors="replace")
    assert log.count("Disconnected from client") > before, "the server generated on for a closed stream"


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("second") / "corpus").root


@pytest.fixture
async def stack(make_settings: Any, embedder: Any, corpus_dir: Path, llamacpp_server: LLMServerInfo) -> Any:
    async with answer_stack(make_settings, embedder, corpus_dir, llamacpp_server, collection="second") as parts:
        yield parts


async def test_llamacpp_single_answer_streams_and_cites_corpus_chunks(stack: Any) -> None:
    settings, retriever, llm, chunk_ids = stack
    # As in test_generation.py: the 135M model often answers beside the point, so ask the corpus
    # questions until one answer carries a citation, checking every answer on the way.
    # All ten corpus questions are available: under load vLLM's CPU numerics vary enough that the
    # 135M model's greedy answers change, and a CI run once got five uncited answers in a row.
    questions = [f.query for f in write_corpus(Path(tempfile.mkdtemp()) / "q").facts]
    cited: list[CitationEvent] = []
    for question in questions:
        events = [
            e
            async for e in answer(
                question,
                retriever=retriever,
                llm=llm,
                mode="single",
                params=generation_params(settings, max_tokens=48),
                infer_missing_citations=True,
            )
        ]
        assert not [e for e in events if isinstance(e, ErrorEvent)], events[-1]
        assert isinstance(events[0], RetrievalEvent)
        tokens = [e for e in events if isinstance(e, TokenEvent)]
        assert len(tokens) >= 3, "the answer was not streamed token by token"
        done = events[-1]
        assert isinstance(done, DoneEvent)
        assert done.answer.strip()
        assert done.usage.completion_tokens > 0
        citations = [e for e in events if isinstance(e, CitationEvent)]
        for c in citations:
            assert c.chunk_id in chunk_ids
            assert c.chunk.text
            assert 0 <= c.start < c.end
        cited.extend(citations)
        if cited:
            break
    assert cited, "no answer to any corpus question carried a citation (written or inferred)"
