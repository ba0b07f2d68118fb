"""Where the sample files of a dataset live: an extracted folder, a .zip or a .tar(.gz), read in
place without extracting anything.

A source lists its regular files ('/'-separated names inside it), reads one, and gives each file
a key for the frame cache that changes whenever the file's content does.  Archives are treated as
hostile input: a member bigger than :func:`max_member_bytes` (or one compressed implausibly well)
is refused before anything is decompressed, and every member is read with a bounded read.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tarfile
import warnings
import zipfile
import zlib
from pathlib import Path
from typing import Hashable, Iterable, Iterator

from ..atomic import atomic_write_bytes
from ..errors import OsbcError
from .readers import EventFileError

__all__ = ["MAX_MEMBER_ENV", "DEFAULT_MAX_MEMBER_BYTES", "max_member_bytes", "open_source",
           "is_junk", "natural_key"]

MAX_MEMBER_ENV = "OSBC_MAX_MEMBER_MB"
DEFAULT_MAX_MEMBER_BYTES = 256 << 20  # the largest published recording (DVS128 Gesture) is far smaller
# event files compress a few times at most; deflate reaches ~1000:1 only on degenerate data
_MAX_RATIO = 100
_RATIO_FLOOR = 1 << 20  # below this size the ratio says nothing worth refusing for
_SMALL_MEMBER = 1 << 20  # csv/txt members of a tar kept in memory by its index
_HASHED_END = 64 << 10  # bytes hashed at each end of a file for its cache key


def max_member_bytes() -> int:
    """The largest archive member read into memory: ``$OSBC_MAX_MEMBER_MB`` MiB if set, else 256 MiB."""
    env = os.environ.get(MAX_MEMBER_ENV)
    if not env:
        return DEFAULT_MAX_MEMBER_BYTES
    try:
        mib = float(env)
    except ValueError:
        mib = -1.0
    if not mib > 0:
        raise OsbcError(f"{MAX_MEMBER_ENV}={env!r}: expected a positive number of MiB")
    return int(mib * (1 << 20))


def is_junk(name: str) -> bool:
    """True for the resource forks of archives made on macOS (__MACOSX/.../._00002.bin), which
    look like samples."""
    return "__MACOSX/" in name or name.rsplit("/", 1)[-1].startswith("._")


def natural_key(name: str) -> list:
    """Sort key putting 'x_9' before 'x_10'."""
    return [int(s) if s.isdigit() else s for s in re.split(r"(\d+)", name)]


def _check_member(where: str, declared: int, compressed: int | None = None) -> None:
    cap = max_member_bytes()
    if declared > cap:
        raise OsbcError(f"{where}: declares {declared} bytes, over the {cap}-byte limit for one "
                        f"recording (a damaged or hostile archive?); set {MAX_MEMBER_ENV} to raise it")
    if compressed is not None and declared > _RATIO_FLOOR and declared > _MAX_RATIO * max(compressed, 1):
        raise OsbcError(f"{where}: {compressed} compressed bytes claim to expand to {declared}, more "
                        f"than {_MAX_RATIO}:1 (a zip bomb or a damaged archive); re-download it")


def _bounded_read(f, where: str, declared: int) -> bytes:
    """Read a member that declared `declared` bytes, refusing one that holds more."""
    data = f.read(declared + 1)
    if len(data) > declared:
        raise OsbcError(f"{where}: holds more than the {declared} bytes it declares "
                        "(a damaged or hostile archive); re-download it")
    return data


class _Source:
    """A folder or archive holding sample files; names are '/'-separated paths inside it."""

    sequential = False  # True when only a front-to-back pass is cheap (.tar.gz)

    def __init__(self, path: Path):
        self.path = Path(path)
        self._identity: str | None = None

    def entries(self) -> dict[str, int]:
        """name -> size in bytes, for every regular file."""
        raise NotImplementedError  # pragma: no cover - abstract

    def read(self, name: str) -> bytes:
        raise NotImplementedError  # pragma: no cover - abstract

    def stream(self, names: Iterable[str]) -> Iterator[tuple[str, bytes]]:
        for n in names:
            yield n, self.read(n)

    def where(self, name: str) -> str:
        return f"{self.path}:{name}"

    def identity(self) -> str:
        """The archive as a whole: where it is, its size and mtime (taken once)."""
        if self._identity is None:
            st = self.path.stat()
            self._identity = f"{self.path.resolve()}:{st.st_size}:{st.st_mtime_ns}"
        return self._identity

    def key(self, name: str) -> str:
        """Changes whenever the file's content does: part of its frame-cache file name."""
        return f"{self.identity()}|{name}"

    def stamp(self, name: str) -> Hashable:
        """Cheap check that a file read earlier in this process is unchanged (None: it cannot
        change under an open archive)."""
        return None


