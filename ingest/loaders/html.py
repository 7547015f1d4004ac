"""HTML loader (``.html``, ``.htm``): the visible text, with paragraphs kept apart.

Parsing is lexbor's (via selectolax), which follows the HTML5 parsing rules and
so accepts broken markup the way a browser does. The encoding is resolved the
way the HTML standard does it, more or less: a BOM, else a ``<meta charset>`` /
``http-equiv`` declaration near the top, else UTF-8, else windows-1252.

Text extraction rules:

* ``script``, ``style``, ``noscript``, ``template``, ``head`` (and so everything
  in it but the title, which is read separately), ``svg``, ``math``, embedded
  objects, form controls and elements with the ``hidden`` attribute produce no
  text; neither does site navigation (``<nav>``, ``role="navigation"`` or
  ``"search"``), which would otherwise repeat on every page of a site; image
  ``alt`` text is not visible and is left out too, as are Sphinx's ``¶`` permalinks;
* block elements (``p``, headings, lists, tables, ``div``...) end a line;
  paragraph-like ones leave a blank line, so paragraphs survive for the splitter;
* inside a block, runs of whitespace collapse to one space; ``<pre>`` keeps its
  line breaks and indentation; ``<br>`` is a line break; table cells are
  separated by `` | ``.
"""

from __future__ import annotations

import codecs
import re
from pathlib import Path

from selectolax.lexbor import LexborHTMLParser, LexborNode

from ingest.loaders.base import (
    DEFAULT_MAX_BYTES,
    EmptyFileError,
    LoadedDocument,
    check_not_binary,
    normalize_newlines,
    read_bytes,
    sniff_bom,
)

FORMAT = "html"

# How far into the file a charset declaration is looked for (the standard says 1024 bytes;
# real pages put long comments or scripts before it, so look a bit further).
_PRESCAN_BYTES = 4096
_META_CHARSET = re.compile(
    rb"""<meta[^>]+?charset\s*=\s*["']?\s*([A-Za-z0-9._:-]+)""",
    re.IGNORECASE,
)
# Labels the HTML standard maps to windows-1252 (a superset that browsers use in their place).
_WINDOWS_1252_LABELS = frozenset({"iso-8859-1", "iso8859-1", "latin1", "latin-1", "l1", "us-ascii", "ascii"})

_SKIP_TAGS = frozenset(
    {
        "head",
        "nav",
        "script",
        "style",
        "noscript",
        "template",
        "svg",
        "math",
        "iframe",
        "object",
        "embed",
        "canvas",
        "select",
        "button",
        "input",
        "textarea",
        "-comment",
        "-doctype",
    }
)
# Blocks that end a paragraph (a blank line around them).
_PARAGRAPH_TAGS = frozenset(
    {
        "p",
        "h1",
        "h2",
        "h3",
        "h4",
        "h5",
        "h6",
        "blockquote",
        "pre",
        "ul",
        "ol",
        "dl",
        "table",
        "section",
        "article",
        "header",
        "footer",
        "aside",
        "main",
        "figure",
        "form",
        "fieldset",
        "address",
        "details",
        "hr",
        "body",
    }
)
# Blocks that end a line.
_LINE_TAGS = frozenset({"div", "li", "dt", "dd", "tr", "caption", "figcaption", "summary", "legend", "option", "br"})
# Site chrome rather than content (Sphinx marks its sidebars and link bars this way).
_SKIP_ROLES = frozenset({"navigation", "search"})
_CELL_TAGS = frozenset({"td", "th"})
_WHITESPACE = re.compile(r"\s+")

_LINE, _PARAGRAPH = 1, 2


def decode_html(data: bytes) -> tuple[str, str]:
    """Decode HTML bytes; return ``(text, encoding)``.

    Order: BOM, then a charset declared in a ``<meta>`` tag near the top (invalid
    bytes become U+FFFD, as in a browser), then strict UTF-8, then windows-1252.

    Raises:
        BinaryFileError: no BOM and the content looks binary.
    """
    codec = sniff_bom(data)
    if codec is not None:
        return data.decode(codec, errors="replace"), codec.removesuffix("-sig")
    check_not_binary(data)
    declared = _declared_charset(data[:_PRESCAN_BYTES])
    if declared is not None:
        try:
            return data.decode(declared, errors="replace"), declared
        except LookupError:  # a codec that is not a text encoding ("base64", "rot13"...)
            pass
    try:
        return data.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        return data.decode("cp1252", errors="replace"), "cp1252"


def _declared_charset(head: bytes) -> str | None:
    m = _META_CHARSET.search(head)
    if m is None:
        return None
    label = m.group(1).decode("ascii").lower()
    if label in _WINDOWS_1252_LABELS:
        return "cp1252"
    try:
        name = codecs.lookup(label).name
    except LookupError:
        return None
    # A page saved as UTF-16 yet declaring it in ASCII cannot exist (the standard says: use UTF-8).
    return "utf-8" if name.startswith("utf-16") or name.startswith("utf-32") else name


def _collapse(text: str) -> str:
    return _WHITESPACE.sub(" ", text).strip()


