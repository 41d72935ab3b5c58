"""Where the picture may be written: never over a file the report did not write itself.

Every picture is a PNG whose ``Software`` text chunk is :data:`MARKER`; an existing file
is replaced only if it carries that mark.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

#: The ``Software`` text of every picture the report writes.
MARKER = "adaptx.report"
#: The picture's name beside the log.
DEFAULT_NAME = "stability.png"

_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_text(path: str | os.PathLike) -> dict[str, str]:
    """The ``tEXt`` chunks of a PNG file, ``{keyword: text}``; empty if it is not a PNG.

    Args:
      path: a file.

    Returns:
      ``dict[str, str]``, decoded as Latin-1 as the PNG format specifies.

    Examples:
      >>> import tempfile
      >>> with tempfile.NamedTemporaryFile(suffix=".png") as f:
      ...     png_text(f.name)
      {}
    """
    out: dict[str, str] = {}
    with open(path, "rb") as f:
        if f.read(8) != _SIGNATURE:
            return out
        while header := f.read(8):
            if len(header) < 8:
                break
            length, kind = struct.unpack(">I4s", header)
            if kind == b"tEXt":
                keyword, _, text = f.read(length).partition(b"\0")
                out[keyword.decode("latin-1")] = text.decode("latin-1")
                f.seek(4, os.SEEK_CUR)  # the CRC
            elif kind == b"IEND":
                break
            else:
                f.seek(length + 4, os.SEEK_CUR)
    return out


def written_by_report(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a picture this report wrote (a PNG marked with :data:`MARKER`)."""
    try:
        return png_text(path).get("Software", "").startswith(MARKER)
    except OSError:
        return False


def check_target(out: str | os.PathLike, source: str | os.PathLike | None = None) -> Path:
    """Checks that the picture may be written to ``out``.

    Args:
      out: the picture's path; it must end in ``.png``.
      source: the log the picture is made from, never to be overwritten.

    Returns:
      ``out`` as a ``Path``.

    Raises:
      FileExistsError: if ``out`` is ``source``, or exists and is not a picture this
        report wrote (a PNG it marked), or is a directory.
      ValueError: if ``out`` does not end in ``.png``.

    Examples:
      >>> str(check_target("run/stability.png"))
      'run/stability.png'
      >>> check_target("run/metrics.jsonl")
      Traceback (most recent call last):
      ...
      ValueError: run/metrics.jsonl: the picture is a PNG; give a path ending in .png
    """
    out = Path(out)
    if source is not None and out.exists() and os.path.samefile(out, source):
        raise FileExistsError(f"{out}: refusing to overwrite the metrics log with the picture")
    if out.suffix.lower() != ".png":
        raise ValueError(f"{out}: the picture is a PNG; give a path ending in .png")
    if out.is_dir():
        raise FileExistsError(f"{out}: is a directory; give the picture's file name")
    if out.exists() and not written_by_report(out):
        raise FileExistsError(
            f"{out}: refusing to overwrite a file the report did not write; "
            "remove it or choose another --out"
        )
    return out
