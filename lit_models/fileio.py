"""Crash-safe file writing shared by the DataModules, models and scripts.

- :func:`atomic_write`: a file is written to a temporary name in its directory, flushed to disk and moved into place
  with ``os.replace``, so a reader (another rank, a resumed run) sees the old file or the new one, never half of one.
- :func:`atomic_dir`: a directory is filled under a temporary name beside it and renamed into place, so a reader
  sees a complete directory or none (caches of tokenizers, token streams, converted models).
- :func:`build_once`: build a cache entry under a ``FileLock`` unless it exists, so DDP ranks and parallel runs
  build it exactly once.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO

from filelock import FileLock

__all__ = ["atomic_dir", "atomic_write", "build_once"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, content: str | bytes | Callable[[IO[bytes]], object]) -> Path:
    """Write ``content`` to ``path`` atomically; parent directories are created.

    Args:
        path: the target file.
        content: text (UTF-8, ``\\n`` newlines), bytes, or a function that writes into the open binary file
            (``torch.save(obj, fh)``, ``fig.savefig(fh, format="png")``).

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the result the mode open() would
        with os.fdopen(fd, "wb") as fh:
            if isinstance(content, str):
                fh.write(content.encode("utf-8"))
            elif isinstance(content, bytes):
                fh.write(content)
            else:
                content(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_dir(target: str | os.PathLike, fill: Callable[[Path], object]) -> Path:
    """Call ``fill(tmp)`` on a fresh temporary directory beside ``target`` and rename it to ``target`` (an existing
    ``target`` is replaced); on any error the temporary directory is removed and ``target`` is left as it was.

    Returns:
        ``target`` as a :class:`~pathlib.Path`.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
    try:
        fill(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def build_once(cache_dir: Path, name: str, ready: Callable[[], bool], build: Callable[[], None],
               key: str = "data.init_args.cache_dir") -> None:
    """Run ``build()`` under ``<cache_dir>/<name>.lock`` unless ``ready()`` already holds (checked again after the
    lock is taken: another process may have built it while this one waited).

    Raises:
        OSError: ``cache_dir`` cannot be created, naming the config ``key``.
    """
    if ready():
        return
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(cache_dir / f"{name}.lock"))
    except OSError as exc:
        raise OSError(f"cannot create {key}={cache_dir} ({exc}); set it to a writable directory") from exc
    with lock:
        if not ready():
            build()
