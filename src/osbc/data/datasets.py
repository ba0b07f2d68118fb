"""Event datasets read as published (extracted folders or the original archives, in place).

All three share :class:`EventDataset`: an index of samples (file inside a folder or archive, label,
optional time window), lazy integration into frames, and an optional on-disk cache holding one
small compressed file of sparse counts per sample.  Nothing is downloaded; a missing dataset raises
FileNotFoundError naming the archives to fetch and where to put them.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
import tarfile
import zlib
import zipfile
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, NamedTuple, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

from .frames import SplitBy, _check as _check_frame_args, downsampled_size, events_to_frames, sparse_frame_counts
from .readers import EventFileError, OnError, _atomic_write, _check_on_error, read_aedat20, read_aedat31, read_nmnist

__all__ = [
    "CACHE_ENV",
    "default_cache_dir",
    "Sample",
    "EventDataset",
    "NMNIST",
    "DVSGesture",
    "CIFAR10DVS",
    "LabeledSubset",
    "stratified_split",
    "calibration_split",
    "load_dataset",
]

CACHE_ENV = "OSBC_CACHE"
_CACHE_VERSION = 1
_SMALL_MEMBER = 1 << 20  # csv/txt members of a tar kept in memory by its index
_Sparse = tuple[np.ndarray, np.ndarray, tuple[int, ...]]  # from sparse_frame_counts


def default_cache_dir() -> Path:
    """``$OSBC_CACHE`` if set, else ``~/.cache/osbc``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "osbc"


def _junk(name: str) -> bool:
    # archives made on macOS carry resource forks (__MACOSX/.../._00002.bin) that look like samples
    return "__MACOSX/" in name or name.rsplit("/", 1)[-1].startswith("._")


def _natural_key(name: str) -> list:
    return [int(s) if s.isdigit() else s for s in re.split(r"(\d+)", name)]


# ------------------------------------------------------------------------------------ sources

class _Source:
    """A folder or archive holding sample files; names are '/'-separated paths inside it."""

    sequential = False  # True when only a front-to-back pass is cheap (.tar.gz)

    def __init__(self, path: Path):
        self.path = Path(path)

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
        st = self.path.stat()
        return f"{self.path.resolve()}:{st.st_size}:{st.st_mtime_ns}"


class _DirSource(_Source):
    def entries(self) -> dict[str, int]:
        out: dict[str, int] = {}
        stack = [(self.path, "")]
        while stack:
            folder, prefix = stack.pop()
            with os.scandir(folder) as it:
                for e in it:
                    if e.is_dir():
                        stack.append((Path(e.path), f"{prefix}{e.name}/"))
                    elif e.is_file():
                        out[prefix + e.name] = e.stat().st_size
        return out

    def read(self, name: str) -> bytes:
        with open(self.path / name, "rb") as f:
            return f.read()

    def where(self, name: str) -> str:
        return str(self.path / name)

    def identity(self) -> str:
        return str(self.path.resolve())


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
            except zipfile.BadZipFile as e:
                raise EventFileError(str(self.path), None, f"not a readable zip archive ({e}); "
                                     "re-download it") from None
            self._pid = os.getpid()
        return self._zip

    def entries(self) -> dict[str, int]:
        return {i.filename: i.file_size for i in self._handle().infolist() if not i.is_dir()}

    def read(self, name: str) -> bytes:
        try:
            return self._handle().read(name)
        except (zipfile.BadZipFile, EOFError, OSError) as e:
            raise EventFileError(self.where(name), None, f"cannot be read from the archive ({e})") from None

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
                except (ValueError, KeyError, TypeError, OSError):
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
                        small[name] = tf.extractfile(m).read()
        except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
            raise EventFileError(str(self.path), None, f"archive is truncated or corrupted ({e}); "
                                 "re-download it") from None
        self._entries, self._small = entries, small
        if saved is not None:
            doc = {"entries": entries, "small": {k: v.decode("latin-1") for k, v in small.items()}}
            _atomic_write(saved, [json.dumps(doc).encode()])

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
                        yield name, tf.extractfile(m).read()
        except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
            raise EventFileError(str(self.path), None, f"archive is truncated or corrupted ({e}); "
                                 "re-download it") from None


