"""Print the project's requirements, one per line, for ``pip install --requirement``.

Used by ``docker/Dockerfile`` so the dependency layer is built from ``pyproject.toml`` alone and a code
change does not reinstall every dependency. Standard library only (it runs before anything is installed).

    python docker/requirements.py [pyproject.toml] [EXTRAS]

``EXTRAS`` is a comma-separated list of optional-dependency groups (``gpu``). The ``faiss-gpu-*`` and
``faiss-cpu`` wheels both install the ``faiss`` module, so when an extra brings a GPU FAISS the CPU one
is left out.
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path


def _name(requirement: str) -> str:
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    return match.group(1).lower().replace("_", "-") if match else ""


def requirements(pyproject: Path, extras: str = "") -> list[str]:
    """The dependencies of ``pyproject`` plus those of each extra named in ``extras`` (comma-separated).

    Raises:
        KeyError: an extra that ``pyproject`` does not define.
    """
    project = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]
    reqs = list(project["dependencies"])
    for extra in (e.strip() for e in extras.split(",")):
        if extra:
            reqs.extend(project["optional-dependencies"][extra])
    if any(_name(r).startswith("faiss-gpu") for r in reqs):
        reqs = [r for r in reqs if _name(r) != "faiss-cpu"]
    return reqs


if __name__ == "__main__":
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("pyproject.toml")
    print("\n".join(requirements(path, sys.argv[2] if len(sys.argv) > 2 else "")))
