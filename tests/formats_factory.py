"""Writes one file of each office, e-book, mail and spreadsheet format, plus a scanned PDF.

Every file is made with the library its loader reads it with (python-docx, python-pptx,
openpyxl, odfpy, ebooklib, the standard library's csv and email) or, for the scan, with
Pillow: text drawn into an image saved as a PDF, so the PDF has no text layer at all and only
OCR can read it. Each file holds one distinctive fact (:class:`FormatFact`) among filler, and
the fact's expected location: the one :func:`ingest.loaders.location_label` gives its chunk.

Also here: the bad inputs of these formats (:func:`write_bad_inputs`): a password-protected
.docx (encrypted with msoffcrypto-tool), a corrupt .xlsx, a zip bomb inside a .docx and a
spreadsheet over the row limit.
"""

from __future__ import annotations

import csv
import io
import random
import zipfile
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path

_FILLER = (
    "archive ledger orbit willow granite harbor lantern meadow quartz ribbon saddle timber velvet "
    "anchor basalt cobalt dune ember fjord glacier hazel island juniper kelp lagoon marble nectar"
)
FILLER_WORDS: tuple[str, ...] = tuple(_FILLER.split())


@dataclass(frozen=True, slots=True)
class FormatFact:
    """A fact inside one generated file: the question, the answer text, where it must be cited.

    ``page`` is the page or slide number of its chunk (``None`` where the format has none);
    ``location`` the chunk's location label; ``rows`` the spreadsheet row holding it.
    """

    format: str
    path: Path
    query: str
    answer: str
    location: str
    page: int | None = None
    row: int | None = None


def filler(seed: int, sentences: int = 6) -> str:
    """Deterministic filler prose (no fact in it)."""
    rng = random.Random(seed)
    out = []
    for _ in range(sentences):
        words = rng.choices(FILLER_WORDS, k=rng.randint(8, 14))
        out.append(" ".join(words).capitalize() + ".")
    return " ".join(out)


def write_docx(path: Path) -> FormatFact:
    import docx

    document = docx.Document()
    document.core_properties.title = "Plant handbook"
    document.add_heading("Plant handbook", level=1)
    document.add_paragraph(filler(1))
    document.add_heading("Heating", level=2)
    document.add_paragraph(filler(2))
    document.add_heading("Coolant", level=2)
    document.add_paragraph("The quorvane pump must be flushed every 37 days with blue glycol.")
    table = document.add_table(rows=2, cols=2)
    table.cell(0, 0).text, table.cell(0, 1).text = "Part", "Supplier"
    table.cell(1, 0).text, table.cell(1, 1).text = "Gasket", "Harlow Seals"
    document.add_heading("Electrical", level=2)
    document.add_paragraph(filler(3))
    document.save(str(path))
    return FormatFact(
        "docx",
        path,
        "How often must the quorvane pump be flushed?",
        "every 37 days",
        "Plant handbook > Coolant",
    )


def write_pptx(path: Path) -> FormatFact:
    import pptx
    from pptx.util import Inches

    deck = pptx.Presentation()
    titles = ["Quarterly review", "Launch plan", "Budget"]
    bodies = [filler(4), "The Zelthar satellite launches from the Kourou spaceport on 14 March.", filler(5)]
    for title, body in zip(titles, bodies, strict=True):
        slide = deck.slides.add_slide(deck.slide_layouts[1])
        slide.shapes.title.text = title
        slide.placeholders[1].text_frame.text = body
    rows = deck.slides[2].shapes.add_table(2, 2, Inches(1), Inches(5), Inches(4), Inches(1)).table
    rows.cell(0, 0).text, rows.cell(0, 1).text = "Item", "Cost"
    rows.cell(1, 0).text, rows.cell(1, 1).text = "Fuel", "12 units"
    deck.slides[1].notes_slide.notes_text_frame.text = "Remind the team about the weather window."
    deck.save(str(path))
    return FormatFact(
        "pptx", path, "Where does the Zelthar satellite launch from?", "Kourou", "slide 2, Launch plan", page=2
    )


PRODUCTS = 60
FACT_ROW = 37  # the spreadsheet row (header is row 1)


def _product_rows(seed: int) -> list[list[object]]:
    rng = random.Random(seed)
    rows: list[list[object]] = []
    for i in range(PRODUCTS):
        name = f"{rng.choice(FILLER_WORDS).capitalize()} {rng.choice(FILLER_WORDS)} {i}"
        rows.append([name, round(rng.uniform(2, 90), 2), rng.randint(0, 400), rng.choice(["north", "south", "east"])])
    return rows


