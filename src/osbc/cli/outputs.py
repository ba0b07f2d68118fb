"""Output files of a command: checked before any work starts, written all or none.

A command first checks every output path (:func:`check_out_file`, :func:`check_out_dir`): it must
not exist unless ``--force``, its folder must exist and accept a new file. After the work, it renders
every output and hands them to :func:`write_all`, which writes each to a temporary file beside its
target and renames them into place only when all were written.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

from ..errors import OsbcError

__all__ = ["Writer", "check_out_file", "check_out_dir", "write_all", "json_text", "text_writer"]

#: writes one output to the temporary file it is given
Writer = Callable[[str], object]


def _probe_writable(folder: Path, what: str) -> None:
    """Create and remove a file in ``folder``: the only test that also holds for root, read-only
    mounts and ACLs (``os.access`` answers for none of them)."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=".osbc-probe-", dir=str(folder))
    except OSError as e:
        raise OsbcError(f"folder {folder} is not writable ({e.strerror or e}), so {what} cannot be written; "
                        "choose a writable folder") from None
    os.close(fd)
    os.unlink(tmp)


def check_out_file(path: str | os.PathLike | None, force: bool, what: str = "output") -> Path | None:
    """Before any work: ``path`` must not exist (unless ``force``) or be a folder, and its folder
    must exist and be writable. None passes through (the output was not asked for)."""
    if path is None:
        return None
    p = Path(path)
    if p.is_dir():
        raise OsbcError(f"{what} {p} is a directory; give a file name")
    if p.exists() and not force:
        raise OsbcError(f"{what} {p} exists; pass --force to overwrite it")
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise OsbcError(f"folder {parent} for {what} {p} does not exist; create it first")
    _probe_writable(parent, f"{what} {p}")
    return p


def check_out_dir(path: str | os.PathLike, force: bool) -> Path:
    """Before any work: the output folder ``path`` is new (its parent exists and is writable) or
    writable, and empty unless ``force``."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise OsbcError(f"output folder {p} exists and is a file; give a folder name")
    if p.is_dir():
        if any(p.iterdir()) and not force:
            raise OsbcError(f"output folder {p} exists and is not empty; pass --force to write into it")
        _probe_writable(p, "the outputs")
        return p
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise OsbcError(f"folder {parent} for the output folder {p} does not exist; create it first")
    _probe_writable(parent, f"the output folder {p}")
    return p


def _json_default(o: Any) -> Any:
    if hasattr(o, "to_dict"):
        return o.to_dict()
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, (set, tuple)):
        return list(o)
    return str(o)


def json_text(obj: Any) -> str:
    """``obj`` as indented JSON (objects with ``to_dict``, tensors and arrays included)."""
    return json.dumps(obj, indent=2, default=_json_default) + "\n"


def text_writer(text: str) -> Writer:
    return lambda tmp: Path(tmp).write_text(text)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_all(outputs: list[tuple[Path, Writer]]) -> None:
    """Write every ``(path, write)`` pair or none: ``write(tmp)`` fills a temporary file beside
    ``path`` (same suffix, so writers that go by the extension work); once all succeeded they are
    renamed into place. On failure the temporary files, any output already renamed and any folder made
    here are removed, and the error names the output that failed."""
    staged: list[tuple[Path, str]] = []
    done: list[Path] = []
    made: list[Path] = []
    mode = 0o666 & ~_umask()  # the usual permissions, not mkstemp's 0600
    current = None
    try:
        for path, write in outputs:
            current = path
            if not path.parent.is_dir():  # an output folder checked by check_out_dir
                path.parent.mkdir()
                made.append(path.parent)
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{path.suffix}", dir=str(path.parent))
            os.close(fd)
            staged.append((path, tmp))
            write(tmp)
            os.chmod(tmp, mode)
        for path, tmp in staged:
            current = path
            os.replace(tmp, path)
            done.append(path)
    except BaseException as e:
        for _, tmp in staged:
            Path(tmp).unlink(missing_ok=True)
        for path in done:
            path.unlink(missing_ok=True)
        for folder in made:
            folder.rmdir()
        if isinstance(e, OSError):
            raise OsbcError(f"cannot write {current} ({e.strerror or e}); no output was written") from e
        raise
