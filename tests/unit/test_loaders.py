"""Loaders on the generated corpus and on hand-made edge cases: formats, encodings, failures."""

from __future__ import annotations

import codecs
import io
import itertools
from pathlib import Path

import pytest

from ingest.loaders import (
    BinaryFileError,
    CorruptFileError,
    EmptyFileError,
    FileTooLargeError,
    HtmlLoader,
    LoadedDocument,
    LoaderError,
    LoaderRegistry,
    MarkdownLoader,
    PageSpan,
    PdfLoader,
    TextLoader,
    default_loaders,
    loader_for,
)
from ingest.loaders.markdown import first_h1, iter_headings
from tests.corpus_factory import (
    HTML_NOSCRIPT_MARKER,
    HTML_SCRIPT_MARKER,
    HTML_STYLE_MARKER,
    LARGE_TEXT_FACT,
    Corpus,
    pdf_bytes,
    write_corpus,
    write_large_text,
)

pytestmark = pytest.mark.unit


@pytest.fixture
def corpus(tmp_path: Path) -> Corpus:
    return write_corpus(tmp_path / "corpus")


def load(path: Path) -> LoadedDocument:
    loader = loader_for(path)
    assert loader is not None, path
    return loader.load(path)


def write(tmp_path: Path, name: str, data: bytes | str) -> Path:
    path = tmp_path / name
    if isinstance(data, str):
        path.write_text(data, encoding="utf-8")
    else:
        path.write_bytes(data)
    return path


# ---------------------------------------------------------------------------- registry


@pytest.mark.parametrize(
    ("name", "loader_type"),
    [
        ("a.txt", TextLoader),
        ("a.text", TextLoader),
        ("A.TXT", TextLoader),
        ("a.md", MarkdownLoader),
        ("a.markdown", MarkdownLoader),
        ("a.html", HtmlLoader),
        ("a.HTM", HtmlLoader),
        ("a.pdf", PdfLoader),
        ("report.v2.PDF", PdfLoader),
    ],
)
def test_loader_for_picks_by_lowercase_extension(name: str, loader_type: type) -> None:
    assert isinstance(loader_for(Path(name)), loader_type)
    assert isinstance(loader_for(name), loader_type)


@pytest.mark.parametrize("name", ["a.xyz", "a.doc", "README", "a.txt.bak", ".hidden"])
def test_loader_for_unknown_extension_is_none(name: str) -> None:
    assert loader_for(Path(name)) is None


def test_registry_extensions_and_max_bytes_are_passed_on() -> None:
    registry = LoaderRegistry(default_loaders(max_bytes=123))
    assert registry.extensions == {
        *(".txt", ".text", ".md", ".markdown", ".html", ".htm", ".pdf"),
        *(".docx", ".pptx", ".pptm", ".xlsx", ".xlsm", ".csv", ".tsv", ".odt", ".epub", ".eml"),
    }
    loader = registry.for_path("x.md")
    assert isinstance(loader, MarkdownLoader)
    assert loader.max_bytes == 123
    pdf = loader_for("x.pdf", max_bytes=456)
    assert isinstance(pdf, PdfLoader)
    assert pdf.max_bytes == 456


def test_errors_carry_a_reason_and_share_a_base() -> None:
    for cls in (CorruptFileError, BinaryFileError, EmptyFileError, FileTooLargeError):
        e = cls("why it failed")
        assert isinstance(e, LoaderError)
        assert e.reason == str(e) == "why it failed"


# ---------------------------------------------------------------------------- corpus


def test_every_loadable_corpus_file_loads_and_holds_its_facts(corpus: Corpus) -> None:
    for path in corpus.loadable:
        doc = load(path)
        assert doc.text.strip()
        assert "\r" not in doc.text
        assert doc.title
        for fact in corpus.facts_in(path):
            assert fact.sentence in doc.text, (path.name, fact.sentence)
            assert fact.answer in fact.sentence


