"""What every ``rag`` command shares: settings, logging, consoles, error exits, common options.

A CLI command is a composition root: it reads :class:`~core.settings.Settings` here, builds its
objects through :mod:`core.wiring`, and turns domain errors into one red line and exit status 1
(never a traceback for bad input).
"""

from __future__ import annotations

import logging
from typing import Annotated, NoReturn

import typer
from rich.console import Console

from core.settings import Settings

console = Console()
err_console = Console(stderr=True)

VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="Log progress details.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object instead of a table.")]

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


def setup_logging(verbose: bool) -> None:
    """Plain log lines on stderr: INFO with ``--verbose``, else warnings of our own code only."""
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
    """``path`` shortened from the left to ``width`` characters (the file name is what identifies it)."""
    return path if len(path) <= width else "…" + path[-(width - 1) :]


def lower_priority(increment: int) -> None:
    """Make this process yield the CPU to others (``os.nice``); a no-op where unsupported or 0."""
    import os

    if increment > 0 and hasattr(os, "nice"):
        try:
            os.nice(increment)
        except OSError:  # not permitted: keep going at the normal priority
            logging.getLogger(__name__).warning("could not lower the process priority")
