"""Writes small mixed document folders for ingestion and retrieval tests.

Everything is generated (no fixtures on disk), deterministic, and quick:

* :func:`write_corpus` writes one file of every supported format, each holding a
  distinctive fact (:class:`Fact`) a retrieval test can ask about, plus the bad
  inputs the ingestion must survive (corrupt PDF, binary ``.txt``, empty file,
  unknown extension) and a cp1252-encoded text file;
* :func:`pdf_bytes` hand-writes a minimal text PDF (Helvetica, one content stream
  per page, exact xref offsets) that pypdf extracts;
* :func:`write_large_text` writes a large text file (50 MiB by default) with one
  needle fact in the middle.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

MiB = 1024 * 1024

HTML_SCRIPT_MARKER = "SCRIPT_TEXT_MUST_NOT_BE_INDEXED"
HTML_STYLE_MARKER = "STYLE_TEXT_MUST_NOT_BE_INDEXED"
HTML_NOSCRIPT_MARKER = "NOSCRIPT_TEXT_MUST_NOT_BE_INDEXED"


@dataclass(frozen=True, slots=True)
class Fact:
    """A sentence that occurs verbatim in one file's extracted text, and a question it answers.

    ``answer`` is a short distinctive substring of ``sentence``; ``page`` is the
    1-based PDF page holding it (``None`` for other formats).
    """

    path: Path
    sentence: str
    query: str
    answer: str
    page: int | None = None


@dataclass(frozen=True, slots=True)
class Corpus:
    """The files written by :func:`write_corpus`, by role."""

    root: Path
    text: Path
    markdown: Path
    html: Path
    pdf: Path
    cp1252_text: Path
    corrupt_pdf: Path
    binary_txt: Path
    empty_txt: Path
    unknown: Path
    facts: tuple[Fact, ...]

    @property
    def loadable(self) -> tuple[Path, ...]:
        """Files every loader must turn into text."""
        return (self.text, self.markdown, self.html, self.pdf, self.cp1252_text)

    @property
    def failing(self) -> tuple[Path, ...]:
        """Files with a known extension whose loading must fail with a LoaderError."""
        return (self.corrupt_pdf, self.binary_txt, self.empty_txt)

    @property
    def skipped(self) -> tuple[Path, ...]:
        """Files no loader handles (to be counted as skipped)."""
        return (self.unknown,)

    def facts_in(self, path: Path) -> tuple[Fact, ...]:
        """The facts stored in ``path``."""
        return tuple(f for f in self.facts if f.path == path)


# ---------------------------------------------------------------------------- PDF


def _pdf_string(text: str) -> bytes:
    """A PDF literal string in WinAnsi (cp1252) with ``\\``, ``(`` and ``)`` escaped."""
    escaped = text.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")
    return b"(" + escaped.encode("cp1252") + b")"


def pdf_bytes(pages: Sequence[Sequence[str]], *, title: str | None = None) -> bytes:
    """Return a minimal, valid PDF whose page *i* shows the lines ``pages[i]`` in Helvetica 12.

    Objects: 1 catalog, 2 page tree, 3 font, 4 info, then a page and its content
    stream per page. The cross-reference table holds the exact byte offset of
    each object, so strict readers accept the file too.
    """
    n = len(pages)
    page_ids = [5 + 2 * i for i in range(n)]
    objects: dict[int, bytes] = {
        1: b"<< /Type /Catalog /Pages 2 0 R >>",
        2: b"<< /Type /Pages /Kids [" + b" ".join(b"%d 0 R" % pid for pid in page_ids) + b"] /Count %d >>" % n,
        3: b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica /Encoding /WinAnsiEncoding >>",
        4: b"<< /Title " + _pdf_string(title or "") + b" /Producer (corpus_factory) >>",
    }
    for pid, lines in zip(page_ids, pages, strict=True):
        ops = [b"BT", b"/F1 12 Tf", b"14 TL", b"72 720 Td"]
        for i, line in enumerate(lines):
            if i:
                ops.append(b"T*")
            ops.append(_pdf_string(line) + b" Tj")
        ops.append(b"ET")
        stream = b"\n".join(ops) + b"\n"
        objects[pid] = (
            b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] "
            b"/Resources << /Font << /F1 3 0 R >> >> /Contents %d 0 R >>" % (pid + 1)
        )
        objects[pid + 1] = b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"endstream"

    out = bytearray(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n")
    offsets: dict[int, int] = {}
    for oid in sorted(objects):
        offsets[oid] = len(out)
        out += b"%d 0 obj\n" % oid + objects[oid] + b"\nendobj\n"
    xref_at = len(out)
    size = max(objects) + 1
    out += b"xref\n0 %d\n" % size
    out += b"0000000000 65535 f \n"
    for oid in range(1, size):
        out += b"%010d 00000 n \n" % offsets[oid]
    out += b"trailer\n<< /Size %d /Root 1 0 R /Info 4 0 R >>\n" % size
    out += b"startxref\n%d\n%%%%EOF\n" % xref_at
    return bytes(out)


def corrupt_pdf_bytes() -> bytes:
    """A PDF header followed by a truncated object and garbage: no xref, no trailer, no pages."""
    rng = random.Random(1234)
    garbage = bytes(rng.randrange(256) for _ in range(600))
    return b"%PDF-1.7\n1 0 obj\n<< /Type /Catalog /Pages 2 0 R\n" + garbage + b"\nstream\nx\x9c\x00\x01"


# ---------------------------------------------------------------------------- corpus

_TEXT_FACT = "The zorblax reactor runs at 451 kelvin."
_TEXT = f"""Zorblax plant operations log

