"""The OpenAI-compatible chat-completions facade on the wire.

Requests tolerate unknown fields (kept aside and logged, never used): OpenAI clients and chat UIs
send parameters of newer API versions, and refusing them would break those clients for no
gain (vLLM's OpenAI server does the same). Responses carry one extra field, ``citations``.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from app.schemas.common import CollectionsField, Text
from app.schemas.events import CitationEvent
from generation.rag import AnswerMode

FinishReason = Literal["stop", "length"]
"""The OpenAI values the facade sends (clients validate them; LangChain and LlamaIndex map them)."""

FINISH_DETAIL = (
    "Extension: the service's own reason when it is not an OpenAI value, e.g. `repetition` "
    "(the loop guard ended the answer; `finish_reason` is then `stop`)."
)


class ContentPart(BaseModel):
    """A part of a multi-part message; only text parts are read."""

    model_config = ConfigDict(extra="ignore")

    type: str
    text: Text | None = None


class ChatMessageIn(BaseModel):
    """A message of the conversation."""

    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Annotated[Text, StringConstraints(max_length=20_000)] | list[ContentPart] | None = None

    def text(self) -> str:
        """The message's text (text parts joined)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text or "" for p in self.content if p.type == "text")


class StreamOptions(BaseModel):
    """``stream_options``."""

    model_config = ConfigDict(extra="ignore")

    include_usage: bool = False


class ChatCompletionRequest(CollectionsField):
    """``POST /v1/chat/completions``: the last user message is the question.

    The collections and answer mode come from the model name (``rag``, ``rag:<collection>``,
    ``rag:<collection>:<mode>``) or from the extension fields ``collections`` (a name or a list;
    ``collection`` is its deprecated spelling) and ``mode``.
    """

    model_config = ConfigDict(extra="allow")

    model: Annotated[str, StringConstraints(min_length=1, max_length=300)]
    messages: Annotated[list[ChatMessageIn], Field(min_length=1, max_length=200)]
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(default=None, ge=1, le=4096)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=4096)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=0, le=2**31 - 1)
    n: int = Field(default=1, ge=1, le=1, description="Only one choice is supported.")
    user: str | None = None
    mode: AnswerMode | None = Field(default=None, description="Extension: the answer mode.")
    k: int | None = Field(default=None, ge=1, le=50, description="Extension: chunks retrieved per round.")


class UrlCitation(BaseModel):
    """OpenAI's ``url_citation``: a source cited by the characters ``start_index:end_index`` of the content."""

    start_index: int = Field(description="Where the `[n]` marker starts in the message content.")
    end_index: int
    title: str = Field(description="`[n]` and the document's title or path.")
    url: str = Field(description="`rag://<collection>/documents/<id>`: the document's MCP resource.")


class Annotation(BaseModel):
    """A message annotation, in the shape OpenAI clients already keep (``message.annotations``)."""

    type: Literal["url_citation"] = "url_citation"
    url_citation: UrlCitation


class AssistantMessage(BaseModel):
    """The answer."""

    role: Literal["assistant"] = "assistant"
    content: str
    annotations: list[Annotation] = Field(
        default_factory=list, description="The cited sources (also in the extension field `citations`)."
    )


class Choice(BaseModel):
    """The one choice."""

    index: int = 0
    message: AssistantMessage
    finish_reason: FinishReason
    finish_detail: str | None = Field(default=None, description=FINISH_DETAIL)
    logprobs: None = None


class CompletionUsage(BaseModel):
    """Token usage."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletion(BaseModel):
    """A whole chat completion, plus ``citations``."""

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: CompletionUsage
    citations: list[CitationEvent] = Field(description="Extension: the sources cited as `[n]` in the content.")
    no_answer: bool = Field(
        default=False,
        description="Extension: the documents do not cover the question (the grounding guard abstained; "
        "the content says so and the closest sources are cited).",
    )


class Delta(BaseModel):
    """A piece of the streamed message."""

    role: Literal["assistant"] | None = None
    content: str | None = None
    annotations: list[Annotation] | None = Field(default=None, description="On the last chunk: every cited source.")


class ChunkChoice(BaseModel):
    """The streamed choice."""

    index: int = 0
    delta: Delta
    finish_reason: FinishReason | None = None
    finish_detail: str | None = Field(default=None, description=FINISH_DETAIL)
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    """One streamed chunk; ``citations`` appears on the chunk whose content first cites a source."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: CompletionUsage | None = None
    citations: list[CitationEvent] | None = None
    no_answer: bool | None = Field(
        default=None, description="Extension, on the last chunk: the documents do not cover the question."
    )


class ModelOut(BaseModel):
    """A model name the facade accepts."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "ragsvc"


class ModelList(BaseModel):
    """``GET /v1/models``."""

    object: Literal["list"] = "list"
    data: list[ModelOut]
