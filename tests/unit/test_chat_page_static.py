"""The chat page's static files, without a browser (tests/e2e/test_chat_page.py drives a real one)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from app.web import STATIC_DIR, mount_chat_page

pytestmark = pytest.mark.unit

INDEX = STATIC_DIR / "index.html"
SCRIPT = STATIC_DIR / "app.js"


class _Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.ids: set[str] = set()
        self.label_for: set[str] = set()
        self.controls: list[dict[str, str | None]] = []
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if a.get("id"):
            self.ids.add(str(a["id"]))
        if tag == "label" and a.get("for"):
            self.label_for.add(str(a["for"]))
        if tag in ("input", "select", "textarea"):
            self.controls.append(a)
        for attr in ("src", "href"):
            if a.get(attr):
                self.urls.append(str(a[attr]))


def _page() -> _Page:
    parser = _Page()
    parser.feed(INDEX.read_text(encoding="utf-8"))
    return parser


def test_mounted_page_and_assets_are_served() -> None:
    app = FastAPI()
    mount_chat_page(app)
    client = TestClient(app)
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert page.headers["cache-control"] == "no-cache"
    assert 'src="static/app.js"' in page.text
    for name, kind in (("app.js", "javascript"), ("app.css", "text/css")):
        asset = client.get(f"/static/{name}")
        assert asset.status_code == 200 and kind in asset.headers["content-type"], name
    assert "/" not in app.openapi()["paths"]


def test_every_element_the_script_uses_exists() -> None:
    ids = _page().ids
    used = set(re.findall(r"""\$\("([A-Za-z0-9_-]+)"\)""", SCRIPT.read_text(encoding="utf-8")))
    assert used, "the script looks elements up with $(id)"
    assert used <= ids, f"missing in index.html: {sorted(used - ids)}"


def test_every_control_has_a_label() -> None:
    page = _page()
    for control in page.controls:
        named = control.get("id") in page.label_for or control.get("aria-label") or control.get("aria-labelledby")
        assert named, f"control without a label: {control}"


def test_urls_are_relative_so_the_page_works_under_a_path_prefix() -> None:
    page = _page()
    assert page.urls and all(not u.startswith(("/", "http:", "https:")) for u in page.urls if u != "#question")
    script = SCRIPT.read_text(encoding="utf-8")
    # REST and websocket URLs are built from the page's own location.
    assert 'new URL(".", window.location.href)' in script
    assert not re.search(r"""(api|fetch)\(\s*["'`]/""", script)


def test_server_text_never_becomes_html() -> None:
    # Answers, snippets and paths come from documents and the model: they go in as text nodes only.
    script = SCRIPT.read_text(encoding="utf-8")
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
        assert sink not in script, sink


def test_script_parses() -> None:
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed: the browser test parses the script instead")
    proc = subprocess.run([node, "--check", str(SCRIPT)], capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr


def test_static_files_ship_in_the_package() -> None:
    pyproject = (Path(__file__).resolve().parents[2] / "pyproject.toml").read_text(encoding="utf-8")
    data = re.search(r'^"\*" = \[(.*)\]$', pyproject, re.MULTILINE)
    assert data is not None
    for ext in ("*.html", "*.js", "*.css"):
        assert f'"{ext}"' in data.group(1), f"{ext} is not package data: the wheel (and the image) would lack it"


def test_sources_show_their_location() -> None:
    """The page names where a source is as the server does (slide, sheet and rows, heading path),
    falling back to the page number for servers that send none: ``whereText`` run by node."""
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed: the browser test covers the page")
    script = SCRIPT.read_text(encoding="utf-8")
    m = re.search(r"^  function whereText\(item\) \{\n.*?^  \}\n", script, re.MULTILINE | re.DOTALL)
    assert m is not None, "app.js defines whereText"
    cases = [
        {"location": "slide 2, Launch plan", "page": 2},
        {"location": "Prices, rows 12-24", "page": None},
        {"location": None, "page": 4},
        {"page": None},
        None,
    ]
    program = m.group(0) + f"console.log(JSON.stringify({json.dumps(cases)}.map(whereText)));"
    proc = subprocess.run([node, "-e", program], capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == ["slide 2, Launch plan", "Prices, rows 12-24", "page 4", "", ""]
    # Every place the page shows a source's position goes through it.
    assert "`page ${" not in script.replace('return item.page ? `page ${item.page}` : "";', "")