The plant opened in the spring after three years of construction. Visitors
enter through the north gate and sign the register kept by the night warden.

{_TEXT_FACT} Operators check the reading at every shift change and write it
in the blue ledger.

Maintenance happens on the first Monday of each month. The spare parts store
keeps two of every valve, and the canteen serves lentil soup on Thursdays.
"""

_MD_FACT = "On Linux the quokka daemon listens on TCP port 7431 by default."
_MD_WIN_FACT = "On Windows the quokka service stores its logs in C:\\Quokka\\logs."
_MD_TROUBLE_FACT = "If the quokka daemon refuses to start, delete the stale file quokka.lock."
_MARKDOWN = f"""# Quokka Handbook

Quokka is a small job scheduler for laboratory robots.

## Install

Download the archive for your platform.

### Linux

Unpack the archive and run `./install.sh`. {_MD_FACT}

```sh
# this line is a shell comment, not a heading
quokkad --foreground
```

### Windows

Run the installer as an administrator. {_MD_WIN_FACT}

## Troubleshooting

{_MD_TROUBLE_FACT} Then start it again.
"""

_HTML_FACT = "The capital of Veldoria is Marnhaven, a harbour city of 80,000 people."
_HTML_FACT_2 = "Veldorian trains run on a 1,435 mm track gauge."
_HTML = f"""<!DOCTYPE html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <title>Veldoria Travel Notes</title>
  <style>body {{ font-family: serif }} /* {HTML_STYLE_MARKER} */</style>
  <script>var token = "{HTML_SCRIPT_MARKER}";</script>
</head>
<body>
  <nav><a href="/">Home</a> | <a href="/maps">Maps</a></nav>
  <h1>Travelling in Veldoria</h1>
  <p>{_HTML_FACT}
     It sits at the mouth of the river Ost.</p>
  <p>{_HTML_FACT_2} <b>Tickets</b> are sold
     at every station.</p>
  <noscript>{HTML_NOSCRIPT_MARKER}</noscript>
  <ul><li>Best season: June</li><li>Currency: the veld</li></ul>
  <script type="text/javascript">document.write("{HTML_SCRIPT_MARKER}");</script>
