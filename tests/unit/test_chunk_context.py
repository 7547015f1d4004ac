"""The context line embedded before a chunk."""

from __future__ import annotations

import pytest

from retrieval.chunk_context import chunk_context, embedded_text

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("title", "heading", "expected"),
    [
        (None, None, None),
        ("", "  ", None),
        ("Python FAQ", None, "Python FAQ"),
        (None, "Install > Linux", "Install > Linux"),
        ("Guide", "Install > Linux", "Guide > Install > Linux"),
        # A markdown heading path that starts with the title does not repeat it.
        ("Guide", "Guide > Install", "Guide > Install"),
        ("Guide", "Guide", "Guide"),
        # Only a whole first level counts as the title.
        ("Guide", "Guidelines > Style", "Guide > Guidelines > Style"),
        # One line, whatever the title held.
        ("  Multi\nline\ttitle ", None, "Multi line title"),
    ],
)
def test_chunk_context(title: str | None, heading: str | None, expected: str | None) -> None:
    assert chunk_context(title, heading) == expected


def test_embedded_text() -> None:
    assert embedded_text("Body.", "Guide > Install") == "Guide > Install\nBody."
    assert embedded_text("Body.", None) == "Body."
    assert embedded_text("Body.", "") == "Body."
