"""Retrieval queries built from a question and the conversation or the answer so far.

* :func:`standalone_query` — what a question asked in a conversation searches with (a follow-up that
  says nothing by itself carries the earlier question).
* :func:`continuation_query` — what a later retrieval round of an answer searches with.
"""

from __future__ import annotations

from collections.abc import Sequence

from generation.grounding import content_words
from generation.markers import drop_open_marker, strip_citations
from generation.types import ChatMessage

__all__ = ["continuation_query", "standalone_query"]


def standalone_query(question: str, history: Sequence[ChatMessage], *, min_words: int = 4) -> str:
    """The retrieval query of a question asked in a conversation.

    A follow-up with fewer than ``min_words`` content words ("Why is that?", "Can you explain that in
    more detail?") says nothing by itself: the last earlier user question is put before it. Any other
    question is its own query. (A rule, not a model: the embedded 135M model cannot rewrite queries.)
    """
    if len(content_words(question)) >= min_words:
        return question
    earlier = [m.content for m in history if m.role == "user" and m.content.strip()]
    return f"{earlier[-1].strip()}\n{question.strip()}" if earlier else question


def continuation_query(question: str, partial_answer: str, tail_words: int = 32) -> str:
    """The retrieval query of a later round: the question plus the end of the answer so far.

    In-context RALM retrieves with the last tokens of the prefix; the question is kept because
    the answer's first words alone often do not say what is being asked.
    """
    # A round can end inside a marker ("... [1"): drop that too, markers are noise to a retriever.
    words = drop_open_marker(strip_citations(partial_answer)).split()
    tail = " ".join(words[-tail_words:]) if tail_words > 0 else ""
    return f"{question.strip()}\n{tail}" if tail else question.strip()
