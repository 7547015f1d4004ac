"""Prompt wording and the chat template.

The default generator is SmolLM2-135M-Instruct with a 2048-token window, so the wording is
short and literal: one system instruction, the numbered sources right before the question
(small models attend most to the end of the prompt), and a one-line reminder after the
question. Each source is headed ``[n] title, page p``; the model cites with ``[n]``.

Conversation layout (ChatML)::

    <|im_start|>system
    {SYSTEM_PROMPT}<|im_end|>
    <|im_start|>user
    {earlier question}<|im_end|>          history: bare questions and answers,
    <|im_start|>assistant                   citation markers stripped (their numbers
    {earlier answer}<|im_end|>              referred to other sources)
    <|im_start|>user
    Sources:

    [1] Title, page 3
    text ...

    Question: {question}
    {ANSWER_REMINDER}<|im_end|>
    <|im_start|>assistant
    {assistant_prefix}                      the partial answer when continuing (interval, FLARE)

The answer modes render this text themselves and send it to the completions API (not the
chat API), so that a partial answer can be continued as an assistant prefix and token
counts are exact; :class:`ChatTemplate` is the seam for models with another template.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Protocol

from generation.markers import strip_citations
from generation.types import ChatMessage
from retrieval.types import Chunk

__all__ = [
    "ANSWER_REMINDER",
    "CHATML",
    "NO_ANSWER",
    "NO_SOURCES",
    "SYSTEM_PROMPT",
    "ChatMLTemplate",
    "ChatTemplate",
    "build_messages",
    "format_source",
    "normalize_whitespace",
    "render_chatml",
    "source_header",
    "user_message",
]

NO_ANSWER = "The sources do not answer this question."
"""What the model is told to say when the sources lack the answer (evaluations look for it)."""

SYSTEM_PROMPT = (
    "Answer the question using only the numbered sources. "
    "Cite the source of each fact with its number in brackets, like [1]. "
    f'If the sources do not contain the answer, say "{NO_ANSWER}"'
)

ANSWER_REMINDER = "Answer briefly from the sources and cite them like [1]."

NO_SOURCES = "Sources: none found."

_SPACES_RE = re.compile(r"[ \t\f\v\u00a0]+")
_BLANK_LINES_RE = re.compile(r"\n[ \t]*(?:\n[ \t]*)+")


def normalize_whitespace(text: str) -> str:
    """Collapse runs of spaces and of blank lines (PDF extraction is full of both); strip the ends."""
    text = _SPACES_RE.sub(" ", text.replace("\r\n", "\n").replace("\r", "\n"))
    return _BLANK_LINES_RE.sub("\n\n", text).strip()


def source_header(n: int, chunk: Chunk) -> str:
    """``[n] title, page p``; the title falls back to the file name, the page is omitted when unknown.

    No path: the 135M model copies a long absolute path from a header into its answer instead of the
    fact. On the test corpus under a pytest-length temporary path, INT8 SmolLM2 answered 1 of 10
    questions with paths in the headers, 4 with file names, 6 (twice) with neither; docs/llm.md.
    Citation events still carry the full path, so clients lose nothing.
    """
    title = (chunk.title or "").strip() or PurePosixPath(chunk.path).name or chunk.path
    return f"[{n}] {title}, page {chunk.page}" if chunk.page is not None else f"[{n}] {title}"


def format_source(n: int, chunk: Chunk, text: str | None = None) -> str:
    """The block for one source: its header line, then its text (``text`` overrides ``chunk.text``)."""
    body = normalize_whitespace(chunk.text if text is None else text)
    return f"{source_header(n, chunk)}\n{body}"


def user_message(question: str, source_blocks: Sequence[str]) -> str:
    """The final user turn: the source blocks, the question and the reminder."""
    sources = "Sources:\n\n" + "\n\n".join(source_blocks) if source_blocks else NO_SOURCES
    return f"{sources}\n\nQuestion: {question.strip()}\n{ANSWER_REMINDER}"


def build_messages(
    question: str,
    source_blocks: Sequence[str],
    history: Sequence[ChatMessage] = (),
    *,
    system_prompt: str = SYSTEM_PROMPT,
) -> list[ChatMessage]:
    """The conversation for one answer.

    Args:
        question: The user's question.
        source_blocks: Formatted sources (:func:`format_source`), in prompt order.
        history: Earlier turns, oldest first; system turns are dropped and citation markers are
            stripped from assistant turns (they pointed at sources this prompt may not contain).
        system_prompt: The instruction.

    Returns:
        ``[system, *history, user]``.
    """
    messages = [ChatMessage("system", system_prompt)]
    for turn in history:
        if turn.role == "system":
            continue
        content = strip_citations(turn.content) if turn.role == "assistant" else turn.content
        messages.append(ChatMessage(turn.role, content.strip()))
    messages.append(ChatMessage("user", user_message(question, source_blocks)))
    return messages


class ChatTemplate(Protocol):
    """Turns a conversation into the raw prompt text of a particular model family."""

    @property
    def name(self) -> str:
        """Template name, for logs and settings."""
        ...

    @property
    def stop(self) -> tuple[str, ...]:
        """Strings that end the assistant's turn; sent as stop sequences."""
        ...

    def render(self, messages: Sequence[ChatMessage], *, assistant_prefix: str = "") -> str:
        """The prompt that makes the model write (or continue, after ``assistant_prefix``) the next reply."""
        ...


def render_chatml(messages: Sequence[ChatMessage], *, assistant_prefix: str = "") -> str:
    """Render ``messages`` in ChatML and open an assistant turn that starts with ``assistant_prefix``.

    The open turn has no ``<|im_end|>``, so the model continues ``assistant_prefix`` verbatim.
    This is byte-for-byte SmolLM2's ``chat_template`` with ``add_generation_prompt=True``
    (when a system message is present) plus the prefix.
    """
    parts = [f"<|im_start|>{m.role}\n{m.content}<|im_end|>\n" for m in messages]
    parts.append(f"<|im_start|>assistant\n{assistant_prefix}")
    return "".join(parts)


@dataclass(frozen=True, slots=True)
class ChatMLTemplate:
    """ChatML (SmolLM2, Qwen, ...): ``<|im_start|>role\\ncontent<|im_end|>``."""

    name: str = "chatml"
    stop: tuple[str, ...] = ("<|im_end|>", "<|im_start|>", "<|endoftext|>")

    def render(self, messages: Sequence[ChatMessage], *, assistant_prefix: str = "") -> str:
        """See :func:`render_chatml`."""
        return render_chatml(messages, assistant_prefix=assistant_prefix)


CHATML = ChatMLTemplate()