def test_failing_corpus_files_raise_loader_errors(corpus: Corpus) -> None:
    expected = {
        corpus.corrupt_pdf: CorruptFileError,
        corpus.binary_txt: BinaryFileError,
        corpus.empty_txt: EmptyFileError,
    }
    assert set(expected) == set(corpus.failing)
    for path, error in expected.items():
        with pytest.raises(error) as info:
            load(path)
        assert info.value.reason


def test_unknown_corpus_files_are_skipped(corpus: Corpus) -> None:
    assert all(loader_for(p) is None for p in corpus.skipped)
    files = {p for p in corpus.root.rglob("*") if p.is_file()}
    assert files == set(corpus.loadable) | set(corpus.failing) | set(corpus.skipped)


# ---------------------------------------------------------------------------- text


def test_text_file(corpus: Corpus) -> None:
    doc = load(corpus.text)
    assert doc.format == "text"
    assert doc.title == "notes"
    assert doc.metadata == {"encoding": "utf-8"}
    assert doc.pages == ()
    assert doc.page_count is None
    assert doc.page_at(0) is None
    assert doc.text == corpus.text.read_text(encoding="utf-8")


def test_cp1252_text_is_decoded_and_newlines_normalised(corpus: Corpus) -> None:
    doc = load(corpus.cp1252_text)
    assert doc.metadata["encoding"] == "cp1252"
    assert "crème brûlée for 4€" in doc.text
    assert "Œhlmann" in doc.text
    assert doc.text.startswith("Menu notes\n\nThe Zéphyr")


@pytest.mark.parametrize(
    ("data", "encoding"),
    [
        (codecs.BOM_UTF8 + "héllo wörld".encode(), "utf-8"),
        ("héllo wörld".encode("utf-16"), "utf-16"),
        (codecs.BOM_UTF16_BE + "héllo wörld".encode("utf-16-be"), "utf-16"),
        (codecs.BOM_UTF16_LE + "héllo wörld".encode("utf-16-le"), "utf-16"),
        ("héllo wörld".encode("utf-32"), "utf-32"),
    ],
)
def test_bom_decides_the_encoding_and_is_stripped(tmp_path: Path, data: bytes, encoding: str) -> None:
    doc = load(write(tmp_path, "bom.txt", data))
    assert doc.text == "héllo wörld"
    assert doc.metadata["encoding"] == encoding


def test_latin1_fallback_when_cp1252_cannot_decode(tmp_path: Path) -> None:
    # 0x81 is undefined in cp1252 and invalid in UTF-8.
    doc = load(write(tmp_path, "odd.txt", b"caf\xe9 \x81 ok"))
    assert doc.metadata["encoding"] == "latin-1"
    assert doc.text == "café \x81 ok"


def test_newlines_are_normalised(tmp_path: Path) -> None:
    doc = load(write(tmp_path, "nl.txt", b"a\r\nb\rc\n\r\nd"))
    assert doc.text == "a\nb\nc\n\nd"


@pytest.mark.parametrize(
    "data",
    [
        b"text then a NUL \x00 byte",
        bytes(range(1, 32)) * 40,  # control bytes, no NUL
    ],
)
def test_binary_content_in_a_text_file(tmp_path: Path, data: bytes) -> None:
    with pytest.raises(BinaryFileError, match="binary"):
        load(write(tmp_path, "bin.txt", data))


def test_utf16_without_bom_is_binary_not_garbage(tmp_path: Path) -> None:
    with pytest.raises(BinaryFileError):
        load(write(tmp_path, "u16.txt", "hello".encode("utf-16-le")))


@pytest.mark.parametrize("data", [b"", b"   \n\t\r\n  "])
def test_empty_and_whitespace_only(tmp_path: Path, data: bytes) -> None:
    for name in ("e.txt", "e.md", "e.html"):
        with pytest.raises(EmptyFileError):
            load(write(tmp_path, name, data))


