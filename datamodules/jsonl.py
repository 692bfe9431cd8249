"""Reading JSON Lines records with errors that name the file and line (shared by the data modules' readers)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


def _colon(path: Path, lineno: int) -> str:
    return f"{path}:{lineno}"


def iter_jsonl(path: str | Path, where: Callable[[Path, int], str] = _colon) -> Iterator[tuple[int, str, dict[str, Any]]]:
    """Yield ``(line number, location, record)`` for every non-blank line of a JSONL file (UTF-8, BOM allowed).

    ``where(path, lineno)`` formats the location used in errors (and yielded for the caller's own checks); the
    default is ``path:lineno``. The file is read as is, never modified.

    Raises:
        FileNotFoundError: ``path`` is not a file.
        ValueError: a line that is not valid JSON, or not a JSON object (location, parser message and column).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"file not found: {path}")
    with path.open(encoding="utf-8-sig") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            loc = where(path, lineno)
            try:
                obj = json.loads(line.rstrip("\r\n"))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{loc}: not valid JSON ({exc.msg} at column {exc.colno})") from None
            if not isinstance(obj, dict):
                raise ValueError(f"{loc}: expected a JSON object, got {type(obj).__name__}")  # noqa: TRY004
            yield lineno, loc, obj