</body>
</html>
"""

_PDF_FACTS = (
    "The coolant pump of the ZX-9 turns at 1800 rpm.",
    "The emergency valve of the ZX-9 opens at 32 bar.",
    "Inspect the quantum gasket of the ZX-9 every 90 days.",
)
_PDF_PAGES = (
    ("ZX-9 Service Manual", "Chapter 1. Pumps", _PDF_FACTS[0], "Check the bearings each month."),
    ("Chapter 2. Valves", _PDF_FACTS[1], "Never block the relief line (see section 2.4)."),
    ("Chapter 3. Seals", _PDF_FACTS[2], "Replace worn seals with genuine parts."),
)

_CP1252_FACT = "The Zéphyr café has served crème brûlée for 4€ since 1987."
_CP1252 = f"Menu notes\r\n\r\n{_CP1252_FACT}\r\nIts chef is named Renée Œhlmann.\r\n"


def write_corpus(root: Path) -> Corpus:
    """Write the mixed test folder into ``root`` (created if missing) and describe it.

    Layout: ``notes.txt``, ``docs/guide.md`` (in a subfolder, to exercise
    recursion), ``veldoria.html``, ``manual.pdf`` (3 pages), ``menu-cp1252.txt``,
    and the bad inputs ``corrupt.pdf``, ``binary.txt``, ``empty.txt``, ``data.xyz``.
    """
    root.mkdir(parents=True, exist_ok=True)
    (root / "docs").mkdir(exist_ok=True)
    text = root / "notes.txt"
    markdown = root / "docs" / "guide.md"
    html = root / "veldoria.html"
    pdf = root / "manual.pdf"
    cp1252_text = root / "menu-cp1252.txt"
    corrupt = root / "corrupt.pdf"
    binary = root / "binary.txt"
    empty = root / "empty.txt"
    unknown = root / "data.xyz"

    text.write_text(_TEXT, encoding="utf-8")
    markdown.write_text(_MARKDOWN, encoding="utf-8")
    html.write_text(_HTML, encoding="utf-8")
    pdf.write_bytes(pdf_bytes(_PDF_PAGES, title="ZX-9 Service Manual"))
    cp1252_text.write_bytes(_CP1252.encode("cp1252"))
    corrupt.write_bytes(corrupt_pdf_bytes())
    binary.write_bytes(b"\x7fELF\x02\x01\x01\x00" + bytes(range(256)) * 16)
    empty.write_bytes(b"")
    unknown.write_text("The xyz format is not supported: the splunge ratio is 42.\n", encoding="utf-8")

    facts = (
        Fact(text, _TEXT_FACT, "At what temperature does the zorblax reactor run?", "451 kelvin"),
        Fact(markdown, _MD_FACT, "Which port does the quokka daemon listen on?", "7431"),
        Fact(markdown, _MD_WIN_FACT, "Where does quokka store its logs on Windows?", "C:\\Quokka\\logs"),
        Fact(markdown, _MD_TROUBLE_FACT, "What to do when the quokka daemon does not start?", "quokka.lock"),
        Fact(html, _HTML_FACT, "What is the capital of Veldoria?", "Marnhaven"),
        Fact(html, _HTML_FACT_2, "What track gauge do Veldorian trains use?", "1,435 mm"),
        Fact(pdf, _PDF_FACTS[0], "How fast does the ZX-9 coolant pump turn?", "1800 rpm", page=1),
        Fact(pdf, _PDF_FACTS[1], "At what pressure does the ZX-9 emergency valve open?", "32 bar", page=2),
        Fact(pdf, _PDF_FACTS[2], "How often should the ZX-9 quantum gasket be inspected?", "90 days", page=3),
        Fact(cp1252_text, _CP1252_FACT, "Since when has the Zéphyr café served crème brûlée?", "1987"),
    )
    return Corpus(
        root=root,
        text=text,
        markdown=markdown,
        html=html,
        pdf=pdf,
        cp1252_text=cp1252_text,
        corrupt_pdf=corrupt,
        binary_txt=binary,
        empty_txt=empty,
        unknown=unknown,
        facts=facts,
    )


# ---------------------------------------------------------------------------- large file

_WORDS = (
    "system",
    "data",
    "river",
    "stone",
    "method",
    "signal",
    "carbon",
    "market",
    "valley",
    "engine",
    "theory",
    "island",
    "network",
    "pattern",
    "garden",
    "window",
    "metal",
    "process",
    "record",
    "table",
    "energy",
    "forest",
    "question",
    "library",
    "harbour",
    "bridge",
    "circuit",
    "measure",
    "sample",
    "station",
    "winter",
    "summer",
    "course",
    "letter",
    "orbit",
    "crystal",
    "lantern",
    "meadow",
    "ledger",
    "factor",
    "module",
    "thread",
    "socket",
    "buffer",
    "kernel",
)

LARGE_TEXT_FACT = "The vault code of the Ostrava lighthouse is 7712-KAPPA."
LARGE_TEXT_QUERY = "What is the vault code of the Ostrava lighthouse?"


def write_large_text(path: Path, size_bytes: int = 50 * MiB, *, seed: int = 7) -> Fact:
    """Write about ``size_bytes`` of ASCII prose paragraphs to ``path``, with one needle fact midway.

    Paragraphs are numbered (so no two are identical) and drawn from a fixed pool,
    which keeps generation at disk speed (well under a second for 50 MiB). Returns the needle.
    """
    rng = random.Random(seed)
    pool = []
    for _ in range(256):
        sentences = []
        for _ in range(rng.randint(3, 7)):
            words = [rng.choice(_WORDS) for _ in range(rng.randint(6, 16))]
            sentences.append(" ".join(words).capitalize() + ".")
        pool.append(" ".join(sentences))
    written = 0
    needle_at = size_bytes // 2
    needle_done = False
    batch: list[str] = []
    batch_len = 0
    i = 0
    with path.open("w", encoding="ascii", newline="\n") as f:
        while written < size_bytes:
            para = f"Paragraph {i}. {pool[i % len(pool)]}\n\n"
            if not needle_done and written + batch_len >= needle_at:
                para = f"Paragraph {i}. {LARGE_TEXT_FACT} {pool[i % len(pool)]}\n\n"
                needle_done = True
            batch.append(para)
            batch_len += len(para)
            i += 1
            if batch_len >= MiB or written + batch_len >= size_bytes:
                f.write("".join(batch))
                written += batch_len
                batch.clear()
                batch_len = 0
    return Fact(path, LARGE_TEXT_FACT, LARGE_TEXT_QUERY, "7712-KAPPA")