def test_file_over_max_bytes(corpus: Corpus) -> None:
    size = corpus.text.stat().st_size
    assert TextLoader(max_bytes=size).load(corpus.text).text
    for loader in default_loaders(max_bytes=size - 1):
        with pytest.raises(FileTooLargeError, match="too large"):
            loader.load(corpus.text)
    with pytest.raises(FileTooLargeError):
        PdfLoader(max_bytes=100).load(corpus.pdf)


def test_missing_file_is_a_loader_error(tmp_path: Path) -> None:
    with pytest.raises(LoaderError, match="cannot read"):
        TextLoader().load(tmp_path / "nope.txt")


def test_large_text_file(tmp_path: Path) -> None:
    fact = write_large_text(tmp_path / "big.txt", 2 * 1024 * 1024)
    assert fact.sentence == LARGE_TEXT_FACT
    size = fact.path.stat().st_size
    assert 2 * 1024 * 1024 <= size < 2 * 1024 * 1024 + 4096
    doc = load(fact.path)
    assert doc.text.count(LARGE_TEXT_FACT) == 1
    assert size * 0.4 < doc.text.index(LARGE_TEXT_FACT) < size * 0.6


# ---------------------------------------------------------------------------- markdown


def test_markdown_is_kept_verbatim_with_h1_title(corpus: Corpus) -> None:
    doc = load(corpus.markdown)
    assert doc.format == "markdown"
    assert doc.title == "Quokka Handbook"
    assert doc.text == corpus.markdown.read_text(encoding="utf-8")
    assert "### Linux" in doc.text


def test_markdown_title_falls_back_to_stem(tmp_path: Path) -> None:
    path = write(tmp_path, "setup-notes.md", "```\n# not a title\n```\n\n## Second level only\n\ntext\n")
    assert load(path).title == "setup-notes"


def test_iter_headings_levels_fences_and_closing_hashes() -> None:
    text = (
        "# Top #\n"
        "intro #not-a-heading\n"
        "#hashtag is not a heading\n"
        "## C# language ##\n"
        "```python\n"
        "# a comment\n"
        "```\n"
        "~~~\n"
        "## inside tilde fence\n"
        "~~~\n"
        "   ### Indented three\n"
        "####### seven is too many\n"
        "##\n"
    )
    headings = list(iter_headings(text))
    assert [(h.level, h.title) for h in headings] == [(1, "Top"), (2, "C# language"), (3, "Indented three")]
    assert all(text[h.offset :].lstrip(" ").startswith("#") for h in headings)
    assert first_h1(text) == "Top"
    assert first_h1("## only h2") is None


# ---------------------------------------------------------------------------- HTML


def test_html_visible_text_only(corpus: Corpus) -> None:
    doc = load(corpus.html)
    assert doc.format == "html"
    assert doc.title == "Veldoria Travel Notes"
    assert doc.metadata == {"encoding": "utf-8"}
    for marker in (HTML_SCRIPT_MARKER, HTML_STYLE_MARKER, HTML_NOSCRIPT_MARKER, "font-family", "Maps"):
        assert marker not in doc.text
    # Paragraphs are separated by a blank line, inline whitespace collapses, list items get lines.
    paragraphs = doc.text.split("\n\n")
    assert paragraphs[0] == "Travelling in Veldoria"
    assert paragraphs[1].startswith("The capital of Veldoria is Marnhaven")
    assert "Tickets are sold at every station." in paragraphs[2]
    assert "Best season: June\nCurrency: the veld" in doc.text


def test_html_broken_markup_still_yields_paragraphs(tmp_path: Path) -> None:
    html = "<html><body><p>one <b>bold<p>two</i> <div>three<table><tr><td>a<td>b<tr><td>c</table><li>x<li>y"
    doc = load(write(tmp_path, "broken.html", html))
    assert doc.text.split("\n\n")[:2] == ["one bold", "two"]
    assert "a | b\nc" in doc.text
    assert doc.text.endswith("x\ny")
    assert doc.title == "broken"


