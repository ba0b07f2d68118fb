"""The common base of the event datasets: an index of samples (a file inside a folder or archive,
its label, an optional time window), lazy integration into frames, and the optional frame cache.

A dataset module (:mod:`~osbc.data.nmnist`, :mod:`~osbc.data.dvsgesture`,
:mod:`~osbc.data.cifar10dvs`) only says where its files are (``_index``) and how to parse one
(``_decode``).  Nothing is downloaded; a missing dataset raises FileNotFoundError naming the
archives to fetch and where to put them.
"""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Hashable, NamedTuple

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import OsbcError
from .archive import _Source, open_source
from .cache import FrameCache, Sparse, default_cache_dir
from .frames import SplitBy, _check as _check_frame_args, downsampled_size, events_to_frames, sparse_frame_counts
from .readers import OnError, _check_on_error

__all__ = ["Sample", "EventDataset"]


class Sample(NamedTuple):
    source: int  # index into EventDataset.sources
    name: str  # file inside that source
    label: int
    window: tuple[int, int] | None  # [start, end) in microseconds, None for the whole file
    size: int  # file size in bytes when indexed


class EventDataset(Dataset):
    """Base of the event datasets: ``ds[i] -> (frames [T, 2, H, W] float32 tensor, label)``.

    ``frames=None`` returns the raw event array instead of frames. ``cache`` is True (frames
    cached under ``$OSBC_CACHE`` or ``~/.cache/osbc``), a folder, False (integrate on every
    access), or None for the dataset's default (``cache_by_default``): on where a sample costs
    far more to parse than to read back (DVS128 Gesture, CIFAR10-DVS), off for N-MNIST-sized
    samples, which integrate as fast as a cache file decompresses. A cache that cannot be written
    is skipped with one warning (:class:`~osbc.data.cache.FrameCache`).
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
        # the last file parsed, with the stamp that tells whether it changed since
        self._memo: tuple[tuple[int, str, Hashable], np.ndarray] | None = None
        self._cache: FrameCache | None = None
        if self.cache_root is not None and frames is not None:
            self._cache = FrameCache(self.cache_root, type(self).__name__, frames, split_by, downsample,
                                     self.sensor_size, self._shape())

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
        src = open_source(path, None if self.cache_root is None else self.cache_root / "archives")
        if src.sequential and self.cache_root is None:
            raise OsbcError(f"{path}: a .tar.gz has no random access, so reading it in place needs "
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
        return {**self.__dict__, "_memo": None}

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
        if self._cache is None:
            raise OsbcError("prepare() fills the frame cache: build the dataset with cache=True "
                            "(or a folder) and frames=<int>")
        cache = self._cache
        if not cache.writable:
            return 0
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
            # keys before reading: a file rewritten meanwhile is then keyed as the old content
            keys = {name: [(j, self._sample_key(j)) for j in self._groups[(src, name)]] for name in names}
            for name, data in source.stream(names):
                ev = self._decode(data, source.where(name))
                for j, key in keys[name]:
                    if not cache.store(key, self._count(_cut(ev, self.samples[j].window))):
                        bar.close()
                        return written
                    written += 1
                bar.update(1)
        bar.close()
        return written

    def tensors(self, progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole split in memory: (frames [N, T, 2, H, W] float32, labels [N] int64).
        Meant for small sets such as Digits; a full N-MNIST at T=100 would not fit."""
        if self.frames is None:
            raise OsbcError("tensors() needs frames=<int>")
        if self._cache is not None and self._cache.writable and any(s.sequential for s in self.sources):
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
        source = self.sources[src]
        key = (src, name, source.stamp(name))
        if self._memo is not None and self._memo[0] == key:
            return self._memo[1]
        ev = self._decode(source.read(name), source.where(name))
        self._memo = (key, ev)
        return ev

    def _count(self, ev: np.ndarray) -> Sparse:
        assert self.frames is not None
        return sparse_frame_counts(ev, self.sensor_size, self.frames, self.split_by, self.downsample)

    def _frames(self, i: int) -> np.ndarray:
        out = np.zeros(self._shape(), np.float32)
        self._frames_into(i, out.reshape(-1))
        return out

    def _frames_into(self, i: int, flat: np.ndarray) -> None:
        """Add sample i's counts into `flat` (zeros, the frames raveled), from the cache if there."""
        assert self.frames is not None
        cache = self._cache
        if cache is None:
            flat[:] = events_to_frames(self.events(i), self.sensor_size, self.frames,
                                       self.split_by, self.downsample).ravel()
            return
        if cache.load(self._sample_key(i), flat):
            return
        s = self.samples[i]
        if self.sources[s.source].sequential and cache.writable:
            self.prepare(progress=True)
            if cache.load(self._sample_key(i), flat):
                return
        # every window of the file at once (DVS128 Gesture): one parse fills all their entries
        keys = [(j, self._sample_key(j)) for j in self._groups[(s.source, s.name)]]
        ev = self._file_events(s.source, s.name)
        for j, key in keys:
            c = self._count(_cut(ev, self.samples[j].window))
            cache.store(key, c)
            if j == i:
                flat[c[0]] = c[1]

    def _sample_key(self, i: int) -> str:
        s = self.samples[i]
        return f"{self.sources[s.source].key(s.name)}|{s.window}"

    def _cache_path(self, i: int) -> Path:
        assert self._cache is not None
        return self._cache.path(self._sample_key(i))

    def _shape(self) -> tuple[int, int, int, int]:
        assert self.frames is not None
        return (self.frames, 2, *self.frame_size)


def _cut(ev: np.ndarray, window: tuple[int, int] | None) -> np.ndarray:
    if window is None:
        return ev
    t = ev["t"]
    return ev[(t >= window[0]) & (t < window[1])]
