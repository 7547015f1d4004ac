"""The OpenAI-compatible client against canned vLLM and llama.cpp responses (httpx.MockTransport)."""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import httpx
import pytest

from generation.backends.openai_compat import OpenAICompatClient, iter_sse_data
from generation.errors import (
    ContextTooLong,
    LLMBadRequest,
    LLMError,
    LLMProtocolError,
    LLMTimeout,
    LLMUnavailable,
    TokenizeUnsupported,
)
from generation.types import ChatMessage, GenerationParams, StreamDelta, Usage

pytestmark = pytest.mark.unit

PARAMS = GenerationParams(max_tokens=16, temperature=0.0, top_k=40, stop=("<|im_end|>",), logprobs=2, seed=7)

Handler = Callable[[httpx.Request], httpx.Response]


def sse(*events: object, done: bool = True, newline: str = "\n", space: bool = True) -> bytes:
    """An SSE body: one ``data:`` event per item (dicts become JSON), then ``[DONE]``."""
    prefix = "data: " if space else "data:"
    lines = [prefix + (e if isinstance(e, str) else json.dumps(e)) + newline + newline for e in events]
    if done:
        lines.append(prefix + "[DONE]" + newline + newline)
    return "".join(lines).encode()


class ChunkedStream(httpx.AsyncByteStream):
    """A response body delivered in given pieces; records whether it was closed.

    With ``hang=True`` it blocks forever after the pieces, like a server still generating.
    """

    def __init__(self, pieces: Sequence[bytes], *, hang: bool = False, fail: Exception | None = None) -> None:
        self.pieces = list(pieces)
        self.hang = hang
        self.fail = fail
        self.closed = False
        self.sent = 0

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for piece in self.pieces:
            self.sent += 1
            yield piece
        if self.fail is not None:
            raise self.fail
        if self.hang:
            await asyncio.Event().wait()

    async def aclose(self) -> None:
        self.closed = True


def make_client(handler: Handler, **kwargs: object) -> OpenAICompatClient:
    kwargs.setdefault("retry_backoff", 0.0)
    return OpenAICompatClient(
        "http://llm.test:8001/v1",
        "smol",
        transport=httpx.MockTransport(handler),
        **kwargs,  # type: ignore[arg-type]
    )


async def collect(stream: AsyncIterator[StreamDelta]) -> list[StreamDelta]:
    return [delta async for delta in stream]


def vllm_completion_chunk(
    text: str, token_lp: float, alt: str, alt_lp: float, finish: str | None = None
) -> dict[str, Any]:
    return {
        "id": "cmpl-1",
        "object": "text_completion",
        "created": 1,
        "model": "smol",
        "choices": [
            {
                "index": 0,
                "text": text,
                "logprobs": {
                    "text_offset": [0],
                    "token_logprobs": [token_lp],
                    "tokens": [text],
                    "top_logprobs": [{alt: alt_lp, text: token_lp}],
                },
                "finish_reason": finish,
                "stop_reason": None,
            }
        ],
        "usage": None,
    }


# --- streaming, both server shapes ---------------------------------------------------------------


