"""E-mail loader (``.eml``) built on the standard library's ``email`` package (RFC 5322/MIME).

The text is the message's main headers (From, To, Cc, Date, Subject), then its body (the
plain-text alternative, else the HTML one read by the HTML loader's rules), then each text
attachment (``text/plain``, ``text/markdown``, ``text/csv``, ``text/html``) as its own section.
Locations: ``message`` for the headers and body, ``attachment <name>`` for an attachment.
Other attachments (PDFs, images, nested messages) are not read; each is named in a warning
of the extraction report. The title is the subject.
"""

from __future__ import annotations

from email import policy
from email.message import EmailMessage
from email.parser import BytesParser
from pathlib import Path

from ingest.loaders.base import (
    CorruptFileError,
    EmptyFileError,
    LoadedDocument,
    LoaderLimits,
    PageSpan,
    decode_text,
    normalize_newlines,
    read_bytes,
)
from ingest.loaders.containers import library_errors
from ingest.loaders.html import html_text
from ingest.loaders.structured import collapse

FORMAT = "eml"
SECTION_SEPARATOR = "\n\n"
BODY_LABEL = "message"
_HEADERS = ("From", "To", "Cc", "Date", "Subject")
_TEXT_ATTACHMENTS = frozenset({"text/plain", "text/markdown", "text/x-markdown", "text/csv", "text/html"})


def _part_text(part: EmailMessage) -> str:
    """The decoded text of a text part (HTML read as visible text), newlines normalised."""
    if part.get_content_type() == "text/html":
        payload = part.get_payload(decode=True)
        return html_text(payload if isinstance(payload, bytes) else b"")
    try:
        content = part.get_content()
    except (LookupError, UnicodeError, KeyError):  # an unknown or wrong charset label
        payload = part.get_payload(decode=True)
        content = decode_text(payload)[0] if isinstance(payload, bytes) else ""
    text = content if isinstance(content, str) else ""
    return "\n".join(line.rstrip() for line in normalize_newlines(text).split("\n")).strip()


class EmlLoader:
    """Loads an e-mail message: headers and body, then its text attachments."""

    extensions: tuple[str, ...] = (".eml",)

    def __init__(self, *, limits: LoaderLimits | None = None) -> None:
        self.limits = limits or LoaderLimits()

    def load(self, path: Path) -> LoadedDocument:
        """Return the text of the message in ``path``.

        Raises:
            FileTooLargeError, LoaderError: the file cannot be read within the limit.
            CorruptFileError: not an e-mail message (none of its main headers), or damaged MIME.
            EmptyFileError: neither headers nor body hold text.
        """
        data = read_bytes(path, self.limits.max_bytes)
        if not data.strip():
            raise EmptyFileError("empty file")
        sections: list[tuple[str, str]] = []
        warnings: list[str] = []
        with library_errors("e-mail message"):
            message = BytesParser(policy=policy.default).parsebytes(data)
            assert isinstance(message, EmailMessage)
            headers = [(name, collapse(str(message.get(name, "")))) for name in _HEADERS]
            if not any(value for _, value in headers):
                raise CorruptFileError("not an e-mail message: it has no From, To, Date or Subject header")
            head = "\n".join(f"{name}: {value}" for name, value in headers if value)
            body_part = message.get_body(preferencelist=("plain", "html"))
            body = _part_text(body_part) if isinstance(body_part, EmailMessage) else ""
            sections.append((BODY_LABEL, f"{head}\n\n{body}".strip()))
            for part in message.iter_attachments():
                if not isinstance(part, EmailMessage):
                    continue
                name = collapse(part.get_filename() or "") or "unnamed"
                kind = part.get_content_type()
                if kind not in _TEXT_ATTACHMENTS:
                    warnings.append(f"attachment {name} ({kind}) not read")
                    continue
                text = _part_text(part)
                if text:
                    sections.append((f"attachment {name}", text))
            subject = collapse(str(message.get("Subject", "")))
        parts: list[str] = []
        spans: list[PageSpan] = []
        offset = 0
        for label, text in sections:
            if not text:
                continue
            if parts:
                parts.append(SECTION_SEPARATOR)
                offset += len(SECTION_SEPARATOR)
            parts.append(text)
            spans.append(PageSpan(start=offset, end=offset + len(text), page=None, label=label))
            offset += len(text)
        if not spans:
            raise EmptyFileError("the message has no text")
        metadata = {name.lower(): value for name, value in headers if value and name != "Subject"}
        return LoadedDocument(
            text="".join(parts),
            format=FORMAT,
            pages=tuple(spans),
            title=subject or path.stem,
            metadata=metadata,
            warnings=tuple(warnings),
        )