def test_html_title_falls_back_to_h1_and_pre_is_kept(tmp_path: Path) -> None:
    html = "<h1>  Main\n heading </h1><pre>line 1\n    indented\n</pre><p>after</p><br>x<br>y"
    doc = load(write(tmp_path, "page.htm", html))
    assert doc.title == "Main heading"
    assert doc.text == "Main heading\n\nline 1\n    indented\n\nafter\n\nx\ny"


def test_html_hidden_and_navigation_are_dropped(tmp_path: Path) -> None:
    html = (
        '<div role="navigation">Previous topic</div><p hidden>secret</p>'
        '<template><p>tpl</p></template><h2>Title<a class="headerlink" href="#t">¶</a></h2><p>body</p>'
    )
    doc = load(write(tmp_path, "p.html", html))
    assert doc.text == "Title\n\nbody"


@pytest.mark.parametrize(
    "meta",
    [
        '<meta charset="windows-1252">',
        '<meta http-equiv="Content-Type" content="text/html; charset=ISO-8859-1">',
        "",  # no declaration: invalid UTF-8 falls back to windows-1252
    ],
)
def test_html_non_utf8_charsets(tmp_path: Path, meta: str) -> None:
    data = f"<html><head>{meta}<title>Caf\u00e9</title></head><body><p>cr\u00e8me \u20ac5</p></body></html>"
    doc = load(write(tmp_path, "legacy.html", data.encode("cp1252")))
    assert doc.title == "Café"
    assert doc.text == "crème €5"
    assert doc.metadata["encoding"] == "cp1252"


def test_html_declared_charset_is_honoured(tmp_path: Path) -> None:
    data = '<meta charset="koi8-r"><p>Привет</p>'.encode("koi8-r")
    doc = load(write(tmp_path, "ru.html", data))
    assert doc.text == "Привет"
    assert doc.metadata["encoding"] == "koi8-r"


def test_html_without_visible_text_or_binary(tmp_path: Path) -> None:
    with pytest.raises(EmptyFileError, match="no visible text"):
        load(write(tmp_path, "s.html", "<html><head><title>t</title><script>x()</script></head><body> </body>"))
    with pytest.raises(BinaryFileError):
        load(write(tmp_path, "b.html", b"<html>\x00\x01\x02</html>"))


def test_deeply_nested_html_does_not_hit_the_recursion_limit(tmp_path: Path) -> None:
    html = "<div>" * 5000 + "deep text" + "</div>" * 5000
    assert load(write(tmp_path, "deep.html", html)).text == "deep text"


# ---------------------------------------------------------------------------- PDF


def test_pdf_pages_offsets_and_title(corpus: Corpus) -> None:
    doc = load(corpus.pdf)
    assert doc.format == "pdf"
    assert doc.page_count == 3
    assert doc.title == "ZX-9 Service Manual"
    assert doc.metadata["producer"] == "corpus_factory"
    assert [span.page for span in doc.pages] == [1, 2, 3]
    # Spans tile the text, separated by exactly one blank line.
    assert doc.pages[0].start == 0
    assert doc.pages[-1].end == len(doc.text)
    for before, after in itertools.pairwise(doc.pages):
        assert doc.text[before.end : after.start] == "\n\n"
    for fact in corpus.facts_in(corpus.pdf):
        assert fact.page is not None
        span = doc.pages[fact.page - 1]
        assert fact.sentence in doc.text[span.start : span.end]
        at = doc.text.index(fact.sentence)
        assert doc.page_at(at) == doc.page_at(at + len(fact.sentence) - 1) == fact.page
    assert doc.text.splitlines()[5] == "Chapter 2. Valves"
    assert "(see section 2.4)" in doc.text


def test_factory_pdf_is_valid_for_a_strict_reader(corpus: Corpus) -> None:
    from pypdf import PdfReader

    reader = PdfReader(corpus.pdf, strict=True)
    assert len(reader.pages) == 3
    assert reader.xref_objStm == {}  # a classic xref table, every offset right
    assert "1800 rpm" in reader.pages[0].extract_text()