class _DirSource(_Source):
    def __init__(self, path: Path):
        super().__init__(path)
        self._digests: dict[str, tuple[tuple[int, ...], str]] = {}  # name -> (stamp, hash of its ends)

    def entries(self) -> dict[str, int]:
        out: dict[str, int] = {}
        # a folder reached twice (a symlink loop, or two links to one folder) is listed once
        seen: dict[tuple[int, int], Path] = {}
        stack = [(self.path, "")]
        while stack:
            folder, prefix = stack.pop()
            try:
                st = folder.stat()
                with os.scandir(folder) as it:
                    found = sorted(it, key=lambda e: e.name)
            except OSError as e:
                raise OsbcError(f"{folder}: cannot list this folder ({e.strerror or e}); "
                                "check that it exists and is readable") from None
            first = seen.setdefault((st.st_dev, st.st_ino), folder)
            if first is not folder:
                warnings.warn(f"{folder}: the same folder as {first} (a symlink loop or a second "
                              "link to it); skipped", stacklevel=3)
                continue
            for e in found:
                try:
                    if e.is_dir():
                        stack.append((Path(e.path), f"{prefix}{e.name}/"))
                    elif e.is_file():
                        out[prefix + e.name] = e.stat().st_size
                except OSError:
                    continue  # a dangling or looping link: no file behind it
        return out

    def read(self, name: str) -> bytes:
        with open(self.path / name, "rb") as f:
            return f.read()

    def where(self, name: str) -> str:
        return str(self.path / name)

    def stamp(self, name: str) -> tuple[int, int, int, int, int]:
        # ctime moves on every write and on os.utime, so an in-place rewrite always shows
        st = os.stat(self.path / name)
        return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns

    def key(self, name: str) -> str:
        # size, mtime and a hash of both ends: a rewrite with the same size is caught by the
        # hash even when the mtime is put back; the hash is redone only when the stat changes
        stamp = self.stamp(name)
        hit = self._digests.get(name)
        if hit is None or hit[0] != stamp:
            h = hashlib.blake2b(digest_size=16)
            with open(self.path / name, "rb") as f:
                head = f.read(_HASHED_END)
                h.update(head)
                if len(head) == _HASHED_END:
                    f.seek(max(_HASHED_END, stamp[2] - _HASHED_END))
                    h.update(f.read(_HASHED_END))
            hit = self._digests[name] = (stamp, h.hexdigest())
        return f"{self.path.resolve()}|{name}|{stamp[2]}|{stamp[3]}|{hit[1]}"


class _ZipSource(_Source):
    def __init__(self, path: Path):
        super().__init__(path)
        self._zip: zipfile.ZipFile | None = None
        self._pid = -1

    def _handle(self) -> zipfile.ZipFile:
        # a handle inherited through fork shares its file offset with the parent: reopen per process
        if self._zip is None or self._pid != os.getpid():
            try:
                self._zip = zipfile.ZipFile(self.path)
            except (zipfile.BadZipFile, OSError) as e:
                raise EventFileError(str(self.path), None, f"not a readable zip archive ({e}); "
                                     "re-download it") from None
            self._pid = os.getpid()
        return self._zip

    def entries(self) -> dict[str, int]:
        return {i.filename: i.file_size for i in self._handle().infolist() if not i.is_dir()}

    def read(self, name: str) -> bytes:
        where = self.where(name)
        try:
            info = self._handle().getinfo(name)
            _check_member(where, info.file_size, info.compress_size)
            with self._handle().open(info) as f:
                return _bounded_read(f, where, info.file_size)
        # RuntimeError: an encrypted member; NotImplementedError: an unsupported compression
        except (zipfile.BadZipFile, EOFError, OSError, zlib.error, NotImplementedError, RuntimeError) as e:
            raise EventFileError(where, None, f"cannot be read from the archive ({e})") from None

    def key(self, name: str) -> str:
        info = self._handle().getinfo(name)
        return f"{self.identity()}|{name}|{info.CRC:08x}|{info.file_size}"

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_zip": None, "_pid": -1}


