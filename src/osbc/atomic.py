"""Atomic file writes: a file appears complete or not at all."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable, Iterable

__all__ = ["atomic_write", "atomic_write_bytes"]


def atomic_write(path: str | os.PathLike, write: Callable[[str], object]) -> Path:
    """Call ``write(tmp_name)`` on a temporary file beside ``path`` and rename it into place.

    A reader running in parallel (a DataLoader worker, a second process filling the same cache)
    never sees half a file, and a failed write leaves nothing behind. The result gets the usual
    permissions (0666 minus the umask), not mkstemp's 0600."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(parent))
    os.close(fd)
    try:
        write(tmp)
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes | Iterable[bytes]) -> Path:
    """:func:`atomic_write` of content already in memory: ``data`` is bytes or a sequence of
    chunks written one after the other (no joined copy of a large file)."""
    chunks = [data] if isinstance(data, (bytes, bytearray, memoryview)) else data

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            for c in chunks:
                f.write(c)

    return atomic_write(path, write)
