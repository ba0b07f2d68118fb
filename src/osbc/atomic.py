"""Atomic file writes: a file appears complete or not at all."""

from __future__ import annotations

import contextlib
import os
import signal
import tempfile
import threading
from pathlib import Path
from typing import Callable, Iterable

__all__ = ["atomic_write", "atomic_write_bytes"]

# Signals whose default action kills the process without running Python's cleanup (unlike SIGINT,
# which raises KeyboardInterrupt): a job scheduler's SIGTERM, a closed terminal's SIGHUP.
_FATAL = tuple(getattr(signal, n) for n in ("SIGTERM", "SIGHUP") if hasattr(signal, n))


@contextlib.contextmanager
def _removed_on_fatal_signal(tmp: str):
    """While the block runs, a SIGTERM/SIGHUP with the default action first deletes ``tmp`` and
    then kills the process as it would have. A handler someone else installed is called instead
    (if it raises, the caller's cleanup runs); an ignored signal stays ignored. Signal handlers
    can only be set from the main thread, so other threads get no such cleanup."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {}

    def handler(signum, frame):
        before = previous[signum]
        if callable(before):
            before(signum, frame)
            return
        Path(tmp).unlink(missing_ok=True)
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)

    for sig in _FATAL:
        before = signal.getsignal(sig)
        if before in (signal.SIG_IGN, None):  # None: set outside Python; leave it alone
            continue
        previous[sig] = before
        signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, before in previous.items():
            signal.signal(sig, before)


def atomic_write(path: str | os.PathLike, write: Callable[[str], object]) -> Path:
    """Call ``write(tmp_name)`` on a temporary file beside ``path`` and rename it into place.

    A reader running in parallel (a DataLoader worker, a second process filling the same cache)
    never sees half a file, and a failed write leaves nothing behind - nor does SIGTERM/SIGHUP
    in the middle of it (when called from the main thread). The result gets the usual
    permissions (0666 minus the umask), not mkstemp's 0600."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(parent))
    os.close(fd)
    try:
        with _removed_on_fatal_signal(tmp):
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