def _open_source(path: Path, index_dir: Path | None) -> _Source:
    name = path.name.lower()
    if path.is_dir():
        return _DirSource(path)
    if name.endswith(".zip"):
        return _ZipSource(path)
    if name.endswith((".tar", ".tar.gz", ".tgz")):
        return _TarSource(path, index_dir)
    raise ValueError(f"{path}: not a folder, .zip or .tar.gz")


# ------------------------------------------------------------------------------------ base dataset

class Sample(NamedTuple):
    source: int  # index into EventDataset.sources
    name: str  # file inside that source
    label: int
    window: tuple[int, int] | None  # [start, end) in microseconds, None for the whole file
    size: int  # file size in bytes (part of the cache key)


class EventDataset(Dataset):
    """Base of the event datasets: ``ds[i] -> (frames [T, 2, H, W] float32 tensor, label)``.

    ``frames=None`` returns the raw event array instead of frames. ``cache`` is True (frames
    cached under ``$OSBC_CACHE`` or ``~/.cache/osbc``), a folder, False (integrate on every
    access), or None for the dataset's default (``cache_by_default``): on where a sample costs
    far more to parse than to read back (DVS128 Gesture, CIFAR10-DVS), off for N-MNIST-sized
    samples, which integrate as fast as a cache file decompresses.
    """

    name: str = "events"
    cache_by_default: bool = True
    sensor_size: tuple[int, int] = (0, 0)
    classes: tuple[str, ...] = ()
    download_hint: str = ""

    def __init__(self, root: str | os.PathLike | None, train: bool = True, frames: int | None = 20,
                 split_by: SplitBy = "time", *, downsample: int = 1,
                 cache: bool | str | os.PathLike | None = None, on_error: OnError = "raise",
                 transform: Callable | None = None, target_transform: Callable | None = None):
        _check_frame_args(1 if frames is None else frames, split_by, downsample)
        _check_on_error(on_error)
        if root is None:
            raise FileNotFoundError(f"{self.name} needs root=<folder>: {self.download_hint} "
                                    "into a folder and pass that folder as root")
        self.root = Path(root).expanduser()
        self.train, self.frames, self.split_by, self.downsample = bool(train), frames, split_by, downsample
        self.on_error = on_error
        self.transform, self.target_transform = transform, target_transform
        if cache is None:
            cache = self.cache_by_default
        if cache is True:
            self.cache_root: Path | None = default_cache_dir()
        elif cache is False:
            self.cache_root = None
        else:
            self.cache_root = Path(cache).expanduser()
        self.sources: list[_Source] = []
        self.samples: list[Sample] = self._index()
        self.targets: list[int] = [s.label for s in self.samples]
        groups: dict[tuple[int, str], list[int]] = defaultdict(list)
        for i, s in enumerate(self.samples):
            groups[(s.source, s.name)].append(i)
        self._groups = dict(groups)
        self._memo: tuple[tuple[int, str], np.ndarray] | None = None
        self._paths: list[Path] | None = None

    # -- to implement per dataset
    def _index(self) -> list[Sample]:
        """Find the data under self.root, fill self.sources, return this split's samples."""
        raise NotImplementedError  # pragma: no cover - abstract

    def _decode(self, data: bytes, where: str) -> np.ndarray:
        """Parse one file's bytes into events."""
        raise NotImplementedError  # pragma: no cover - abstract

    # -- helpers for subclasses
    def _missing(self, detail: str = "") -> FileNotFoundError:
        extra = f" ({detail})" if detail else ""
        return FileNotFoundError(f"{self.name} not found in {self.root}{extra}: {self.download_hint} "
                                 f"into {self.root}")

    def _add_source(self, path: Path) -> int:
        src = _open_source(path, None if self.cache_root is None else self.cache_root / "archives")
        if src.sequential and self.cache_root is None:
            raise ValueError(f"{path}: a .tar.gz has no random access, so reading it in place needs "
                             f"the cache (cache=True or a folder); or extract it (tar xzf {path.name})")
        self.sources.append(src)
        return len(self.sources) - 1

    # -- public API
    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def labels(self) -> list[int]:
        """Same as ``targets``: the label of every sample, in order."""
        return self.targets

    @property
    def frame_size(self) -> tuple[int, int]:
        """(H, W) of the frames after downsampling."""
        return downsampled_size(self.sensor_size, self.downsample)

    def __len__(self) -> int:
        return len(self.samples)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(root={str(self.root)!r}, train={self.train}, n={len(self)}, "
                f"frames={self.frames}, split_by={self.split_by!r}, downsample={self.downsample})")

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_memo": None, "_paths": None}

    def __getitem__(self, i: int) -> tuple[Any, int]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for {type(self).__name__} of length {len(self)}")
        i %= len(self)
        x: Any = self.events(i) if self.frames is None else torch.from_numpy(self._frames(i))
        y = self.samples[i].label
        if self.transform is not None:
            x = self.transform(x)
        if self.target_transform is not None:
            y = self.target_transform(y)
        return x, y

    def events(self, i: int) -> np.ndarray:
        """The raw events of sample i (fields x, y, t, p)."""
        s = self.samples[i]
        return _cut(self._file_events(s.source, s.name), s.window)

    def prepare(self, progress: bool = False) -> int:
        """Integrate every sample not in the cache yet (one pass over each file, or over the
        archive for .tar.gz); returns how many were written. Needs the cache."""
        if self.cache_root is None or self.frames is None:
            raise ValueError("prepare() fills the frame cache: build the dataset with cache=True "
                             "(or a folder) and frames=<int>")
        todo = [k for k, idx in self._groups.items()
                if not all(self._cache_path(j).is_file() for j in idx)]
        from tqdm.auto import tqdm
        bar = tqdm(total=len(todo), desc=f"{self.name} frames", unit="file", disable=not progress)
        written = 0
        by_source: dict[int, list[str]] = defaultdict(list)
        for src, name in todo:
            by_source[src].append(name)
        for src, names in by_source.items():
            source = self.sources[src]
            for name, data in source.stream(names):
                ev = self._decode(data, source.where(name))
                for j in self._groups[(src, name)]:
                    self._store(j, self._count(_cut(ev, self.samples[j].window)))
                    written += 1
                bar.update(1)
        bar.close()
        return written

    def tensors(self, progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole split in memory: (frames [N, T, 2, H, W] float32, labels [N] int64).
        Meant for small sets such as Digits; a full N-MNIST at T=100 would not fit."""
        if self.frames is None:
            raise ValueError("tensors() needs frames=<int>")
        if self.cache_root is not None and any(s.sequential for s in self.sources):
            self.prepare(progress)
        out = np.zeros((len(self), *self._shape()), np.float32)
        rows = out.reshape(len(self), -1)
        from tqdm.auto import tqdm
        for i in tqdm(range(len(self)), desc=self.name, disable=not progress):
            self._frames_into(i, rows[i])
        return torch.from_numpy(out), torch.tensor(self.targets, dtype=torch.int64)

    # -- internals
    def _file_events(self, src: int, name: str) -> np.ndarray:
        # one file can hold many samples (DVS128 Gesture): keep the last file parsed
        key = (src, name)
        if self._memo is not None and self._memo[0] == key:
            return self._memo[1]
        source = self.sources[src]
        ev = self._decode(source.read(name), source.where(name))
        self._memo = (key, ev)
        return ev

    def _count(self, ev: np.ndarray) -> _Sparse:
        assert self.frames is not None
        return sparse_frame_counts(ev, self.sensor_size, self.frames, self.split_by, self.downsample)

    def _frames(self, i: int) -> np.ndarray:
        out = np.zeros(self._shape(), np.float32)
        self._frames_into(i, out.reshape(-1))
        return out

    def _frames_into(self, i: int, flat: np.ndarray) -> None:
        """Add sample i's counts into `flat` (zeros, the frames raveled), from the cache if there."""
        assert self.frames is not None
        if self.cache_root is None:
            flat[:] = events_to_frames(self.events(i), self.sensor_size, self.frames,
                                       self.split_by, self.downsample).ravel()
            return
        if self._load(i, flat):
            return
        s = self.samples[i]
        if self.sources[s.source].sequential:
            self.prepare(progress=True)
            if self._load(i, flat):
                return
        ev = self._file_events(s.source, s.name)
        for j in self._groups[(s.source, s.name)]:
            c = self._count(_cut(ev, self.samples[j].window))
            self._store(j, c)
            if j == i:
                _scatter(c, flat)

    def _cache_dir(self) -> Path:
        assert self.cache_root is not None
        cfg = json.dumps([_CACHE_VERSION, type(self).__name__, self.frames, self.split_by,
                          self.downsample, list(self.sensor_size)])
        tag = hashlib.sha1(cfg.encode()).hexdigest()[:8]
        return (self.cache_root / "frames" /
                f"{type(self).__name__}-T{self.frames}-{self.split_by}-d{self.downsample}-{tag}")

    def _cache_path(self, i: int) -> Path:
        paths = self._paths
        if paths is None:
            folder = self._cache_dir()
            ids = [src.identity() for src in self.sources]
            paths = [folder / (hashlib.sha1(f"{ids[s.source]}|{s.name}|{s.window}|{s.size}".encode())
                               .hexdigest()[:24] + _CACHE_SUFFIX) for s in self.samples]
            self._paths = paths
        return paths[i]

    def _shape(self) -> tuple[int, int, int, int]:
        assert self.frames is not None
        return (self.frames, 2, *self.frame_size)

    def _store(self, i: int, counts: _Sparse) -> None:
        if self.cache_root is not None:
            _atomic_write(self._cache_path(i), [_pack_counts(*counts)])

    def _load(self, i: int, flat: np.ndarray) -> bool:
        try:
            with open(self._cache_path(i), "rb") as f:
                data = f.read()
        except OSError:
            return False
        return _unpack_counts(data, self._shape(), flat)


# A cache file: magic, the frame shape, the number of non-zero counts and the byte width of a
# count, then zlib(gaps between successive non-zero flat indices as uint32, counts).  Sparse
# because most pixels of most frames are empty; gaps because they compress far better than
# indices.  Read with frombuffer: a tenth of the cost of an .npz, and nothing executable inside.
_CACHE_SUFFIX = ".frames"
_CACHE_MAGIC = b"OSBCFRM1"
_CACHE_HEAD = struct.Struct("<8s4IIB")


def _pack_counts(idx: np.ndarray, vals: np.ndarray, shape: tuple[int, ...]) -> bytes:
    top = int(vals.max()) if vals.size else 0
    width = 1 if top < 1 << 8 else 2 if top < 1 << 16 else 4
    gaps = np.diff(idx, prepend=0).astype("<u4")
    body = gaps.tobytes() + vals.astype(f"<u{width}").tobytes()
    return _CACHE_HEAD.pack(_CACHE_MAGIC, *shape, idx.size, width) + zlib.compress(body, 1)


def _unpack_counts(data: bytes, shape: tuple[int, ...], flat: np.ndarray) -> bool:
    """Write the counts into `flat` (zeros); False for a file that is damaged or of another
    shape, which the caller then rebuilds."""
    try:
        magic, t, c, h, w, nnz, width = _CACHE_HEAD.unpack_from(data)
        if magic != _CACHE_MAGIC or (t, c, h, w) != tuple(shape) or width not in (1, 2, 4):
            return False
        body = zlib.decompress(data[_CACHE_HEAD.size:])
        if len(body) != nnz * (4 + width):
            return False
        idx = np.cumsum(np.frombuffer(body, "<u4", nnz), dtype=np.int64)
        if nnz and idx[-1] >= flat.size:
            return False
        flat[idx] = np.frombuffer(body, f"<u{width}", nnz, 4 * nnz)
        return True
    except (struct.error, zlib.error, ValueError):
        return False


def _scatter(counts: _Sparse, flat: np.ndarray) -> None:
    flat[counts[0]] = counts[1]


def _cut(ev: np.ndarray, window: tuple[int, int] | None) -> np.ndarray:
    if window is None:
        return ev
    t = ev["t"]
    return ev[(t >= window[0]) & (t < window[1])]


# ------------------------------------------------------------------------------------ N-MNIST

def _nmnist_label(name: str) -> int | None:
    """The digit of a '.../<digit>/<id>.bin' member, else None."""
    parts = name.rsplit("/", 2)
    if len(parts) >= 2 and len(parts[-2]) == 1 and parts[-2].isdigit() and parts[-1].lower().endswith(".bin"):
        return int(parts[-2])
    return None


class NMNIST(EventDataset):
    """N-MNIST (Orchard et al. 2015): 34x34, 10 classes, 60000 train / 10000 test.

    ``root`` holds ``Train.zip`` and ``Test.zip`` as downloaded, or their extracted ``Train/`` and
    ``Test/`` folders (``<digit>/<id>.bin``). Frames are not cached unless ``cache`` asks for it.
    """

    name = "N-MNIST"
    cache_by_default = False
    sensor_size = (34, 34)
    classes = tuple(str(d) for d in range(10))
    download_hint = "download Train.zip and Test.zip (N-MNIST, Orchard et al. 2015) and put them, " \
                    "or their extracted Train/ and Test/ folders,"

    def _index(self) -> list[Sample]:
        split = "Train" if self.train else "Test"
        for cand in (self.root / split, self.root / f"{split}.zip"):
            if cand.exists():
                src = self._add_source(cand)
                break
        else:
            raise self._missing(f"no {split}/ folder or {split}.zip")
        source = self.sources[src]
        samples = []
        for name, size in source.entries().items():
            label = _nmnist_label(name)
            if label is not None and not _junk(name):
                samples.append(Sample(src, name, label, None, size))
        if not samples:
            raise self._missing(f"{source.path} holds no <digit>/<id>.bin files")
        samples.sort(key=lambda s: (s.label, _natural_key(s.name)))
        return samples

    def _decode(self, data: bytes, where: str) -> np.ndarray:
        return read_nmnist(data, name=where, sensor_size=self.sensor_size, on_error=self.on_error)


# ------------------------------------------------------------------------------------ DVS128 Gesture

class DVSGesture(EventDataset):
    """DVS128 Gesture (Amir et al. 2017): 128x128, 11 classes, official user split
    (trials_to_train.txt / trials_to_test.txt); each recording is cut into samples by the
    [startTime_usec, endTime_usec) windows of its ``_labels.csv``.

    ``root`` holds ``DvsGesture.tar.gz`` as downloaded (read in place; needs the cache), or the
    extracted ``DvsGesture/`` folder.
    """

    name = "DVS128 Gesture"
    sensor_size = (128, 128)
    classes = ("hand_clapping", "right_hand_wave", "left_hand_wave", "right_arm_clockwise",
               "right_arm_counter_clockwise", "left_arm_clockwise", "left_arm_counter_clockwise",
               "arm_roll", "air_drums", "air_guitar", "other_gestures")
    download_hint = "download DvsGesture.tar.gz (IBM DVS128 Gesture) and put it, or the extracted " \
                    "DvsGesture/ folder,"

    def _index(self) -> list[Sample]:
        cands = [self.root / "DvsGesture", self.root / "DvsGesture.tar.gz",
                 self.root / "DvsGesture.tgz", self.root / "DvsGesture.tar"]
        if (self.root / "trials_to_train.txt").is_file():
            cands.insert(0, self.root)
        for cand in cands:
            if cand.exists():
                src = self._add_source(cand)
                break
        else:
            raise self._missing("no DvsGesture/ folder or DvsGesture.tar.gz")
        source = self.sources[src]
        entries = source.entries()
        list_name = "trials_to_train.txt" if self.train else "trials_to_test.txt"
        lists = sorted((n for n in entries if n.rsplit("/", 1)[-1] == list_name and not _junk(n)), key=len)
        if not lists:
            raise self._missing(f"{source.path} has no {list_name}")
        prefix = lists[0][: -len(list_name)]
        trials = [ln.strip() for ln in source.read(lists[0]).decode("utf-8", "replace").splitlines()]
        samples = []
        for trial in (t for t in trials if t.endswith(".aedat")):
            rec, csv = prefix + trial, prefix + trial[: -len(".aedat")] + "_labels.csv"
            for need in (rec, csv):
                if need not in entries:
                    raise self._missing(f"{source.where(need)} listed in {list_name} is missing")
            for label, start, end in _parse_labels(source.read(csv), source.where(csv), len(self.classes)):
                samples.append(Sample(src, rec, label, (start, end), entries[rec]))
        if not samples:
            raise self._missing(f"{source.where(lists[0])} lists no labelled recordings")
        return samples

    def _decode(self, data: bytes, where: str) -> np.ndarray:
        return read_aedat31(data, name=where, sensor_size=self.sensor_size, on_error=self.on_error)


def _parse_labels(data: bytes, where: str, num_classes: int) -> list[tuple[int, int, int]]:
    """Rows class,startTime_usec,endTime_usec (class 1-based) -> (label 0-based, start, end)."""
    rows = []
    for k, line in enumerate(data.decode("utf-8", "replace").splitlines(), 1):
        parts = [p.strip() for p in line.split(",")]
        if not line.strip() or (k == 1 and not parts[0].isdigit()):
            continue  # blank line or the header row
        try:
            c, a, b = (int(p) for p in parts[:3])
            if len(parts) < 3 or not 1 <= c <= num_classes or b <= a:
                raise ValueError
        except ValueError:
            raise EventFileError(where, None, f"line {k} is not class(1-{num_classes}),"
                                 f"startTime_usec,endTime_usec with start < end: {line!r}") from None
        rows.append((c - 1, a, b))
    return rows


# ------------------------------------------------------------------------------------ CIFAR10-DVS

class CIFAR10DVS(EventDataset):
    """CIFAR10-DVS (Li et al. 2017): 128x128, 10 classes x 1000 recordings, no official split.

    ``root`` holds the ten archives ``airplane.zip`` ... ``truck.zip`` as downloaded, or their
    extracted ``<class>/`` folders. The split takes ``train_fraction`` (0.9) of every class:
    a seeded random draw (``seed``), or the first files in natural order with ``seed=None``
    (spikingjelly's ``random_split=False``). Events use the published coordinate mapping.
    """

    name = "CIFAR10-DVS"
    sensor_size = (128, 128)
    classes = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
    download_hint = ("download airplane.zip, automobile.zip, bird.zip, cat.zip, deer.zip, dog.zip, "
                     "frog.zip, horse.zip, ship.zip and truck.zip (CIFAR10-DVS, Li et al. 2017) and put "
                     "them, or their extracted <class>/ folders,")

    def __init__(self, root: str | os.PathLike | None, train: bool = True, frames: int | None = 20,
                 split_by: SplitBy = "time", *, downsample: int = 1, train_fraction: float = 0.9,
                 seed: int | None = 0, cache: bool | str | os.PathLike | None = None,
                 on_error: OnError = "raise", transform: Callable | None = None,
                 target_transform: Callable | None = None):
        if not 0.0 < train_fraction < 1.0:
            raise ValueError(f"train_fraction must lie strictly between 0 and 1, got {train_fraction}")
        self.train_fraction, self.seed = train_fraction, seed
        super().__init__(root, train, frames, split_by, downsample=downsample, cache=cache,
                         on_error=on_error, transform=transform, target_transform=target_transform)

    def _index(self) -> list[Sample]:
        found: dict[int, Path] = {}
        missing = []
        for c, cls in enumerate(self.classes):
            for cand in (self.root / cls, self.root / f"{cls}.zip"):
                if cand.exists():
                    found[c] = cand
                    break
            else:
                missing.append(f"{cls}.zip")
        if missing:
            raise self._missing("missing " + ", ".join(missing))
        everything: list[Sample] = []
        for c, path in found.items():
            src = self._add_source(path)
            source = self.sources[src]
            files = sorted(((n, s) for n, s in source.entries().items()
                            if n.lower().endswith(".aedat") and not _junk(n)),
                           key=lambda ns: _natural_key(ns[0]))
            if not files:
                raise self._missing(f"{path} holds no .aedat files")
            everything += [Sample(src, n, c, None, s) for n, s in files]
        train_idx, test_idx = stratified_split([s.label for s in everything], self.train_fraction, self.seed)
        return [everything[i] for i in (train_idx if self.train else test_idx)]

    def _decode(self, data: bytes, where: str) -> np.ndarray:
        return read_aedat20(data, name=where, sensor_size=self.sensor_size, on_error=self.on_error)


# ------------------------------------------------------------------------------------ splits

def stratified_split(labels: Sequence[int], n: int | float, seed: int | None = 0
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Pick ``n`` indices (or the fraction ``n`` if a float in (0, 1)) with every class in
    proportion (largest remainders); returns (picked, rest), each sorted.

    ``seed=None`` picks the first indices of each class instead of a random draw.
    """
    labels = np.asarray(labels)
    total = labels.size
    if isinstance(n, (float, np.floating)) and not isinstance(n, bool):
        if not 0.0 < n < 1.0:
            raise ValueError(f"a fraction n must lie strictly between 0 and 1, got {n}")
        m = int(round(n * total))
    elif isinstance(n, (int, np.integer)) and not isinstance(n, bool):
        m = int(n)
    else:
        raise ValueError(f"n must be a count (int) or a fraction (float), got {n!r}")
    if not 1 <= m <= total:
        raise ValueError(f"cannot pick {m} of {total} samples: n must be between 1 and {total}")
    classes, counts = np.unique(labels, return_counts=True)
    quota = counts * m / total
    take = np.floor(quota).astype(np.int64)
    short = m - int(take.sum())
    if short:
        # largest fractional remainder first; ties to the larger class, then the lower label
        order = np.lexsort((classes, -counts, -(quota - take)))
        take[order[:short]] += 1
    rng = None if seed is None else np.random.default_rng(seed)
    picked = []
    for c, k in zip(classes, take):
        idx = np.flatnonzero(labels == c)
        if rng is not None:
            idx = rng.permutation(idx)
        picked.append(idx[:k])
    sel = np.sort(np.concatenate(picked)) if picked else np.zeros(0, np.int64)
    mask = np.ones(total, bool)
    mask[sel] = False
    return sel, np.flatnonzero(mask)


class LabeledSubset(Subset):
    """A Subset that keeps ``targets``, ``num_classes``, ``sensor_size`` and ``classes``."""

    def __init__(self, dataset: Dataset, indices: Sequence[int]):
        super().__init__(dataset, [int(i) for i in indices])
        base = _targets(dataset)
        self.targets: list[int] = [base[i] for i in self.indices]

    @property
    def labels(self) -> list[int]:
        return self.targets

    @property
    def num_classes(self) -> int:
        nc = getattr(self.dataset, "num_classes", None)
        return int(nc) if nc is not None else len(set(_targets(self.dataset)))

    @property
    def sensor_size(self) -> tuple[int, int] | None:
        return getattr(self.dataset, "sensor_size", None)

    @property
    def classes(self) -> tuple[str, ...] | None:
        return getattr(self.dataset, "classes", None)


def _targets(dataset: Dataset) -> list[int]:
    t = getattr(dataset, "targets", None)
    if t is not None:
        return [int(v) for v in (t.tolist() if hasattr(t, "tolist") else t)]
    return [int(dataset[i][1]) for i in range(len(dataset))]  # slow path: integrates every sample


def calibration_split(dataset: Dataset, n: int | float, seed: int | None = 0
                      ) -> tuple[LabeledSubset, LabeledSubset]:
    """Stratified (calibration, evaluation) subsets: ``n`` samples (or a fraction) for calibration,
    the rest for evaluation, every class in proportion (e.g. 1000 of N-MNIST's test set)."""
    picked, rest = stratified_split(_targets(dataset), n, seed)
    return LabeledSubset(dataset, picked), LabeledSubset(dataset, rest)


# ------------------------------------------------------------------------------------ factory

def load_dataset(name: str, root: str | os.PathLike | None = None, train: bool = True,
                 frames: int | None = 20, **kw: Any) -> EventDataset:
    """``name`` in {"digits", "nmnist", "dvsgesture", "cifar10dvs"} (case, '-' and '_' ignored)."""
    from .saccade import Digits

    table: dict[str, type[EventDataset]] = {
        "digits": Digits, "nmnist": NMNIST, "dvsgesture": DVSGesture, "dvs128gesture": DVSGesture,
        "cifar10dvs": CIFAR10DVS,
    }
    key = re.sub(r"[^a-z0-9]", "", str(name).lower())
    if key not in table:
        raise ValueError(f"unknown dataset {name!r}: choose digits, nmnist, dvsgesture or cifar10dvs")
    return table[key](root, train=train, frames=frames, **kw)
