"""What every ``rag`` command shares: settings, logging, consoles, error exits, common options.

A CLI command is a composition root: it reads :class:`~core.settings.Settings` here, builds its
objects through :mod:`core.wiring`, and turns domain errors into one red line and exit status 1
(never a traceback for bad input).
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Annotated, NoReturn

import typer
from rich.console import Console

from core.settings import Settings

if TYPE_CHECKING:
    from app.cli.remote import ApiClient, ApiError

console = Console()
err_console = Console(stderr=True)

VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="Log progress details.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object instead of a table.")]
LocalOpt = Annotated[
    bool,
    typer.Option(
        "--local",
        help="Run in this process (loads the model and index) even when the API at server.host:port is up.",
    ),
]

# Libraries that report recoverable oddities (pypdf/fontTools on real-world PDFs) or progress bars
# (model loading) as warnings; a user sees them with --verbose only.
_NOISY = ("pypdf", "fontTools", "sentence_transformers", "transformers", "generation", "httpx")


def load_settings(**sections: dict[str, object]) -> Settings:
    """The configuration (``RAG_*`` variables and ``.env``), with per-section overrides; fails cleanly."""
    from pydantic import ValidationError

    try:
        return Settings(**sections)  # type: ignore[arg-type]
    except ValidationError as e:
        fail("; ".join(str(err["msg"]).removeprefix("Value error, ") for err in e.errors()))


def quiet_model_loading(quiet: bool = True) -> None:
    """Turn off Hugging Face's progress bars (``Loading weights: 100%…``) unless the user asked
    for details. Must run before transformers is imported: it reads the switch once, at import."""
    if quiet:
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def setup_logging(verbose: bool) -> None:
    """Plain log lines on stderr: INFO with ``--verbose``, else warnings of our own code only (and
    no model-loading progress bars)."""
    quiet_model_loading(not verbose)
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    for noisy in _NOISY:
        logging.getLogger(noisy).setLevel(logging.INFO if verbose else logging.ERROR)


def fail(message: str, code: int = 1) -> NoReturn:
    """Print ``error: message`` on stderr and exit with ``code``."""
    from rich.markup import escape

    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False)
    raise typer.Exit(code)


def short_path(path: str, width: int = 48) -> str:
    """``path`` shortened from the left to ``width`` characters (the file name is what identifies it).

    The file name itself is never cut, even when it alone is longer than ``width``.
    """
    if len(path) <= width:
        return path
    name = path.rsplit("/", 1)[-1]
    keep = max(width - 1, len(name))
    return "…" + path[-keep:]


def path_width(console_width: int, fixed: int, share: float = 0.5, floor: int = 24) -> int:
    """How many characters a path column gets in a table ``console_width`` wide whose other
    fixed-width columns and borders take ``fixed``: ``share`` of what is left, at least ``floor``."""
    return max(floor, int((console_width - fixed) * share))


def api_client(settings: Settings, *, local: bool) -> ApiClient | None:
    """The running API's client for a command that can use one (``None``: run in-process)."""
    if local:
        return None
    from app.cli.remote import connect

    return connect(settings)


def api_failure(e: ApiError, settings: Settings) -> NoReturn:
    """Exit with the API's error, and what to do about a missing or refused key."""
    hint = ""
    if e.status in (401, 403) and settings.cli.api_key is None:
        hint = f" (the API at {settings.api_url} wants a key: set RAG_CLI__API_KEY, or pass --local)"
    fail(f"{e}{hint}")


def lower_priority(increment: int) -> None:
    """Make this process yield the CPU to others (``os.nice``); a no-op where unsupported or 0."""
    import os

    if increment > 0 and hasattr(os, "nice"):
        try:
            os.nice(increment)
        except OSError:  # not permitted: keep going at the normal priority
            logging.getLogger(__name__).warning("could not lower the process priority")


def limit_malloc_arenas(arenas: int = 2) -> bool:
    """Cap glibc's malloc arenas for this process (``M_ARENA_MAX``); ``False`` where not applied.

    glibc gives threads their own arenas (up to 8 per core) and rarely returns their free pages,
    so a server whose requests hop across many threads (retrieval, the answer checks, the database
    driver) grows its resident memory with every burst. Measured with ``bench/load.py`` (one run
    each, after a warm-up): RSS growth over the run 24 % by default, 10 % with two arenas. Call it
    before the threads start; ``MALLOC_ARENA_MAX`` in the environment, if set, wins.
    """
    import ctypes
    import ctypes.util
    import os
    import sys

    if not sys.platform.startswith("linux") or "MALLOC_ARENA_MAX" in os.environ:
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        # -8 is M_ARENA_MAX in glibc's malloc.h; mallopt returns 1 on success.
        return bool(libc.mallopt(ctypes.c_int(-8), ctypes.c_int(arenas)) == 1)
    except (OSError, AttributeError):  # musl and others have no mallopt: their allocator differs anyway
        logging.getLogger(__name__).debug("malloc arenas left as they are")
        return False