def write_xlsx(path: Path) -> FormatFact:
    import openpyxl

    workbook = openpyxl.Workbook()
    summary = workbook.active
    summary.title = "Summary"
    summary.append(["Quarter", "Revenue"])
    summary.append(["Q1", 1200])
    summary.append(["Q2", 1350])
    prices = workbook.create_sheet("Prices")
    prices.append(["Product", "Price", "Stock", "Warehouse"])
    rows = _product_rows(7)
    rows[FACT_ROW - 2] = ["Brindlewort lamp", 84.2, 19, "west"]
    for row in rows:
        prices.append(row)
    workbook.save(path)
    return FormatFact("xlsx", path, "What is the price of the Brindlewort lamp?", "84.2", "Prices, rows", row=FACT_ROW)


def write_csv(path: Path) -> FormatFact:
    rng = random.Random(11)
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["City", "Population", "Mayor"])
        for i in range(2, PRODUCTS + 2):
            if i == FACT_ROW:
                writer.writerow(["Quillmarsh", 48210, "Odalys Venn"])
            else:
                writer.writerow([f"{rng.choice(FILLER_WORDS).capitalize()}ton {i}", rng.randint(900, 90000), "n/a"])
    return FormatFact("csv", path, "Who is the mayor of Quillmarsh?", "Odalys Venn", "rows", row=FACT_ROW)


def write_odt(path: Path) -> FormatFact:
    from odf import dc
    from odf.opendocument import OpenDocumentText
    from odf.text import H, P

    document = OpenDocumentText()
    document.meta.addElement(dc.Title(text="Expedition log"))
    document.text.addElement(H(outlinelevel=1, text="Expedition log"))
    document.text.addElement(P(text=filler(8)))
    document.text.addElement(H(outlinelevel=2, text="Day 4"))
    document.text.addElement(P(text="The team found a glowing Vexlin crystal near the northern glacier."))
    document.text.addElement(H(outlinelevel=2, text="Day 5"))
    document.text.addElement(P(text=filler(9)))
    document.save(str(path))
    return FormatFact(
        "odt", path, "What did the team find near the northern glacier?", "Vexlin crystal", "Expedition log > Day 4"
    )


def write_epub(path: Path) -> FormatFact:
    from ebooklib import epub

    book = epub.EpubBook()
    book.set_identifier("tests-formats-1")
    book.set_title("Coastal tales")
    book.set_language("en")
    chapters = []
    for i, (heading, body) in enumerate(
        [
            ("The village", filler(12)),
            ("The harbor", "The lighthouse keeper Marnie Oswick painted the tower bright green."),
        ],
        start=1,
    ):
        chapter = epub.EpubHtml(title=heading, file_name=f"chap_{i}.xhtml", lang="en")
        chapter.content = f"<html><body><h1>{heading}</h1><p>{body}</p><p>{filler(20 + i)}</p></body></html>"
        book.add_item(chapter)
        chapters.append(chapter)
    book.toc = chapters
    book.add_item(epub.EpubNcx())
    book.add_item(epub.EpubNav())
    book.spine = ["nav", *chapters]
    epub.write_epub(str(path), book)
    return FormatFact("epub", path, "Who painted the lighthouse tower green?", "Marnie Oswick", "The harbor")


def write_eml(path: Path) -> FormatFact:
    message = EmailMessage()
    message["From"] = "Ops Team <ops@example.org>"
    message["To"] = "all@example.org"
    message["Subject"] = "Server migration"
    message["Date"] = "Mon, 07 Dec 2026 08:00:00 +0000"
    message.set_content(f"Hello all,\n\n{filler(30)}\n\nRegards,\nOps")
    message.add_attachment(
        "The Trellis database moves to host kappa-9 on Friday night.\n",
        subtype="plain",
        filename="plan.txt",
    )
    message.add_attachment(b"\x89PNG\r\n\x1a\n", maintype="image", subtype="png", filename="diagram.png")
    path.write_bytes(bytes(message))
    return FormatFact("eml", path, "Which host does the Trellis database move to?", "kappa-9", "attachment plan.txt")


