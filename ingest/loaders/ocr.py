"""OCR of PDF pages with Tesseract: render the page with PDFium (pypdfium2), read it with the
``tesseract`` program (Debian's ``tesseract-ocr`` and ``tesseract-ocr-eng``).

Tesseract is run as a process per page (PNG on its standard input, text on its standard
output), with a time limit and ``OMP_THREAD_LIMIT=1``: on a small shared machine one thread
per page is steadier than OpenMP's fight for cores, and a page that hangs is cut off instead
of holding the job. A page is rendered in grayscale at ``dpi`` (300 is Tesseract's sweet spot),
scaled down when that would exceed :data:`MAX_PIXELS` (a hostile page size must not allocate
gigabytes). A page that renders blank (every pixel near white: an empty page between chapters)
is not sent to Tesseract at all.

PDFium is not thread-safe; the pipeline prepares files on one thread, and pypdfium2
serializes calls itself.
"""

from __future__ import annotations

import functools
import io
import math
import os
import shutil
import subprocess
import time
from dataclasses import dataclass, field

MAX_PIXELS = 40_000_000
"""Largest rendered page (pixels); an A4 page at 300 dpi is 8.7 million."""
BLANK_ABOVE = 245
"""A rendered page whose darkest pixel is lighter than this (0 black, 255 white) is blank."""


class OcrError(Exception):
    """One page could not be read (rendering failed, Tesseract failed or timed out)."""


@dataclass(slots=True)
class OcrStats:
    """What OCR cost on one document."""

    pages: list[int] = field(default_factory=list)
    seconds: float = 0.0


@functools.cache
def tesseract_path(binary: str = "tesseract") -> str | None:
    """Where the Tesseract program is, or ``None`` when it is not installed."""
    return shutil.which(binary)


class TesseractOcr:
    """Reads the text of rendered PDF pages.

    Args:
        language: Tesseract language(s) (``eng``, ``eng+deu``); the traineddata must be installed.
        dpi: Rendering resolution.
        timeout_seconds: Time limit of one page's Tesseract run.
        binary: The program's name or path.
    """

    def __init__(
        self, *, language: str = "eng", dpi: int = 300, timeout_seconds: float = 120.0, binary: str = "tesseract"
    ) -> None:
        self.language = language
        self.dpi = dpi
        self.timeout_seconds = timeout_seconds
        self.binary = binary

    @property
    def available(self) -> bool:
        """Whether the Tesseract program is installed."""
        return tesseract_path(self.binary) is not None

    def open(self, data: bytes) -> object:
        """Open a PDF for rendering (a ``pypdfium2.PdfDocument``); close it with :meth:`close`.

        Raises:
            OcrError: PDFium cannot open it.
        """
        import pypdfium2 as pdfium  # imported lazily: only needed for pages without text

        try:
            return pdfium.PdfDocument(data)
        except Exception as e:  # PdfiumError, or a password PDFium cannot open
            raise OcrError(f"cannot render the PDF: {e}") from e

    @staticmethod
    def close(document: object) -> None:
        """Release a document opened by :meth:`open`."""
        close = getattr(document, "close", None)
        if close is not None:
            close()

    def page_text(self, document: object, index: int) -> str | None:
        """OCR page ``index`` (0-based) of a document opened by :meth:`open`; ``None`` when the
        page renders blank (nothing to read, Tesseract not run).

        Raises:
            OcrError: rendering failed, or Tesseract failed or ran out of time.
        """
        png = self._render(document, index)
        if png is None:
            return None
        path = tesseract_path(self.binary)
        if path is None:
            raise OcrError("Tesseract is not installed (apt-get install tesseract-ocr tesseract-ocr-eng)")
        env = {**os.environ, "OMP_THREAD_LIMIT": "1"}
        try:
            done = subprocess.run(
                [path, "stdin", "stdout", "-l", self.language, "--psm", "3"],
                input=png,
                capture_output=True,
                timeout=self.timeout_seconds,
                env=env,
                check=False,
            )
        except subprocess.TimeoutExpired as e:
            raise OcrError(f"Tesseract took longer than {self.timeout_seconds:g} s") from e
        except OSError as e:
            raise OcrError(f"cannot run Tesseract: {e}") from e
        if done.returncode != 0:
            lines = done.stderr.decode("utf-8", "replace").strip().splitlines()
            raise OcrError(f"Tesseract failed ({done.returncode}): {lines[-1] if lines else 'no message'}")
        return done.stdout.decode("utf-8", "replace")

    def _render(self, document: object, index: int) -> bytes | None:
        try:
            page = document[index]  # type: ignore[index]
            try:
                width, height = page.get_size()
                scale = self.dpi / 72
                if width * height * scale * scale > MAX_PIXELS:
                    scale = math.sqrt(MAX_PIXELS / max(width * height, 1.0))
                image = page.render(scale=scale, grayscale=True).to_pil()
            finally:
                page.close()
            darkest, _ = image.convert("L").getextrema()
            if darkest >= BLANK_ABOVE:
                return None
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
        except Exception as e:  # a page PDFium cannot draw
            raise OcrError(f"cannot render page {index + 1}: {type(e).__name__}: {e}") from e
        return buffer.getvalue()


def timed_page_text(ocr: TesseractOcr, document: object, index: int, stats: OcrStats) -> str | None:
    """:meth:`TesseractOcr.page_text`, its time added to ``stats`` (failures included)."""
    start = time.perf_counter()
    try:
        return ocr.page_text(document, index)
    finally:
        stats.seconds += time.perf_counter() - start