class _TextBuilder:
    """Accumulates inline text and block breaks into lines and paragraphs."""

    def __init__(self) -> None:
        self._out: list[str] = []
        self._inline: list[str] = []
        self._pending = 0

    def text(self, s: str) -> None:
        self._inline.append(s)

    def separate_cells(self) -> None:
        if _collapse("".join(self._inline)):
            self._inline.append(" | ")

    def brk(self, strength: int) -> None:
        self._flush()
        self._pending = max(self._pending, strength)

    def preformatted(self, s: str) -> None:
        self.brk(_PARAGRAPH)
        block = "\n".join(line.rstrip() for line in normalize_newlines(s).split("\n")).strip("\n")
        if block.strip():
            self._emit(block)
        self._pending = _PARAGRAPH

    def result(self) -> str:
        self._flush()
        return "".join(self._out)

    def _flush(self) -> None:
        if not self._inline:
            return
        s = _collapse("".join(self._inline))
        # A row that ended after a cell leaves a dangling separator.
        s = s.removesuffix(" |").removeprefix("| ").strip()
        self._inline.clear()
        if s:
            self._emit(s)

    def _emit(self, s: str) -> None:
        if self._out:
            self._out.append("\n\n" if self._pending >= _PARAGRAPH else "\n")
        self._out.append(s)
        self._pending = 0


def _has_class(class_attr: str | None, name: str) -> bool:
    """Tell whether a ``class`` attribute value lists ``name``."""
    return class_attr is not None and name in class_attr.split()


def _is_hidden_or_navigation(node: LexborNode) -> bool:
    attrs = node.attrs
    if "hidden" in attrs or attrs.get("role") in _SKIP_ROLES:
        return True
    # Sphinx's "¶" permalink after every heading.
    return _has_class(attrs.get("class"), "headerlink")


_HEADING_LEVELS = {"h1": 1, "h2": 2, "h3": 3, "h4": 4, "h5": 5, "h6": 6}


def _visible_text(root: LexborNode, *, heading_marks: bool = False) -> str:
    out = _TextBuilder()
    # Iterative walk with explicit exit markers: broken pages can nest deeper than the recursion limit.
    stack: list[tuple[LexborNode, bool]] = [(root, False)]
    while stack:
        node, leaving = stack.pop()
        tag = node.tag or ""
        if leaving:
            if tag in _PARAGRAPH_TAGS:
                out.brk(_PARAGRAPH)
            elif tag in _LINE_TAGS:
                out.brk(_LINE)
            continue
        if tag == "-text":
            out.text(node.text_content or "")
            continue
        if tag in _SKIP_TAGS or (node.is_element_node and _is_hidden_or_navigation(node)):
            continue
        if tag == "pre":
            out.preformatted(node.text(deep=True))
            continue
        if tag in _PARAGRAPH_TAGS:
            out.brk(_PARAGRAPH)
            if heading_marks and tag in _HEADING_LEVELS and node.text(deep=True).strip():
                out.text("#" * _HEADING_LEVELS[tag] + " ")
        elif tag in _LINE_TAGS:
            out.brk(_LINE)
        elif tag in _CELL_TAGS:
            out.separate_cells()
        stack.append((node, True))
        children = list(node.iter(include_text=True))
        stack.extend((child, False) for child in reversed(children))
    return out.result()


def _title(tree: LexborHTMLParser) -> str | None:
    for selector in ("title", "h1"):
        node = tree.css_first(selector)
        if node is not None:
            title = _collapse(node.text(deep=True))
            if title:
                return title
    return None


def html_text(data: bytes, *, heading_marks: bool = False) -> str:
    """The visible text of an HTML (or XHTML) document by this module's rules.

    With ``heading_marks``, ``<h1>``-``<h6>`` are written as markdown headings (``## Title``),
    for loaders whose documents are read as markdown (EPUB chapters, HTML e-mail bodies).

    Raises:
        BinaryFileError: no BOM and the content looks binary.
    """
    markup, _ = decode_html(data)
    tree = LexborHTMLParser(markup)
    root = tree.body or tree.root
    return _visible_text(root, heading_marks=heading_marks) if root is not None else ""


class HtmlLoader:
    """Loads the visible text of an HTML page; title = ``<title>``, else the first ``<h1>``, else the stem."""

    extensions: tuple[str, ...] = (".html", ".htm")

    def __init__(self, *, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.max_bytes = max_bytes

    def load(self, path: Path) -> LoadedDocument:
        """Return the visible text of ``path``; raise a ``LoaderError`` subclass on failure.

        Raises:
            FileTooLargeError, LoaderError: the file cannot be read within the limit.
            BinaryFileError: the file holds binary content.
            EmptyFileError: the page has no visible text.
        """
        data = read_bytes(path, self.max_bytes)
        if not data.strip():
            raise EmptyFileError("empty file")
        markup, encoding = decode_html(data)
        tree = LexborHTMLParser(markup)
        title = _title(tree)
        root = tree.body or tree.root
        text = _visible_text(root) if root is not None else ""
        if not text.strip():
            raise EmptyFileError("no visible text in the HTML page")
        return LoadedDocument(
            text=text,
            format=FORMAT,
            title=title or path.stem,
            metadata={"encoding": encoding},
        )
