"""An earlier revision of ``adaptx``, importable beside the working tree's, for paired runs.

``load(rev)`` exports ``adaptx/`` at git revision ``rev`` into a temporary folder, renames
the package to ``adaptx_before`` (its own imports included) and imports it. Both versions
then live in one process, so their steps can be timed in the same interleaved rounds
(``python -m bench.paired engine``). Each keeps its own module-level state (the scale
hints' table, for one).
"""

from __future__ import annotations

import importlib
import io
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

NAME = "adaptx_before"
_IMPORT = re.compile(r"\b(from|import)\s+adaptx\b")
_ROOT = Path(__file__).resolve().parent.parent


def export(rev: str, into: Path) -> Path:
    """Writes ``adaptx/`` at ``rev`` as the package ``into / NAME``; returns its folder."""
    archive = subprocess.run(
        ["git", "archive", "--format=tar", rev, "adaptx"],
        cwd=_ROOT,
        check=True,
        capture_output=True,
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    package = into / NAME
    (into / "adaptx").rename(package)
    for path in package.rglob("*.py"):
        text = path.read_text()
        path.write_text(_IMPORT.sub(rf"\1 {NAME}", text))
    return package


def load(rev: str):
    """The ``adaptx`` package as it was at git revision ``rev``, imported as ``NAME``."""
    if NAME in sys.modules:
        raise RuntimeError(f"{NAME} is already imported; load(rev={rev!r}) once per process")
    folder = Path(tempfile.mkdtemp(prefix="adaptx-before-"))
    export(rev, folder)
    sys.path.insert(0, str(folder))
    return importlib.import_module(NAME)
