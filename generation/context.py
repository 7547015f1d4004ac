"""Fitting sources and history into the model's context window, by tokens.

Pure functions: every one takes ``count_tokens(text) -> int`` (see
:mod:`generation.tokenizer`), so they are unit-testable with any counter.

Budget of one request::

    max_model_len
      - max_tokens                    reserved for the answer (what is left of it, when continuing)
      - skeleton                      system prompt + question + reminder + template tokens + assistant prefix
      - margin                        slack for counting drift (separators, headers, estimates)
      = available
      - history (≤ history_max_tokens, most recent turns first, whole turns only)
      = source budget                 filled best-ranked first; the first source that does not fit
                                      whole is trimmed if a useful part fits, and everything ranked
                                      below it is dropped.

The kept sources are always a prefix of the ranking, so numbering them in rank order gives
the same numbers whatever is dropped: :func:`assign_numbers` can be called before fitting
(to prime a token cache with the exact source blocks) and agrees with the result.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from generation.errors import ContextTooLong
from generation.prompts import (
    SYSTEM_PROMPT,
    ChatTemplate,
    build_messages,
    format_source,
    normalize_whitespace,
)
from generation.tokenizer import TokenCount
from generation.types import ChatMessage
from retrieval.types import Chunk

__all__ = [
    "MESSAGE_OVERHEAD_TOKENS",
    "SOURCE_SEPARATOR_TOKENS",
    "ContextPlan",
    "FittedSources",
    "NumberedSource",
    "assign_numbers",
    "fit_history",
    "fit_sources",
    "history_tokens",
    "plan_context",
    "skeleton_prompt",
    "trim_to_tokens",
]

# ChatML wraps each message in "<|im_start|>role\n" ... "<|im_end|>\n": 5 tokens with SmolLM2's
# tokenizer; 6 leaves room for tokenizers that split the role name.
MESSAGE_OVERHEAD_TOKENS = 6
# The blank line between two source blocks.
SOURCE_SEPARATOR_TOKENS = 2
_ELLIPSIS = " …"


@dataclass(frozen=True, slots=True)
class NumberedSource:
    """A source as it appears in the prompt: its citation number, the chunk, the text shown."""

    n: int
    chunk: Chunk
    text: str
    trimmed: bool = False

    @property
    def block(self) -> str:
        """The formatted block (header + text) that goes into the prompt."""
        return format_source(self.n, self.chunk, self.text)


@dataclass(frozen=True, slots=True)
class FittedSources:
    """The result of :func:`fit_sources`.

    Attributes:
        sources: Kept sources in rank order (the last may be trimmed).
        dropped: Chunks that did not fit, in rank order.
        tokens: Tokens the kept blocks use, separators included.
    """

    sources: tuple[NumberedSource, ...]
    dropped: tuple[Chunk, ...]
    tokens: int


@dataclass(frozen=True, slots=True)
class ContextPlan:
    """A prompt ready to send, and how it was assembled.

    Attributes:
        prompt: The rendered prompt text.
        messages: The conversation it renders.
        sources: Sources in the prompt, with their numbers.
        dropped: Retrieved chunks left out for lack of room.
        history: The history turns that were kept.
        prompt_tokens: ``count_tokens(prompt)`` with the counter it was planned with.
        source_budget: Tokens that were available for sources.
    """

    prompt: str
    messages: tuple[ChatMessage, ...]
    sources: tuple[NumberedSource, ...]
    dropped: tuple[Chunk, ...]
    history: tuple[ChatMessage, ...]
    prompt_tokens: int
    source_budget: int


def assign_numbers(
    chunks: Sequence[Chunk], numbering: Mapping[int, int] | None = None, next_number: int = 1
) -> list[int]:
    """Citation numbers for ``chunks`` in rank order.

    A chunk that already has a number (``numbering``: chunk id → number, from earlier rounds)
    keeps it; the others get ``next_number``, ``next_number + 1``, ... in rank order.
    """
    numbering = numbering or {}
    numbers: list[int] = []
    for chunk in chunks:
        known = numbering.get(chunk.id)
        if known is None:
            known = next_number
            next_number += 1
        numbers.append(known)
    return numbers


def trim_to_tokens(text: str, max_tokens: int, count_tokens: TokenCount) -> str:
    """The longest word-boundary prefix of ``text`` (plus `` …``) that counts at most ``max_tokens``.

    Returns ``""`` when not even a few words fit.
    """
    text = normalize_whitespace(text)
    if count_tokens(text) <= max_tokens:
        return text
    total = max(count_tokens(text), 1)
    # Start from the proportional cut and shrink by 10% until it fits: a handful of counts at most.
    chars = int(len(text) * max_tokens / total)
    while chars > 0:
        cut = text[:chars]
        space = cut.rfind(" ")
        if space > 0:
            cut = cut[:space]
        candidate = cut.rstrip() + _ELLIPSIS
        if count_tokens(candidate) <= max_tokens:
            return candidate
        chars = min(len(cut), int(chars * 0.9))
    return ""


def fit_sources(
    chunks: Sequence[Chunk],
    budget: int,
    count_tokens: TokenCount,
    *,
    numbering: Mapping[int, int] | None = None,
    next_number: int = 1,
    min_trim_tokens: int = 48,
) -> FittedSources:
    """Keep the best-ranked chunks whose blocks fit ``budget`` tokens.

    Args:
        chunks: Candidates, best first.
        budget: Tokens available for all source blocks and their separators.
        count_tokens: Token counter.
        numbering: Numbers already given (chunk id → number); see :func:`assign_numbers`.
        next_number: First number for chunks without one.
        min_trim_tokens: A source is trimmed to the leftover budget only when at least this many
            tokens of its text would remain; below that a stub is more confusing than useful.

    Returns:
        Kept sources (a prefix of ``chunks``, the last possibly trimmed) and the dropped rest.
    """
    numbers = assign_numbers(chunks, numbering, next_number)
    kept: list[NumberedSource] = []
    used = 0
    for index, (chunk, n) in enumerate(zip(chunks, numbers, strict=True)):
        separator = SOURCE_SEPARATOR_TOKENS if kept else 0
        source = NumberedSource(n, chunk, normalize_whitespace(chunk.text))
        cost = count_tokens(source.block) + separator
        if used + cost <= budget:
            kept.append(source)
            used += cost
            continue
        # The first chunk that does not fit whole: trim it if a useful part fits, drop the rest.
        header_cost = count_tokens(format_source(n, chunk, "")) + separator + 1
        room = budget - used - header_cost
        text = trim_to_tokens(chunk.text, room, count_tokens) if room >= min_trim_tokens else ""
        if text:
            trimmed = NumberedSource(n, chunk, text, trimmed=True)
            kept.append(trimmed)
            used += count_tokens(trimmed.block) + separator
        return FittedSources(tuple(kept), tuple(chunks[index + 1 if text else index :]), used)
    return FittedSources(tuple(kept), (), used)


def _turns(history: Sequence[ChatMessage]) -> list[list[ChatMessage]]:
    """Group messages into turns, each starting at a user message."""
    turns: list[list[ChatMessage]] = []
    for message in history:
        if message.role == "system":
            continue
        if message.role == "user" or not turns:
            turns.append([message])
        else:
            turns[-1].append(message)
    return turns


def fit_history(history: Sequence[ChatMessage], budget: int, count_tokens: TokenCount) -> tuple[ChatMessage, ...]:
    """The most recent whole turns of ``history`` that fit ``budget`` tokens, oldest first.

    A turn is a user message and the assistant replies after it; turns are never split and the
    kept ones are contiguous up to the present (an older turn never skips a newer one).
    """
    kept: list[list[ChatMessage]] = []
    used = 0
    for turn in reversed(_turns(history)):
        cost = sum(count_tokens(m.content) + MESSAGE_OVERHEAD_TOKENS for m in turn)
        if used + cost > budget:
            break
        kept.append(turn)
        used += cost
    return tuple(m for turn in reversed(kept) for m in turn)


def history_tokens(history: Sequence[ChatMessage], count_tokens: TokenCount) -> int:
    """Tokens ``history`` adds to a prompt."""
    return sum(count_tokens(m.content) + MESSAGE_OVERHEAD_TOKENS for m in history)


def skeleton_prompt(
    question: str,
    *,
    template: ChatTemplate,
    system_prompt: str = SYSTEM_PROMPT,
    assistant_prefix: str = "",
) -> str:
    """The prompt without sources or history: what every request pays for before any source."""
    return template.render(
        build_messages(question, (), (), system_prompt=system_prompt), assistant_prefix=assistant_prefix
    )


def plan_context(
    question: str,
    chunks: Sequence[Chunk],
    *,
    count_tokens: TokenCount,
    template: ChatTemplate,
    max_model_len: int,
    max_tokens: int,
    history: Sequence[ChatMessage] = (),
    history_max_tokens: int = 256,
    assistant_prefix: str = "",
    system_prompt: str = SYSTEM_PROMPT,
    numbering: Mapping[int, int] | None = None,
    next_number: int = 1,
    margin: int = 16,
    min_trim_tokens: int = 48,
) -> ContextPlan:
    """Assemble the prompt for one request within ``max_model_len`` tokens.

    Args:
        question: The user's question.
        chunks: Retrieved chunks, best first.
        count_tokens: Token counter.
        template: Chat template that renders the conversation.
        max_model_len: The model's context window.
        max_tokens: Tokens reserved for generation.
        history: Earlier turns, oldest first.
        history_max_tokens: Cap on the tokens history may take.
        assistant_prefix: Partial answer to continue (counted in the skeleton).
        system_prompt: The instruction.
        numbering: Numbers already given to chunks (chunk id → number).
        next_number: First number for new chunks.
        margin: Tokens kept free for counting drift.
        min_trim_tokens: See :func:`fit_sources`.

    Returns:
        The plan; ``prompt_tokens`` is counted with ``count_tokens``.

    Raises:
        ContextTooLong: Even without sources and history the prompt plus ``max_tokens`` overflow.
    """
    skeleton = skeleton_prompt(
        question, template=template, system_prompt=system_prompt, assistant_prefix=assistant_prefix
    )
    available = max_model_len - max_tokens - count_tokens(skeleton) - margin
    if available < 0:
        raise ContextTooLong(
            "the question (and the answer so far) leave no room in the context window",
            max_context=max_model_len,
            prompt_tokens=count_tokens(skeleton),
        )
    kept_history = fit_history(history, min(history_max_tokens, available), count_tokens)
    source_budget = available - history_tokens(kept_history, count_tokens)
    fitted = fit_sources(
        chunks,
        source_budget,
        count_tokens,
        numbering=numbering,
        next_number=next_number,
        min_trim_tokens=min_trim_tokens,
    )
    messages = build_messages(question, [s.block for s in fitted.sources], kept_history, system_prompt=system_prompt)
    prompt = template.render(messages, assistant_prefix=assistant_prefix)
    return ContextPlan(
        prompt=prompt,
        messages=tuple(messages),
        sources=fitted.sources,
        dropped=fitted.dropped,
        history=kept_history,
        prompt_tokens=count_tokens(prompt),
        source_budget=source_budget,
    )
