"""Translation between the OpenAI chat-completions protocol and answer events.

Model names: ``rag`` (every collection the key may read), ``rag:<collection>``, or
``rag:<collection>:<mode>``; the extra body fields ``collections`` and ``mode`` do the same for
clients that cannot choose a model name freely. The last user message is the question, the
earlier user/assistant messages are the history (system messages are ignored: the service
has its own instruction). Citations stay in the content as ``[n]``; structured, they come twice:
as OpenAI's own ``annotations`` of the message (``url_citation``: the marker's span in the content,
the document's title and its ``rag://`` URI), which OpenAI-shaped clients already keep, and as
the extension field ``citations`` (the citation events, with the supporting snippet).

``finish_reason`` is always an OpenAI value (``stop``, ``length``): clients validate it. The
service's own reasons (``repetition``: the loop guard ended the answer) go in ``finish_detail``.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Sequence
from typing import Any

from pydantic import ValidationError

from app.schemas.ask import AskRequest
from app.schemas.common import document_uri
from app.schemas.events import CitationEvent as CitationOut
from app.schemas.events import wire_dict
from app.schemas.openai import (
    Annotation,
    AssistantMessage,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Choice,
    ChunkChoice,
    CompletionUsage,
    Delta,
    FinishReason,
    UrlCitation,
)
from app.services.errors import InvalidInput, NotFound
from generation.markers import iter_markers
from generation.rag import ANSWER_MODES
from generation.types import AnswerEvent, CitationEvent, DoneEvent, ErrorEvent, TokenEvent

logger = logging.getLogger(__name__)

MODEL = "rag"


def parse_model(model: str) -> tuple[str | None, str | None]:
    """``(collection, mode)`` named by a model name.

    Raises:
        NotFound: Not a model this facade serves.
    """
    parts = model.split(":")
    if parts[0] != MODEL or len(parts) > 3 or any(not p for p in parts[1:]):
        raise NotFound(f"model {model!r} does not exist; use 'rag', 'rag:<collection>' or 'rag:<collection>:<mode>'")
    collection = parts[1] if len(parts) > 1 else None
    mode = parts[2] if len(parts) > 2 else None
    if mode is not None and mode not in ANSWER_MODES:
        raise NotFound(f"model {model!r} names an unknown answer mode {mode!r}; modes: {', '.join(ANSWER_MODES)}")
    return collection, mode


def to_ask(body: ChatCompletionRequest) -> AskRequest:
    """The :class:`AskRequest` of a chat-completions request.

    Raises:
        NotFound: An unknown model name.
        InvalidInput: No final user message, or conflicting collection/mode.
    """
    collection, mode = parse_model(body.model)
    collections = [collection] if collection is not None else None
    requested = body.requested()
    if requested is not None:
        if collections is not None and collections != requested:
            raise InvalidInput("the model name and `collections` name different collections", field="body.collections")
        collections = requested
    if body.mode is not None:
        if mode is not None and mode != body.mode:
            raise InvalidInput("the model name and `mode` name different modes", field="body.mode")
        mode = body.mode
    turns = [m for m in body.messages if m.role in ("user", "assistant")]
    if not turns or turns[-1].role != "user" or not turns[-1].text().strip():
        raise InvalidInput("the last message must be a non-empty user message (the question)", field="body.messages")
    data: dict[str, Any] = {
        "question": turns[-1].text(),
        "collections": collections,
        "mode": mode,
        "k": body.k,
        "history": [{"role": m.role, "content": m.text()} for m in turns[:-1]],
        "max_tokens": body.max_completion_tokens or body.max_tokens,
        "temperature": body.temperature,
        "top_p": body.top_p,
        "seed": body.seed,
    }
    try:
        return AskRequest.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise InvalidInput(f"{where}: {first['msg']}", field=f"body.{where}") from e


def completion_id() -> str:
    """A fresh ``chatcmpl-...`` id."""
    return f"chatcmpl-{uuid.uuid4().hex}"


def _citations(events: tuple[CitationEvent, ...] | list[CitationEvent]) -> list[CitationOut]:
    return [CitationOut.model_validate(wire_dict(c)) for c in events]


def finish(reason: str | None) -> tuple[FinishReason, str | None]:
    """``(finish_reason, finish_detail)``: OpenAI's value, and the service's own reason when it has
    none (``repetition`` and anything else a mode reports end the answer normally: ``stop``)."""
    if reason is None or reason == "stop":
        return "stop", None
    if reason == "length":
        return "length", None
    return "stop", reason


def citation_annotations(answer: str, citations: Sequence[CitationEvent]) -> list[Annotation]:
    """One ``url_citation`` per cited source: the span of the first marker naming it in ``answer``
    (the whole answer for a source attributed without a marker)."""
    first: dict[int, tuple[int, int]] = {}
    for start, end, numbers in iter_markers(answer):
        for n in numbers:
            first.setdefault(n, (start, end))
    out = []
    for c in citations:
        start, end = first.get(c.n, (0, len(answer)))
        title = f"[{c.n}] {c.title or c.path}"
        url = document_uri(c.chunk.collection, c.document_id)
        out.append(Annotation(url_citation=UrlCitation(start_index=start, end_index=end, title=title, url=url)))
    return out


def completion(done: DoneEvent, *, model: str) -> ChatCompletion:
    """The whole ``chat.completion`` object of an answer."""
    usage = done.usage
    reason, detail = finish(done.finish_reason)
    message = AssistantMessage(content=done.answer, annotations=citation_annotations(done.answer, done.citations))
    return ChatCompletion(
        id=completion_id(),
        created=int(time.time()),
        model=model,
        choices=[Choice(message=message, finish_reason=reason, finish_detail=detail)],
        usage=CompletionUsage(
            prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens,
            total_tokens=usage.total_tokens,
        ),
        citations=_citations(done.citations),
        no_answer=done.no_answer,
    )


def _data(payload: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n".encode()


class ChunkEncoder:
    """Turns answer events into ``chat.completion.chunk`` SSE frames (stateful: one per stream)."""

    def __init__(self, *, model: str, include_usage: bool) -> None:
        self.id = completion_id()
        self.created = int(time.time())
        self.model = model
        self.include_usage = include_usage
        self._started = False
        self._pending: list[CitationEvent] = []

    def _chunk(
        self, delta: Delta, *, finish_reason: FinishReason | None = None, finish_detail: str | None = None, **extra: Any
    ) -> bytes:
        chunk = ChatCompletionChunk(
            id=self.id,
            created=self.created,
            model=self.model,
            choices=[ChunkChoice(delta=delta, finish_reason=finish_reason, finish_detail=finish_detail)],
            **extra,
        )
        return _data(chunk.model_dump(mode="json", exclude_none=True))

    def encode(self, event: AnswerEvent) -> bytes:
        """The frames for one event (possibly none)."""
        out = b""
        if not self._started and not isinstance(event, ErrorEvent):
            self._started = True
            out += self._chunk(Delta(role="assistant", content=""))
        if isinstance(event, CitationEvent):
            self._pending.append(event)
        elif isinstance(event, TokenEvent):
            citations = _citations(self._pending) if self._pending else None
            self._pending = []
            out += self._chunk(Delta(content=event.text), citations=citations)
        elif isinstance(event, DoneEvent):
            reason, detail = finish(event.finish_reason)
            out += self._chunk(
                Delta(annotations=citation_annotations(event.answer, event.citations)),
                finish_reason=reason,
                finish_detail=detail,
                citations=_citations(event.citations),
                no_answer=event.no_answer or None,
            )
            if self.include_usage:
                u = event.usage
                usage = CompletionUsage(
                    prompt_tokens=u.prompt_tokens, completion_tokens=u.completion_tokens, total_tokens=u.total_tokens
                )
                payload = ChatCompletionChunk(
                    id=self.id, created=self.created, model=self.model, choices=[], usage=usage
                ).model_dump(mode="json", exclude_none=True)
                out += _data(payload)
        elif isinstance(event, ErrorEvent):
            out += error_frame(event)
        return out


def error_frame(event: ErrorEvent) -> bytes:
    """An error inside a stream, as OpenAI sends it (clients raise on it)."""
    return _data({"error": {"code": event.code, "message": event.message, "type": event.code}})