def scanned_pdf_bytes(pages: list[str], *, dpi: int = 150) -> bytes:
    """A PDF whose pages are images of ``pages`` (text drawn with Pillow): no text layer."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=max(12, dpi // 5))
    images = []
    for text in pages:
        image = Image.new("L", (int(8.27 * dpi), int(11.69 * dpi)), color=255)
        draw = ImageDraw.Draw(image)
        y = dpi
        for line in text.split("\n"):
            draw.text((dpi, y), line, fill=0, font=font)
            y += int(dpi * 0.45)
        images.append(image.convert("RGB"))
    buffer = io.BytesIO()
    images[0].save(buffer, format="PDF", save_all=True, append_images=images[1:], resolution=float(dpi))
    return buffer.getvalue()


def write_scanned_pdf(path: Path) -> FormatFact:
    path.write_bytes(
        scanned_pdf_bytes(
            [
                "Annual bridge report\nThe inspection covered cables and anchors.",
                "The Ombrelt bridge was opened in 1887\nby the river guild of Tarsk.",
            ]
        )
    )
    return FormatFact("pdf", path, "When was the Ombrelt bridge opened?", "1887", "page 2", page=2)


WRITERS = {
    "docx": write_docx,
    "pptx": write_pptx,
    "xlsx": write_xlsx,
    "csv": write_csv,
    "odt": write_odt,
    "epub": write_epub,
    "eml": write_eml,
    "pdf": write_scanned_pdf,
}
"""Format -> writer of one file of it (the scanned PDF under ``pdf``)."""


def write_formats(folder: Path) -> list[FormatFact]:
    """One file of each format in ``folder`` (created); returns their facts."""
    folder.mkdir(parents=True, exist_ok=True)
    names = {"pdf": "scan.pdf", "eml": "migration.eml"}
    return [writer(folder / names.get(fmt, f"sample.{fmt}")) for fmt, writer in WRITERS.items()]


def zip_bomb_docx(path: Path, *, expanded_bytes: int = 64 * 1024 * 1024) -> None:
    """A .docx whose one extra member inflates ``expanded_bytes`` of zeros from a few hundred KiB."""
    import docx

    buffer = io.BytesIO()
    document = docx.Document()
    document.add_paragraph("A perfectly normal paragraph.")
    document.save(buffer)
    with (
        zipfile.ZipFile(buffer, "a", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as archive,
        archive.open("word/media/bomb.bin", "w", force_zip64=True) as member,
    ):
        block = b"\0" * (1024 * 1024)
        for _ in range(expanded_bytes // len(block)):
            member.write(block)
    path.write_bytes(buffer.getvalue())


def encrypted_docx(path: Path, password: str = "secret") -> None:
    """A real password-protected .docx (ECMA-376 agile encryption, as Word writes it)."""
    import msoffcrypto.format.ooxml

    plain = io.BytesIO()
    document = __import__("docx").Document()
    document.add_paragraph("Top secret plans.")
    document.save(plain)
    plain.seek(0)
    encrypted = io.BytesIO()
    msoffcrypto.format.ooxml.OOXMLFile(plain).encrypt(password, encrypted)
    path.write_bytes(encrypted.getvalue())


def write_bad_inputs(folder: Path, *, max_rows: int) -> dict[str, Path]:
    """The bad inputs of the new formats, by name; ``max_rows`` is the row limit to pass."""
    import openpyxl

    folder.mkdir(parents=True, exist_ok=True)
    bad = {
        "encrypted": folder / "locked.docx",
        "corrupt": folder / "broken.xlsx",
        "bomb": folder / "bomb.docx",
        "huge": folder / "huge.xlsx",
        "truncated": folder / "truncated.pptx",
    }
    encrypted_docx(bad["encrypted"])
    bad["corrupt"].write_bytes(b"PK\x03\x04 this is not really a workbook" + bytes(range(256)) * 4)
    zip_bomb_docx(bad["bomb"])
    workbook = openpyxl.Workbook(write_only=True)
    sheet = workbook.create_sheet("Log")
    sheet.append(["n", "value"])
    for i in range(max_rows + 5):
        sheet.append([i, i * 2])
    workbook.save(bad["huge"])
    deck = io.BytesIO()
    write_pptx_bytes(deck)
    bad["truncated"].write_bytes(deck.getvalue()[: len(deck.getvalue()) // 2])
    return bad


def write_pptx_bytes(buffer: io.BytesIO) -> None:
    """A small valid presentation into ``buffer``."""
    import pptx

    deck = pptx.Presentation()
    slide = deck.slides.add_slide(deck.slide_layouts[1])
    slide.shapes.title.text = "Hello"
    deck.save(buffer)