async def test_vllm_completion_stream_with_logprobs_and_usage() -> None:
    seen: list[httpx.Request] = []
    body = sse(
        vllm_completion_chunk("Hello", -0.1, "Hi", -2.5),
        vllm_completion_chunk(" world", -0.2, " there", -1.5),
        vllm_completion_chunk(".", -0.3, "!", -3.0, finish="stop"),
        {
            "id": "cmpl-1",
            "object": "text_completion",
            "choices": [],
            "usage": {"prompt_tokens": 5, "total_tokens": 8, "completion_tokens": 3},
        },
    )

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, content=body, headers={"content-type": "text/event-stream"})

    client = make_client(handler, api_key="secret")
    deltas = await collect(client.stream("Say hi", PARAMS))
    await client.aclose()

    assert "".join(d.text for d in deltas) == "Hello world."
    assert [d.finish_reason for d in deltas] == [None, None, "stop", None]
    assert deltas[-1].usage == Usage(prompt_tokens=5, completion_tokens=3)
    first = deltas[0].tokens[0]
    assert (first.token, first.logprob) == ("Hello", -0.1)
    assert first.top == (("Hello", -0.1), ("Hi", -2.5))  # best first whatever the server's order
    assert math.isclose(first.prob, math.exp(-0.1))

    (request,) = seen
    assert request.url.path == "/v1/completions"
    assert request.headers["authorization"] == "Bearer secret"
    sent = json.loads(request.content)
    assert sent == {
        "model": "smol",
        "prompt": "Say hi",
        "max_tokens": 16,
        "temperature": 0.0,
        "top_p": 0.9,
        "top_k": 40,
        "stop": ["<|im_end|>"],
        "seed": 7,
        "logprobs": 2,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


async def test_llamacpp_shaped_stream_is_tolerated() -> None:
    """CRLF lines, no space after ``data:``, comments, prompt-based text_offset, an empty final chunk,
    extra fields, no usage, and events split across network reads."""
    events = [
        {
            "choices": [
                {
                    "index": 0,
                    "text": "Hi",
                    "logprobs": {
                        "text_offset": [120],
                        "tokens": ["Hi"],
                        "token_logprobs": [-0.5],
                        "top_logprobs": [{"Hi": -0.5}],
                    },
                    "finish_reason": None,
                }
            ],
            "timings": {"predicted_ms": 3.2},
        },
        {
            "choices": [
                {
                    "index": 0,
                    "text": " you",
                    "logprobs": {
                        "text_offset": [122],
                        "tokens": [" you"],
                        "token_logprobs": [-0.7],
                        "top_logprobs": [{" you": -0.7}],
                    },
                    "finish_reason": None,
                }
            ]
        },
        {"choices": [{"index": 0, "text": "", "logprobs": None, "finish_reason": "length"}], "timings": {}},
        {"choices": [{"index": 0, "text": "", "finish_reason": None}]},
    ]
    raw = b": keep-alive\r\n\r\n" + sse(*events, newline="\r\n", space=False)
    pieces = [raw[i : i + 7] for i in range(0, len(raw), 7)]

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, stream=ChunkedStream(pieces))

    client = make_client(handler)
    deltas = await collect(client.stream("p", PARAMS))
    assert "".join(d.text for d in deltas) == "Hi you"
    assert [t.token for d in deltas for t in d.tokens] == ["Hi", " you"]
    assert deltas[-1].finish_reason == "length"
    assert all(d.usage is None for d in deltas)


async def test_chat_stream_role_delta_logprobs_content_and_usage() -> None:
    seen: list[dict[str, Any]] = []
    body = sse(
        {
            "choices": [
                {
                    "index": 0,
                    "delta": {"role": "assistant", "content": ""},
                    "logprobs": None,
                    "finish_reason": None,
                }
            ]
        },
        {
            "choices": [
                {
                    "index": 0,
                    "delta": {"content": "Yes"},
                    "logprobs": {
                        "content": [
                            {
                                "token": "Yes",
                                "logprob": -0.01,
                                "bytes": [89, 101, 115],
                                "top_logprobs": [
                                    {"token": "No", "logprob": -4.0},
                                    {"token": "Yes", "logprob": -0.01},
                                ],
                            }
                        ]
                    },
                    "finish_reason": None,
                }
            ]
        },
        {"choices": [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}]},
        {"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 1, "total_tokens": 10}},
    )

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(json.loads(request.content))
        assert request.url.path == "/v1/chat/completions"
        return httpx.Response(200, content=body)

    client = make_client(handler)
    completion = await client.chat([ChatMessage("system", "S"), ChatMessage("user", "Q?")], PARAMS)
    assert completion.text == "Yes"
    assert completion.finish_reason == "stop"
    assert completion.usage == Usage(9, 1)
    assert completion.tokens[0].top == (("Yes", -0.01), ("No", -4.0))
    assert seen[0]["messages"] == [{"role": "system", "content": "S"}, {"role": "user", "content": "Q?"}]
    assert (seen[0]["logprobs"], seen[0]["top_logprobs"]) == (True, 2)