def test_pdf_that_is_not_a_pdf(tmp_path: Path) -> None:
    with pytest.raises(CorruptFileError, match="not a PDF"):
        load(write(tmp_path, "fake.pdf", "just text"))


def test_corrupt_pdf_reason(corpus: Corpus) -> None:
    with pytest.raises(CorruptFileError, match="unreadable PDF: ") as info:
        load(corpus.corrupt_pdf)
    assert info.value.__cause__ is not None


def test_pdf_without_text_is_empty(tmp_path: Path) -> None:
    with pytest.raises(EmptyFileError, match="no extractable text"):
        load(write(tmp_path, "scan.pdf", pdf_bytes([[], []])))


def test_pdf_skips_blank_pages_but_keeps_their_numbers(tmp_path: Path) -> None:
    doc = load(write(tmp_path, "gaps.pdf", pdf_bytes([["first"], [], ["third (3)"]])))
    assert doc.page_count == 3
    assert doc.pages == (PageSpan(0, 5, 1), PageSpan(7, 16, 3))
    assert doc.text == "first\n\nthird (3)"
    assert doc.title == "gaps"  # empty /Title in the info dictionary


def _encrypted(user_password: str) -> bytes:
    from pypdf import PdfReader, PdfWriter

    writer = PdfWriter(clone_from=PdfReader(io.BytesIO(pdf_bytes([["secret page"]]))))
    writer.encrypt(user_password=user_password, owner_password="owner", algorithm="RC4-128")
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


def test_encrypted_pdf(tmp_path: Path) -> None:
    with pytest.raises(CorruptFileError, match="encrypted PDF"):
        load(write(tmp_path, "locked.pdf", _encrypted("s3cret")))
    # An owner password alone does not stop reading.
    assert load(write(tmp_path, "owner-only.pdf", _encrypted(""))).text == "secret page"


def test_one_failing_page_does_not_lose_the_document(corpus: Corpus, monkeypatch: pytest.MonkeyPatch) -> None:
    from pypdf import PageObject

    original = PageObject.extract_text

    def flaky(self: PageObject, *args: object, **kwargs: object) -> str:
        text: str = original(self, *args, **kwargs)  # type: ignore[arg-type]
        if "Valves" in text:
            raise KeyError("/Font")
        return text

    monkeypatch.setattr(PageObject, "extract_text", flaky)
    doc = PdfLoader(ocr=None).load(corpus.pdf)
    assert [span.page for span in doc.pages] == [1, 3]
    assert doc.metadata["failed_pages"] == "2"
    assert "32 bar" not in doc.text
    assert any("page 2" in w for w in doc.warnings)


def test_pdf_failing_on_every_page_is_corrupt(corpus: Corpus, monkeypatch: pytest.MonkeyPatch, tesseract: None) -> None:
    from pypdf import PageObject

    def broken(self: PageObject, *args: object, **kwargs: object) -> str:
        raise ValueError("bad content stream")

    monkeypatch.setattr(PageObject, "extract_text", broken)
    with pytest.raises(CorruptFileError, match="every page: ValueError: bad content stream"):
        PdfLoader(ocr=None).load(corpus.pdf)
    # With OCR, pages whose text layer cannot be read are rendered and read instead.
    doc = load(corpus.pdf)
    assert doc.ocr_pages == (1, 2, 3)
    assert "32 bar" in doc.text
    assert doc.metadata["failed_pages"] == "1,2,3"


# ---------------------------------------------------------------------------- values


def test_page_at() -> None:
    doc = LoadedDocument(text="aaa\n\nbbb\n\nccc", format="pdf", pages=(PageSpan(0, 3, 1), PageSpan(5, 8, 4)))
    assert [doc.page_at(i) for i in (0, 2, 3, 4, 5, 8, 12)] == [1, 1, 1, 1, 4, 4, 4]
    assert LoadedDocument(text="x", format="text").page_at(0) is None
