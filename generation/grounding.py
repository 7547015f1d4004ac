"""Grounding: which sentence of the sources supports each sentence of an answer.

Pure and mode-agnostic (no I/O, no event loop): :mod:`generation.guard` applies it to the answer
stream of every mode. The pieces:

- **Segmentation**: :mod:`generation.sentences`, the one sentence rule of the package (re-exported
  here for the guard and the evaluation); source chunks are segmented with ``soft_newlines``.
- **Support** (:class:`SupportScorer`): an answer sentence against every sentence of the sources in
  the prompt, ``score = w · cosine + (1 − w) · lexical``, where cosine comes from the embedding model
  the service already loaded (:class:`retrieval.types.Embedder`; without one the score is lexical
  only) and lexical is the share of the answer sentence's content words found in the source
  sentence. A number in the answer that its best chunk does not contain makes the sentence
  unsupported whatever the score. The verdict is ``supported`` when ``score >= threshold``.
  The result names the best chunk and the exact span of the supporting sentence in its text.
- **Re-pointing** (:func:`cite_targets`): a sentence citing ``[n]`` keeps ``n`` when source ``n``
  supports it; otherwise the citation moves to the source that does.
- **Extractive answer** (:func:`extractive_answer`): the source sentences that best answer the
  question, whole sentences only, at most ``max_words`` words: the leading sentences of the most
  relevant chunk (FAQ-style passages answer first and explain after), then the best sentences of
  other chunks while words remain.
- **Failure detectors** (:func:`copies_source_header`, :func:`normalise_sentence`): a sentence that
  copies a source header or a document id, a sentence that comes back.
- **Abstention** (:func:`abstains`): weak retrieval and weak relevance of the best source sentence.

Thresholds are arguments; their calibrated defaults live in :class:`generation.guard.GroundingParams`
(docs/grounding.md says how they were chosen).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import TYPE_CHECKING, Literal

from generation.markers import iter_markers, strip_citations
from generation.sentences import ITEM_LINE_RE, Segment, sentence_end, split_sentences
from retrieval.types import Chunk, Embedder

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

__all__ = [
    "STOPWORDS",
    "Pick",
    "Segment",
    "SourceSentence",
    "Support",
    "SupportScorer",
    "Verdict",
    "abstains",
    "cite_targets",
    "content_words",
    "copies_source_header",
    "extractive_answer",
    "marker_numbers",
    "normalise_sentence",
    "sentence_end",
    "split_sentences",
    "word_count",
]

Verdict = Literal["supported", "unsupported"]

# --- words ----------------------------------------------------------------------------------------

_WORD_RE = re.compile(r"[^\W_]+", re.UNICODE)
_NUMBER_RE = re.compile(r"(?<![\w.])\d+(?:[.,]\d+)*(?![\w])")
_STOPWORD_TEXT = (
    "a about after all also am an and any are as at be because been but by can could did do does doing "
    "for from had has have how i if in into is it its just may might more most much must my no not of on "
    "one only or other our out over own same should so some such than that the their them then there "
    "these they this those through to too under up us use used uses using very was we were what when "
    "where which while who whom why will with would you your"
)
STOPWORDS = frozenset(_STOPWORD_TEXT.split())
"""Words too common to say which sentence of a source supports a claim."""


def _stem(word: str) -> str:
    for suffix in ("ing", "ed", "es", "s"):
        if word.endswith(suffix) and len(word) - len(suffix) >= 3:
            return word[: -len(suffix)]
    return word


def content_words(text: str) -> frozenset[str]:
    """Lower-cased, lightly stemmed words of ``text`` without stopwords and citation markers."""
    words = (m.group(0).lower() for m in _WORD_RE.finditer(strip_citations(text)))
    return frozenset(_stem(w) for w in words if w not in STOPWORDS)


def word_count(text: str) -> int:
    """Words of ``text`` as a reader counts them (citation markers excluded)."""
    return len(strip_citations(text).split())


def normalise_sentence(text: str) -> str:
    """A sentence for comparison: no markers, enumerator, case, punctuation or extra spaces."""
    text = ITEM_LINE_RE.sub("", strip_citations(text), count=1)
    return " ".join(m.group(0).lower() for m in _WORD_RE.finditer(text))


def marker_numbers(text: str) -> list[int]:
    """Every number cited by ``[n]``-style markers in ``text``, in order, without repeats."""
    numbers: list[int] = []
    for _start, _end, cited in iter_markers(text):
        numbers.extend(n for n in cited if n not in numbers)
    return numbers


# --- support ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SourceSentence:
    """A sentence of a source chunk: ``chunk.text[start:end]``, cited as ``[n]`` in the prompt."""

    n: int
    chunk: Chunk
    start: int
    end: int
    kind: Literal["sentence", "fragment"]
    words: frozenset[str]
    position: int
    """Index of the sentence within its chunk."""

    @property
    def text(self) -> str:
        """The sentence as it stands in the chunk."""
        return self.chunk.text[self.start : self.end]


@dataclass(frozen=True, slots=True)
class Support:
    """How well the sources support one answer sentence.

    Attributes:
        verdict: ``supported`` when ``score >= threshold`` and no number is missing from the chunk.
        score: ``w · dense + (1 − w) · lexical`` of the best source sentence (0 with no sources).
        dense: Its cosine similarity (0 without an embedder).
        lexical: Share of the answer sentence's content words in it.
        source: The best source sentence, or ``None`` when there are no sources.
        by_number: The best score per citation number (what re-pointing reads).
        missing_numbers: Numbers of the answer sentence that the best chunk does not contain.
    """

    verdict: Verdict
    score: float
    dense: float
    lexical: float
    source: SourceSentence | None
    by_number: Mapping[int, float]
    missing_numbers: tuple[str, ...] = ()


def _numbers(text: str) -> set[str]:
    """Numbers stated in ``text`` (citation markers and a leading list enumerator are not numbers)."""
    text = ITEM_LINE_RE.sub("", strip_citations(text).lstrip(), count=1)
    return {m.group(0).replace(",", "") for m in _NUMBER_RE.finditer(text)}


class SupportScorer:
    """Scores answer sentences against the sentences of the sources in the prompt.

    One scorer per answer: :meth:`add_sources` as sources enter a prompt (every retrieval round),
    then :meth:`judge` each answer sentence and :meth:`relevance` for the question. Both embed with
    ``embedder`` (blocking CPU work: callers on an event loop run them in a thread).

    Args:
        embedder: The service's embedding model; ``None``: lexical overlap only.
        dense_weight: ``w`` in ``w · cosine + (1 − w) · lexical``.
        threshold: The support verdict's threshold on that score.
        min_sentence_words: Source sentences shorter than this are not candidates (headings, "Yes.").
        min_claim_words: An answer sentence with fewer content words is scored by cosine alone.
    """

    def __init__(
        self,
        embedder: Embedder | None,
        *,
        dense_weight: float = 0.5,
        threshold: float = 0.7,
        min_sentence_words: int = 3,
        min_claim_words: int = 3,
    ) -> None:
        if not 0.0 <= dense_weight <= 1.0:
            raise ValueError("dense_weight must be in [0, 1]")
        self.embedder = embedder
        self.dense_weight = dense_weight if embedder is not None else 0.0
        self.threshold = threshold
        self.min_sentence_words = min_sentence_words
        self.min_claim_words = min_claim_words
        self.sentences: list[SourceSentence] = []
        self.chunks: dict[int, Chunk] = {}
        self._vectors: npt.NDArray[np.float32] | None = None
        self._chunk_numbers: dict[int, set[str]] = {}

    def add_sources(self, sources: Mapping[int, Chunk]) -> None:
        """Segment (and embed) the sources not seen yet; ``sources`` maps citation number → chunk."""
        new: list[SourceSentence] = []
        for n, chunk in sources.items():
            if n in self.chunks:
                continue
            self.chunks[n] = chunk
            self._chunk_numbers[n] = _numbers(chunk.text)
            for position, seg in enumerate(split_sentences(chunk.text, soft_newlines=True)):
                if len(seg.text.split()) < self.min_sentence_words:
                    continue
                new.append(SourceSentence(n, chunk, seg.start, seg.end, seg.kind, content_words(seg.text), position))
        if not new:
            return
        self.sentences.extend(new)
        if self.embedder is not None:
            import numpy as np

            vectors = np.asarray(self.embedder.embed_documents([s.text for s in new]), dtype=np.float32)
            self._vectors = vectors if self._vectors is None else np.vstack([self._vectors, vectors])

    def _dense(self, text: str) -> list[float]:
        if self.embedder is None or self._vectors is None:
            return [0.0] * len(self.sentences)
        import numpy as np

        query = np.asarray(self.embedder.embed_query(text), dtype=np.float32)
        return [float(x) for x in self._vectors @ query]

    def _scores(self, text: str, words: frozenset[str]) -> list[tuple[float, float, float]]:
        """``(score, dense, lexical)`` of ``text`` against every source sentence (lexical = recall of ``words``)."""
        dense = self._dense(text)
        w = self.dense_weight
        out: list[tuple[float, float, float]] = []
        # With fewer than ``min_claim_words`` content words the overlap share says little ("They are
        # very old." shares its one word with many sentences): such a sentence scores by cosine alone.
        lexical_weight = 0.0 if len(words) < self.min_claim_words and self.embedder is not None else 1.0 - w
        dense_weight = 1.0 - lexical_weight
        for sentence, cosine in zip(self.sentences, dense, strict=True):
            lexical = len(words & sentence.words) / len(words) if words else 0.0
            out.append((dense_weight * cosine + lexical_weight * lexical, cosine, lexical))
        return out

    def judge(self, sentence: str) -> Support:
        """The support of one answer sentence (citation markers are ignored)."""
        words = content_words(sentence)
        if not self.sentences or not words:
            return Support("unsupported", 0.0, 0.0, 0.0, None, {})
        scores = self._scores(sentence, words)
        by_number: dict[int, float] = {}
        best = 0
        for i, (score, _, _) in enumerate(scores):
            n = self.sentences[i].n
            by_number[n] = max(by_number.get(n, -math.inf), score)
            if score > scores[best][0]:
                best = i
        score, dense, lexical = scores[best]
        source = self.sentences[best]
        missing = tuple(sorted(_numbers(sentence) - self._chunk_numbers.get(source.n, set())))
        verdict: Verdict = "supported" if score >= self.threshold and not missing else "unsupported"
        return Support(verdict, round(score, 4), round(dense, 4), round(lexical, 4), source, by_number, missing)

    def relevance(self, question: str) -> list[tuple[SourceSentence, float]]:
        """Every source sentence with its relevance to ``question`` (same score, lexical = question recall)."""
        words = content_words(question)
        return [(s, score) for s, (score, _, _) in zip(self.sentences, self._scores(question, words), strict=True)]


def cite_targets(support: Support, cited: Sequence[int], *, threshold: float, slack: float = 0.05) -> list[int]:
    """The numbers a supported sentence should cite.

    The model's own numbers that support the sentence (score ≥ ``threshold`` and within ``slack`` of
    the best) are kept; when none does, the citation is re-pointed to the best source.
    """
    if support.source is None:
        return []
    floor = max(threshold, support.score - slack)
    kept = [n for n in cited if support.by_number.get(n, 0.0) >= floor]
    return kept or [support.source.n]


# --- extractive answer -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Pick:
    """A source sentence chosen for an extractive answer, with its relevance to the question."""

    sentence: SourceSentence
    relevance: float


def extractive_answer(
    relevance: Sequence[tuple[SourceSentence, float]],
    *,
    max_words: int = 100,
    exclude: Sequence[tuple[int, int, int]] = (),
    used_words: int = 0,
    rank_bonus: float = 0.2,
    extra_threshold: float = 1.0,
    min_words: int = 4,
) -> list[Pick]:
    """The source sentences that best answer a question, in reading order, whole sentences only.

    The most relevant chunk is the one whose best sentence scores highest, plus ``rank_bonus /
    rank`` for its retrieval rank (its citation number in the first round); its sentences are
    taken in order from its first one (skipping any that would exceed the budget), then other
    chunks' sentences with relevance ≥ ``extra_threshold``, best first, while the words stay
    within ``max_words``.

    Args:
        relevance: ``SupportScorer.relevance(question)``.
        max_words: Budget for the whole answer, ``used_words`` of which are already used.
        exclude: ``(chunk_id, start, end)`` spans already in the answer (never quoted twice).
        used_words: Words the answer already has.
        rank_bonus: Weight of the retrieval rank against sentence relevance.
        extra_threshold: Relevance needed to quote a sentence of another chunk.
        min_words: Sentences shorter than this (and fragments shorter than twice this) are skipped.
    """
    taken = {(c, s, e) for c, s, e in exclude}
    usable = [
        (s, r)
        for s, r in relevance
        if (s.chunk.id, s.start, s.end) not in taken
        and len(s.text.split()) >= (min_words if s.kind == "sentence" else 2 * min_words)
    ]
    if not usable:
        return []
    chunk_score: dict[int, float] = {}
    for s, r in usable:
        chunk_score[s.n] = max(chunk_score.get(s.n, -math.inf), r + rank_bonus / s.n)
    best_n = max(chunk_score, key=lambda n: (chunk_score[n], -n))
    picks: list[Pick] = []
    words = used_words

    def take(s: SourceSentence, r: float) -> bool:
        nonlocal words
        count = len(s.text.split())
        if words + count > max_words and (picks or used_words):
            return False
        picks.append(Pick(s, r))
        words += count
        return True

    for s, r in sorted((x for x in usable if x[0].n == best_n), key=lambda x: x[0].position):
        take(s, r)  # a sentence over the budget is skipped; a shorter one after it may still fit
    for s, r in sorted((x for x in usable if x[0].n != best_n), key=lambda x: -x[1]):
        if r < extra_threshold or max_words - words < min_words:
            break
        take(s, r)
    return picks


# --- failures and abstention --------------------------------------------------------------------------

_HEX_ID_RE = re.compile(r"\b[0-9a-f]{12,}\b")
_SCAFFOLD_RE = re.compile(r"^\s*(?:sources?:|question:|\[\d{1,3}\]\s*$)", re.IGNORECASE)
# A bare file name (not the end of a URL or path the source itself quotes).
_FILE_RE = re.compile(r"(?<![/\w.-])[\w-]+(?:\.[\w-]+)*\.(?:txt|md|pdf|html?|rst|docx?)\b", re.IGNORECASE)


def copies_source_header(sentence: str, sources: Mapping[int, Chunk]) -> bool:
    """Whether ``sentence`` copies a source header, a file name or a document id instead of a fact.

    Prompt headers read ``[n] title, page p``; small models copy them (and their ids) into answers.
    """
    if _HEX_ID_RE.search(sentence) or _SCAFFOLD_RE.match(sentence) or _FILE_RE.search(sentence):
        return True
    lowered = sentence.lower()
    for chunk in sources.values():
        name = PurePosixPath(chunk.path).name.lower()
        stem = PurePosixPath(chunk.path).stem.lower()
        if (name and name in lowered) or (len(stem) >= 8 and stem in lowered):
            return True
        title = (chunk.title or "").strip().lower()
        if title and (
            re.search(r"\[\d{1,3}\]\s*" + re.escape(title), lowered)
            or normalise_sentence(sentence) == normalise_sentence(title)
        ):
            return True
    return False


def abstains(
    retrieval_score: float | None,
    best_relevance: float,
    *,
    retrieval_threshold: float,
    relevance_threshold: float,
) -> bool:
    """The abstention rule: no answer when retrieval is weak **and** no source sentence is relevant.

    Args:
        retrieval_score: The best dense (cosine) score of the retrieved chunks; ``None`` when the
            retriever reported none (then the relevance alone decides).
        best_relevance: The best :meth:`SupportScorer.relevance` of a source sentence.
        retrieval_threshold: Retrieval below this is weak.
        relevance_threshold: Relevance below this is weak.
    """
    weak_relevance = best_relevance < relevance_threshold
    if retrieval_score is None:
        return weak_relevance
    return weak_relevance and retrieval_score < retrieval_threshold