class _TarSource(_Source):
    sequential = True

    def __init__(self, path: Path, index_dir: Path | None = None):
        super().__init__(path)
        self._index_dir = index_dir
        self._entries: dict[str, int] | None = None
        self._small: dict[str, bytes] = {}

    @staticmethod
    def _name(member: tarfile.TarInfo) -> str:
        return member.name[2:] if member.name.startswith("./") else member.name

    def _open(self) -> tarfile.TarFile:
        try:
            return tarfile.open(self.path, "r:*")
        except (tarfile.TarError, OSError, EOFError) as e:
            raise EventFileError(str(self.path), None, f"not a readable tar archive ({e}); "
                                 "re-download it") from None

    def _member(self, tf: tarfile.TarFile, m: tarfile.TarInfo, name: str) -> bytes:
        where = self.where(name)
        _check_member(where, m.size)
        return _bounded_read(tf.extractfile(m), where, m.size)

    def _scan(self) -> None:
        # listing a .tar.gz decompresses all of it: remember the listing (and the small label
        # files the index needs) next to the cache, keyed by the archive's size and mtime
        saved = None
        if self._index_dir is not None:
            key = hashlib.sha1(self.identity().encode()).hexdigest()[:20]
            saved = self._index_dir / f"tar-index-{key}.json"
            if saved.is_file():
                try:
                    d = json.loads(saved.read_text())
                    self._entries = {k: int(v) for k, v in d["entries"].items()}
                    self._small = {k: v.encode("latin-1") for k, v in d["small"].items()}
                    return
                except (ValueError, KeyError, TypeError, AttributeError, OSError):
                    pass
        entries: dict[str, int] = {}
        small: dict[str, bytes] = {}
        try:
            with self._open() as tf:
                for m in tf:
                    if not m.isfile():
                        continue
                    name = self._name(m)
                    entries[name] = m.size
                    if m.size <= _SMALL_MEMBER and name.endswith((".csv", ".txt")):
                        small[name] = self._member(tf, m, name)
        except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
            raise EventFileError(str(self.path), None, f"archive is truncated or corrupted ({e}); "
                                 "re-download it") from None
        self._entries, self._small = entries, small
        if saved is not None:
            doc = {"entries": entries, "small": {k: v.decode("latin-1") for k, v in small.items()}}
            try:
                atomic_write_bytes(saved, json.dumps(doc).encode())
            except OSError:
                pass  # an unwritable cache only costs a rescan next time; the frame cache warns

    def entries(self) -> dict[str, int]:
        if self._entries is None:
            self._scan()
        return dict(self._entries or {})

    def read(self, name: str) -> bytes:
        if self._entries is None:
            self._scan()
        if name in self._small:
            return self._small[name]
        for _, data in self.stream([name]):
            return data
        raise FileNotFoundError(f"{self.where(name)}: no such member")

    def stream(self, names: Iterable[str]) -> Iterator[tuple[str, bytes]]:
        wanted = set(names)
        try:
            with self._open() as tf:
                for m in tf:
                    if not wanted:
                        return
                    name = self._name(m)
                    if m.isfile() and name in wanted:
                        wanted.discard(name)
                        yield name, self._member(tf, m, name)
        except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
            raise EventFileError(str(self.path), None, f"archive is truncated or corrupted ({e}); "
                                 "re-download it") from None

    def key(self, name: str) -> str:
        if self._entries is None:
            self._scan()
        assert self._entries is not None
        return f"{self.identity()}|{name}|{self._entries.get(name)}"


def open_source(path: Path, index_dir: Path | None) -> _Source:
    """The source for a folder, .zip or .tar(.gz); ``index_dir`` keeps a .tar.gz's listing."""
    name = path.name.lower()
    if path.is_dir():
        return _DirSource(path)
    if name.endswith(".zip"):
        return _ZipSource(path)
    if name.endswith((".tar", ".tar.gz", ".tgz")):
        return _TarSource(path, index_dir)
    raise OsbcError(f"{path}: not a folder, .zip or .tar.gz")
