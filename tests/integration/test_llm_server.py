"""The embedded vLLM server as the service will use it: raw HTTP, real model (``tests.llm_server``)."""

from __future__ import annotations

import json
import math
from typing import Any

import httpx
import pytest

from tests.llm_server import LLMServerInfo

pytestmark = [pytest.mark.integration, pytest.mark.llm, pytest.mark.slow]

TIMEOUT = httpx.Timeout(120.0, connect=5.0)


def _sse_events(response: httpx.Response) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    for line in response.iter_lines():
        if not line.startswith("data: "):
            continue
        data = line.removeprefix("data: ")
        if data == "[DONE]":
            break
        events.append(json.loads(data))
    return events


def test_models_lists_the_served_name(llm_server: LLMServerInfo) -> None:
    r = httpx.get(f"{llm_server.base_url}/v1/models", timeout=TIMEOUT)
    r.raise_for_status()
    body = r.json()
    assert [m["id"] for m in body["data"]] == [llm_server.model]
    assert body["data"][0]["max_model_len"] == 2048


def test_the_int8_checkpoint_is_served(llm_server: LLMServerInfo) -> None:
    """The prepared checkpoint is the INT8 W8A8 one, and vLLM runs it with its int8 kernel."""
    if llm_server.log_path is None:
        pytest.skip("an external server (RAG_TEST_LLM_BASE_URL): its checkpoint is not ours to check")
    log = llm_server.log_path.read_text(errors="replace")
    assert "CompressedTensorsW8A8Int8" in log, "vLLM did not load the W8A8 INT8 scheme (see the server log)"


def test_streamed_completion_returns_tokens_and_logprobs(llm_server: LLMServerInfo) -> None:
    request = {
        "model": llm_server.model,
        "prompt": "The capital of France is",
        "max_tokens": 12,
        "temperature": 0.0,
        "logprobs": 5,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with httpx.stream("POST", f"{llm_server.base_url}/v1/completions", json=request, timeout=TIMEOUT) as r:
        r.raise_for_status()
        assert r.headers["content-type"].startswith("text/event-stream")
        events = _sse_events(r)

    chunks = [e for e in events if e.get("choices")]
    tokens: list[str] = []
    logprobs: list[float] = []
    for chunk in chunks:
        lp = chunk["choices"][0]["logprobs"]
        assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"])
        for top in lp["top_logprobs"]:
            assert 1 <= len(top) <= 6  # the 5 best, plus the sampled token when it is not among them
        tokens += lp["tokens"]
        logprobs += lp["token_logprobs"]
    assert 1 <= len(tokens) <= 12
    assert all(math.isfinite(x) and x <= 0.0 for x in logprobs)
    text = "".join(c["choices"][0]["text"] for c in chunks)
    assert text == "".join(tokens) or text.strip()  # byte-level tokens may render differently
    usage = events[-1]["usage"]
    assert usage["completion_tokens"] == len(tokens)
    assert usage["prompt_tokens"] > 0


def test_greedy_completion_is_deterministic(llm_server: LLMServerInfo) -> None:
    request = {"model": llm_server.model, "prompt": "Water boils at", "max_tokens": 8, "temperature": 0}
    texts = []
    for _ in range(2):  # the second one is served from the prefix cache
        r = httpx.post(f"{llm_server.base_url}/v1/completions", json=request, timeout=TIMEOUT)
        r.raise_for_status()
        texts.append(r.json()["choices"][0]["text"])
    assert texts[0].strip()
    assert texts[0] == texts[1]


def test_chat_completion_answers(llm_server: LLMServerInfo) -> None:
    r = httpx.post(
        f"{llm_server.base_url}/v1/chat/completions",
        json={
            "model": llm_server.model,
            "messages": [
                {"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": "What is the capital of France? Answer in one sentence."},
            ],
            "max_tokens": 40,
            "temperature": 0.0,
            "logprobs": True,
            "top_logprobs": 3,
        },
        timeout=TIMEOUT,
    )
    r.raise_for_status()
    choice = r.json()["choices"][0]
    assert choice["message"]["role"] == "assistant"
    assert "Paris" in choice["message"]["content"]
    assert choice["finish_reason"] in ("stop", "length")
    content = choice["logprobs"]["content"]
    assert content and all(len(t["top_logprobs"]) == 3 for t in content)