async def test_complete_gathers_the_stream() -> None:
    body = sse(
        vllm_completion_chunk("A", -0.1, "B", -1.0),
        vllm_completion_chunk("B", -0.1, "C", -1.0, finish="stop"),
    )
    client = make_client(lambda request: httpx.Response(200, content=body))
    completion = await client.complete("p", GenerationParams())
    assert (completion.text, completion.finish_reason, len(completion.tokens)) == ("AB", "stop", 2)


async def test_repetition_penalty_is_sent_under_both_names() -> None:
    """llama.cpp's servers read ``repeat_penalty`` and ignore ``repetition_penalty`` (llama-cpp-python
    then applies its own 1.1); vLLM reads ``repetition_penalty`` and ignores unknown fields."""
    seen: list[dict[str, Any]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(json.loads(request.content))
        return httpx.Response(200, content=sse(vllm_completion_chunk("A", -0.1, "B", -1.0, finish="stop")))

    client = make_client(handler)
    await client.complete("p", GenerationParams(repetition_penalty=1.3))
    await client.complete("p", GenerationParams())
    assert (seen[0]["repetition_penalty"], seen[0]["repeat_penalty"]) == (1.3, 1.3)
    assert "repetition_penalty" not in seen[1] and "repeat_penalty" not in seen[1]


async def test_frequency_and_presence_penalties_are_sent_only_when_set() -> None:
    seen: list[dict[str, Any]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(json.loads(request.content))
        return httpx.Response(200, content=sse(vllm_completion_chunk("A", -0.1, "B", -1.0, finish="stop")))

    client = make_client(handler)
    await client.complete("p", GenerationParams(frequency_penalty=0.4, presence_penalty=0.2))
    await client.complete("p", GenerationParams())
    assert (seen[0]["frequency_penalty"], seen[0]["presence_penalty"]) == (0.4, 0.2)
    assert "frequency_penalty" not in seen[1] and "presence_penalty" not in seen[1]


async def _lines(items: Sequence[str]) -> AsyncIterator[str]:
    for item in items:
        yield item


async def test_sse_parser_rules() -> None:
    lines = [
        ": comment",
        "event: message",
        "id: 3",
        'data: {"a":',
        "data: 1}",
        "",
        "",
        'data: {"b": 2}',
        'data: {"c": 3}',  # no blank line between two complete events
        "retry: 100",
        "",
        "data:[DONE]",
    ]
    assert [d async for d in iter_sse_data(_lines(lines))] == ['{"a":\n1}', '{"b": 2}', '{"c": 3}', "[DONE]"]


# --- errors --------------------------------------------------------------------------------------


def counting(handler: Handler) -> tuple[Handler, list[int]]:
    calls: list[int] = []

    def wrapped(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        return handler(request)

    return wrapped, calls


@pytest.mark.parametrize(
    ("status", "body", "error", "check"),
    [
        (
            400,
            {
                "object": "error",
                "message": (
                    "This model's maximum context length is 2048 tokens. However, your request has 3000 "
                    "input tokens. Please reduce the length of the input messages."
                ),
                "type": "BadRequestError",
                "code": 400,
            },
            ContextTooLong,
            lambda e: (e.max_context, e.prompt_tokens) == (2048, 3000),
        ),
        (
            400,
            {
                "error": {
                    "message": (
                        "'max_tokens' or 'max_completion_tokens' is too large: 500. This model's "
                        "maximum context length is 2048 tokens and your request has 1700 input tokens "
                        "(500 > 2048 - 1700)."
                    ),
                    "type": "BadRequestError",
                    "param": None,
                    "code": 400,
                }
            },
            ContextTooLong,
            lambda e: (e.max_context, e.prompt_tokens) == (2048, 1700),
        ),
        (
            400,
            {
                "error": {
                    "message": (
                        "This model's maximum context length is 2048 tokens. However, your prompt contains at "
                        "least 2049 input tokens, which exceeds this limit even without any output tokens."
                    ),
                    "type": "BadRequestError",
                    "code": 400,
                }
            },
            ContextTooLong,
            lambda e: (e.max_context, e.prompt_tokens) == (2048, 2049),
        ),
        (
            400,
            {
                "error": {
                    "code": 400,
                    "message": "the request exceeds the available context size, try increasing it",
                    "type": "exceed_context_size_error",
                    "n_prompt_tokens": 2100,
                    "n_ctx": 2048,
                }
            },
            ContextTooLong,
            lambda e: (e.max_context, e.prompt_tokens) == (2048, 2100),
        ),
        (
            400,
            {"error": {"message": "temperature must be non-negative", "code": 400}},
            LLMBadRequest,
            lambda e: e.status_code == 400,
        ),
        (
            404,
            {"error": {"message": "The model `x` does not exist.", "code": 404}},
            LLMBadRequest,
            lambda e: "does not exist" in str(e),
        ),
        (422, {"detail": [{"msg": "field required"}]}, LLMBadRequest, lambda e: e.status_code == 422),
        (500, "Internal Server Error", LLMError, lambda e: type(e) is LLMError and e.status_code == 500),
        (504, "", LLMUnavailable, lambda e: e.retryable),
        (408, "", LLMTimeout, lambda e: e.retryable),
    ],
)
async def test_error_statuses_map_to_the_error_tree(
    status: int, body: object, error: type[LLMError], check: Callable[[LLMError], bool]
) -> None:
    content = body.encode() if isinstance(body, str) else json.dumps(body).encode()
    handler, calls = counting(lambda request: httpx.Response(status, content=content))
    client = make_client(handler)
    with pytest.raises(error) as info:
        await client.complete("p", PARAMS)
    assert check(info.value)
    assert len(calls) == 1  # none of these is retried


async def test_503_is_retried_then_succeeds() -> None:
    body = sse(vllm_completion_chunk("ok", -0.1, "no", -2.0, finish="stop"))
    responses = [httpx.Response(503, headers={"Retry-After": "0"}), httpx.Response(200, content=body)]
    handler, calls = counting(lambda request: responses.pop(0))
    client = make_client(handler)
    assert (await client.complete("p", PARAMS)).text == "ok"
    assert len(calls) == 2


async def test_503_retries_are_bounded_and_carry_retry_after() -> None:
    handler, calls = counting(
        lambda request: httpx.Response(503, headers={"Retry-After": "0"}, json={"error": {"message": "busy"}})
    )
    client = make_client(handler, max_retries=2)
    with pytest.raises(LLMUnavailable) as info:
        await client.complete("p", PARAMS)
    assert len(calls) == 3
    assert info.value.retry_after == 0.0
    assert info.value.status_code == 503
    assert str(info.value) == "busy"


async def test_connect_error_is_retried_then_becomes_unavailable() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    handler, calls = counting(refuse)
    client = make_client(handler, max_retries=2)
    with pytest.raises(LLMUnavailable) as info:
        await client.complete("p", PARAMS)
    assert len(calls) == 3
    assert isinstance(info.value.__cause__, httpx.ConnectError)
    assert "llm.test:8001" in str(info.value)


async def test_read_timeout_is_not_retried() -> None:
    def slow(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("timed out", request=request)

    handler, calls = counting(slow)
    client = make_client(handler)
    with pytest.raises(LLMTimeout):
        await client.complete("p", PARAMS)
    assert len(calls) == 1


async def test_connection_lost_mid_stream_is_never_retried() -> None:
    first = sse(vllm_completion_chunk("Hel", -0.1, "x", -2.0), done=False)
    handler, calls = counting(
        lambda request: httpx.Response(200, stream=ChunkedStream([first], fail=httpx.ReadError("reset")))
    )
    client = make_client(handler, max_retries=3)
    received: list[StreamDelta] = []
    with pytest.raises(LLMUnavailable):
        async for delta in client.stream("p", PARAMS):
            received.append(delta)
    assert [d.text for d in received] == ["Hel"]
    assert len(calls) == 1


@pytest.mark.parametrize(
    ("body", "error"),
    [
        (b"data: {not json}\n\n", LLMProtocolError),
        (b"data: [1, 2]\n\n", LLMProtocolError),
        (sse(vllm_completion_chunk("half", -0.1, "x", -1.0), done=False), LLMProtocolError),  # ends early
        (
            sse({"error": {"message": "This model's maximum context length is 2048 tokens.", "code": 400}}),
            ContextTooLong,
        ),
        (
            sse({"object": "error", "message": "engine dead", "type": "InternalServerError", "code": 500}),
            LLMError,
        ),
    ],
)
async def test_malformed_or_failing_streams(body: bytes, error: type[LLMError]) -> None:
    client = make_client(lambda request: httpx.Response(200, content=body))
    with pytest.raises(error):
        await client.complete("p", PARAMS)


# llama-cpp-python's answer to a prompt longer than its n_ctx, streamed: 200, then an event stream that
# ends with no event at all; unstreamed, the same request gets this 400 (recorded from 0.3.36).
LLAMA_CPP_PYTHON_TOO_LONG = {
    "error": {
        "message": "This model's maximum context length is 2048 tokens, however you requested 4002 tokens "
        "(4001 in your prompt; 1 for the completion). Please reduce your prompt; or completion length.",
        "type": "invalid_request_error",
        "param": "messages",
        "code": "context_length_exceeded",
    }
}


async def test_empty_stream_is_diagnosed_without_streaming() -> None:
    """The empty stream is asked about once more, unstreamed and for one token, and its 400 becomes
    ContextTooLong (not a protocol error, not "unavailable")."""
    seen: list[dict[str, Any]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        seen.append(body)
        if body["stream"]:
            return httpx.Response(200, content=b"", headers={"content-type": "text/event-stream"})
        return httpx.Response(400, json=LLAMA_CPP_PYTHON_TOO_LONG)

    client = make_client(handler, max_retries=0)
    with pytest.raises(ContextTooLong) as info:
        await client.complete("p" * 9000, PARAMS)
    assert (info.value.max_context, info.value.prompt_tokens, info.value.status_code) == (2048, 4001, 400)
    assert not info.value.retryable
    streamed, probe = seen
    assert (probe["stream"], probe["max_tokens"], "stream_options" in probe) == (False, 1, False)
    assert {k: v for k, v in probe.items() if k not in ("stream", "max_tokens")} == {
        k: v for k, v in streamed.items() if k not in ("stream", "max_tokens", "stream_options")
    }


async def test_empty_chat_stream_is_diagnosed_too() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if json.loads(request.content)["stream"]:
            return httpx.Response(200, content=b": ping\n\n")  # a comment is not an event
        return httpx.Response(400, json=LLAMA_CPP_PYTHON_TOO_LONG)

    client = make_client(handler)
    with pytest.raises(ContextTooLong):
        await client.chat([ChatMessage("user", "q" * 9000)], PARAMS)


async def test_empty_stream_whose_retry_works_is_a_protocol_error() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if json.loads(request.content)["stream"]:
            return httpx.Response(200, content=b"")
        return httpx.Response(200, json={"choices": [{"index": 0, "text": "x", "finish_reason": "length"}]})

    client = make_client(handler)
    with pytest.raises(LLMProtocolError, match="without any event"):
        await client.complete("p", PARAMS)


@pytest.mark.parametrize(
    "stale",
    [
        httpx.RemoteProtocolError("Server disconnected without sending a response."),
        httpx.ReadError("connection reset"),
        httpx.WriteError("broken pipe"),
    ],
)
async def test_a_stale_pooled_connection_is_replaced_once(stale: httpx.HTTPError) -> None:
    """After llama-cpp-python's failed stream the server closes that keep-alive connection; the next
    request on it dies before any response byte. It is resent once, even with retries off."""
    ok = sse(vllm_completion_chunk("ok", -0.1, "no", -2.0, finish="stop"))
    failures = [stale]

    def handler(request: httpx.Request) -> httpx.Response:
        if failures:
            raise failures.pop()
        return httpx.Response(200, content=ok)

    counted, calls = counting(handler)
    client = make_client(counted, max_retries=0)
    assert (await client.complete("p", PARAMS)).text == "ok"
    assert len(calls) == 2

    failures.extend([httpx.ReadError("reset"), httpx.ReadError("reset again")])
    calls.clear()
    with pytest.raises(LLMUnavailable):  # a server that keeps dropping connections is down, not stale
        await client.complete("p", PARAMS)
    assert len(calls) == 2


async def test_tokenize_replaces_a_stale_connection_once() -> None:
    failures: list[Exception] = [httpx.RemoteProtocolError("Server disconnected without sending a response.")]

    def handler(request: httpx.Request) -> httpx.Response:
        if failures:
            raise failures.pop()
        return httpx.Response(200, json={"count": 2, "tokens": [5, 6]})

    client = make_client(handler, max_retries=0)
    assert await client.tokenize("a b") == [5, 6]


# --- cancellation --------------------------------------------------------------------------------


async def test_closing_the_stream_closes_the_upstream_response() -> None:
    upstream = ChunkedStream([sse(vllm_completion_chunk("Hi", -0.1, "x", -1.0), done=False)], hang=True)
    client = make_client(lambda request: httpx.Response(200, stream=upstream))
    stream = client.stream("p", PARAMS)
    first = await anext(stream)  # type: ignore[call-overload]
    assert first.text == "Hi"
    assert not upstream.closed
    await stream.aclose()  # type: ignore[attr-defined]
    assert upstream.closed


async def test_cancelling_the_consumer_closes_the_upstream_response() -> None:
    upstream = ChunkedStream([sse(vllm_completion_chunk("Hi", -0.1, "x", -1.0), done=False)], hang=True)
    client = make_client(lambda request: httpx.Response(200, stream=upstream))
    got_first = asyncio.Event()

    async def consume() -> None:
        async for _ in client.stream("p", PARAMS):
            got_first.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(got_first.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert upstream.closed


# --- tokenization --------------------------------------------------------------------------------


async def test_vllm_tokenize_is_used_and_counts_are_cached() -> None:
    bodies: list[dict[str, Any]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/tokenize"  # outside /v1, although base_url ended in /v1
        body = json.loads(request.content)
        bodies.append(body)
        n = len(body["prompt"].split())
        return httpx.Response(
            200, json={"count": n, "max_model_len": 2048, "tokens": list(range(n)), "token_strs": None}
        )

    client = make_client(handler)
    assert await client.count_tokens("one two three") == 3
    assert await client.count_tokens("one two three") == 3
    assert await client.tokenize("a b") == [0, 1]
    assert bodies[0] == {"model": "smol", "prompt": "one two three", "add_special_tokens": False}
    assert len(bodies) == 2


async def test_llamacpp_tokenize_shape_is_detected_once() -> None:
    bodies: list[dict[str, Any]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        bodies.append(body)
        # llama.cpp ignores unknown keys and tokenizes "content" (nothing when it is missing).
        return httpx.Response(200, json={"tokens": list(range(len(body.get("content", "").split())))})

    client = make_client(handler)
    assert await client.count_tokens("a b c d") == 4
    assert await client.count_tokens("e f") == 2
    assert [("prompt" in b, "content" in b) for b in bodies] == [(True, False), (False, True), (False, True)]


async def test_llama_cpp_python_extras_tokenize() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/extras/tokenize":
            return httpx.Response(200, json={"tokens": [1, 2, 3, 4, 5]})
        return httpx.Response(404, json={"detail": "Not Found"})

    client = make_client(handler)
    assert await client.count_tokens("whatever text") == 5


async def test_server_without_tokenize_falls_back_to_a_conservative_estimate() -> None:
    handler, calls = counting(lambda request: httpx.Response(404))
    client = make_client(handler)
    text = "x" * 100
    assert await client.count_tokens(text) == 34  # ceil(100 / 3)
    assert await client.count_tokens("y" * 10) == 4
    with pytest.raises(TokenizeUnsupported):
        await client.tokenize("z")
    assert len(calls) == 3  # probed once, then remembered


async def test_tokenize_when_the_server_is_down() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    client = make_client(refuse)
    with pytest.raises(LLMUnavailable):
        await client.count_tokens("text")


async def test_max_model_len_from_models_endpoint() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/v1/models"
        return httpx.Response(
            200, json={"object": "list", "data": [{"id": "other"}, {"id": "smol", "max_model_len": 2048}]}
        )

    client = make_client(handler)
    assert await client.max_model_len() == 2048
