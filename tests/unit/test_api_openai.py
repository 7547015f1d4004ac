"""The OpenAI-compatible facade, driven by the official ``openai`` client (in process)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from openai import APIStatusError, BadRequestError, NotFoundError, OpenAI, UnprocessableEntityError

from app.api.openai_compat import parse_model
from app.services.errors import NotFound
from tests.unit.api_support import ANSWER, CORPUS, Api, make_api  # noqa: F401

pytestmark = pytest.mark.unit


@pytest.fixture
def api(make_api: Callable[..., Api]) -> Api:  # noqa: F811
    api = make_api()
    api.seed("docs", CORPUS)
    api.seed("other", {"/other/x.md": "Unrelated text about gardening."})
    return api


@pytest.fixture
def client(api: Api) -> OpenAI:
    return OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=api.client, max_retries=0)


def test_non_streaming_completion_keeps_citations(client: OpenAI, api: Api) -> None:
    completion = client.chat.completions.create(
        model="rag:docs",
        messages=[
            {"role": "system", "content": "You are a pirate."},
            {"role": "user", "content": "How do I join paths in Python?"},
        ],
    )
    assert completion.object == "chat.completion" and completion.model == "rag:docs"
    assert completion.choices[0].message.content == ANSWER  # "[1]" kept in the content
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None and completion.usage.completion_tokens > 0
    citations = completion.model_extra["citations"]  # type: ignore[index]
    assert citations[0]["n"] == 1 and citations[0]["path"] == "/docs/python/paths.md"
    assert "pirate" not in api.llm.calls[-1].prompt  # the service keeps its own instruction


def test_streaming_completion(client: OpenAI) -> None:
    stream = client.chat.completions.create(
        model="rag",
        messages=[{"role": "user", "content": "How do I join paths?"}],
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"collection": "docs", "mode": "single"},
    )
    chunks = list(stream)
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == ANSWER
    assert chunks[0].choices[0].delta.role == "assistant"
    finish = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish[-1].choices[0].finish_reason == "stop"
    assert finish[-1].model_extra["citations"][0]["n"] == 1  # type: ignore[index]
    first_cited = next(c for c in chunks if c.model_extra and c.model_extra.get("citations"))
    assert "[1]" in (first_cited.choices[0].delta.content or "")
    assert chunks[-1].usage is not None and chunks[-1].choices == []


def test_history_is_passed_on(client: OpenAI, api: Api) -> None:
    client.chat.completions.create(
        model="rag:docs",
        messages=[
            {"role": "user", "content": "What is git rebase?"},
            {"role": "assistant", "content": "It rewrites history."},
            {"role": "user", "content": [{"type": "text", "text": "And how do I squash?"}]},  # type: ignore[list-item]
        ],
    )
    prompt = api.llm.calls[-1].prompt
    assert "What is git rebase?" in prompt and "It rewrites history." in prompt and "And how do I squash?" in prompt


def test_unknown_models_and_bad_requests(client: OpenAI) -> None:
    with pytest.raises(NotFoundError):
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(NotFoundError):
        client.chat.completions.create(model="rag:missing", messages=[{"role": "user", "content": "x"}])
    with pytest.raises((UnprocessableEntityError, BadRequestError)):
        client.chat.completions.create(model="rag", messages=[{"role": "assistant", "content": "x"}])
    with pytest.raises(APIStatusError) as conflict:
        client.chat.completions.create(
            model="rag:docs", messages=[{"role": "user", "content": "x"}], extra_body={"collection": "other"}
        )
    assert conflict.value.status_code == 422


def test_models_list(client: OpenAI) -> None:
    assert [m.id for m in client.models.list()] == ["rag", "rag:docs", "rag:other"]


def test_parse_model() -> None:
    assert parse_model("rag") == (None, None)
    assert parse_model("rag:docs") == ("docs", None)
    assert parse_model("rag:docs:interval") == ("docs", "interval")
    for bad in ("rag:", "rag:docs:guess", "rag:a:b:c", "llama"):
        with pytest.raises(NotFound):
            parse_model(bad)


def test_citations_are_also_openai_annotations(client: OpenAI, api: Api) -> None:
    completion = client.chat.completions.create(
        model="rag:docs", messages=[{"role": "user", "content": "How do I join paths in Python?"}]
    )
    message = completion.choices[0].message
    annotations = message.annotations or []
    assert len(annotations) == 1 and annotations[0].type == "url_citation"
    cited = annotations[0].url_citation
    content = message.content or ""
    assert content[cited.start_index : cited.end_index] == "[1]"
    doc = completion.model_extra["citations"][0]["document_id"]  # type: ignore[index]
    assert cited.url == f"rag://docs/documents/{doc}" and cited.title == "[1] paths.md"

    stream = client.chat.completions.create(
        model="rag:docs", messages=[{"role": "user", "content": "How do I join paths in Python?"}], stream=True
    )
    last = [c for c in stream if c.choices and c.choices[0].finish_reason][-1]
    streamed = (last.choices[0].delta.model_extra or {})["annotations"]
    assert streamed == [a.model_dump() for a in annotations]


def test_finish_reason_is_always_an_openai_value(make_api: Callable[..., Api]) -> None:  # noqa: F811
    from tests.unit.fakes_llm import FakeLLM, split_tokens

    loop = "Use os.path.join to combine parts. " * 12
    api = make_api(llm=FakeLLM(responder=lambda call: split_tokens(loop)))
    api.seed("docs", CORPUS)
    client = OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=api.client, max_retries=0)
    completion = client.chat.completions.create(model="rag:docs", messages=[{"role": "user", "content": "Join?"}])
    choice = completion.choices[0]
    assert choice.finish_reason == "stop" and (choice.model_extra or {})["finish_detail"] == "repetition"
    stream = client.chat.completions.create(
        model="rag:docs", messages=[{"role": "user", "content": "Join?"}], stream=True
    )
    last = [c for c in stream if c.choices and c.choices[0].finish_reason][-1]
    assert last.choices[0].finish_reason == "stop"
    assert (last.choices[0].model_extra or {})["finish_detail"] == "repetition"


def test_no_answer_reaches_openai_clients() -> None:
    # Issue 14: an abstention is a structured field in the OpenAI facade too, streamed or not.
    import json as json_module

    from app.api.openai_compat import ChunkEncoder, completion
    from generation.types import DoneEvent, Usage

    done = DoneEvent(
        answer="The documents do not cover this.",
        citations=(),
        retrievals=(),
        usage=Usage(1, 2),
        timings={},
        mode="single",
        finish_reason="guard",
        no_answer=True,
    )
    whole = completion(done, model="rag:docs")
    assert whole.no_answer and whole.choices[0].finish_reason == "stop"
    assert whole.choices[0].finish_detail == "guard"
    frames = ChunkEncoder(model="rag:docs", include_usage=False).encode(done).decode().split("\n\n")
    last = json_module.loads([f for f in frames if f.startswith("data: {")][-1][len("data: ") :])
    assert last["no_answer"] is True and last["choices"][0]["finish_reason"] == "stop"
