"""The on-disk frame cache: one small compressed file of sparse counts per sample.

A file's name hashes the dataset settings (folder) and the sample (its source file's content key
from :mod:`osbc.data.archive`, its name and time window), so a changed recording or other settings
never meet an old file.  A cache that cannot be written (read-only folder, full disk) is not an
error: the dataset warns once and integrates the samples without storing them.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np

from ..atomic import atomic_write_bytes

__all__ = ["CACHE_ENV", "default_cache_dir", "FrameCache"]

CACHE_ENV = "OSBC_CACHE"
# 2: sample keys from the file's content (size, mtime, hash of its ends), not its path alone
_CACHE_VERSION = 2
Sparse = tuple[np.ndarray, np.ndarray, tuple[int, ...]]  # from sparse_frame_counts

# A cache file: magic, the frame shape, the number of non-zero counts and the byte width of a
# count, then zlib(gaps between successive non-zero flat indices as uint32, counts).  Sparse
# because most pixels of most frames are empty; gaps because they compress far better than
# indices.  Read with frombuffer: a tenth of the cost of an .npz, and nothing executable inside.
_CACHE_SUFFIX = ".frames"
_CACHE_MAGIC = b"OSBCFRM1"
_CACHE_HEAD = struct.Struct("<8s4IIB")


def default_cache_dir() -> Path:
    """``$OSBC_CACHE`` if set, else ``~/.cache/osbc``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "osbc"


def pack_counts(idx: np.ndarray, vals: np.ndarray, shape: tuple[int, ...]) -> bytes:
    """The bytes of a cache file holding the sparse counts (flat indices ascending, counts)."""
    top = int(vals.max()) if vals.size else 0
    width = 1 if top < 1 << 8 else 2 if top < 1 << 16 else 4
    gaps = np.diff(idx, prepend=0).astype("<u4")
    body = gaps.tobytes() + vals.astype(f"<u{width}").tobytes()
    return _CACHE_HEAD.pack(_CACHE_MAGIC, *shape, idx.size, width) + zlib.compress(body, 1)


def unpack_counts(data: bytes, shape: tuple[int, ...], flat: np.ndarray) -> bool:
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


class FrameCache:
    """The cache files of one dataset type and frame setting, under ``root/frames/``."""

    def __init__(self, root: Path, kind: str, frames: int, split_by: str, downsample: int,
                 sensor_size: tuple[int, int], shape: tuple[int, ...]):
        self.root, self.shape = Path(root), tuple(shape)
        cfg = json.dumps([_CACHE_VERSION, kind, frames, split_by, downsample, list(sensor_size)])
        tag = hashlib.sha1(cfg.encode()).hexdigest()[:8]
        self.folder = self.root / "frames" / f"{kind}-T{frames}-{split_by}-d{downsample}-{tag}"
        self.writable = True  # False after a write failed: later samples are not even tried

    def path(self, key: str) -> Path:
        """The file for a sample key (source content key, name, window)."""
        return self.folder / (hashlib.sha1(key.encode()).hexdigest()[:24] + _CACHE_SUFFIX)

    def load(self, key: str, flat: np.ndarray) -> bool:
        """Fill `flat` (zeros) from the cache; False when the file is missing or unusable."""
        try:
            with open(self.path(key), "rb") as f:
                data = f.read()
        except OSError:
            return False
        return unpack_counts(data, self.shape, flat)

    def store(self, key: str, counts: Sparse) -> bool:
        """Write a sample's counts; False (and one warning) when the cache cannot be written."""
        if not self.writable:
            return False
        try:
            atomic_write_bytes(self.path(key), pack_counts(*counts))
            return True
        except OSError as e:
            self.writable = False
            warnings.warn(f"{self.root}: frame cache not writable ({e.strerror or e}); integrating "
                          f"samples without caching them (set {CACHE_ENV} to a writable folder, or "
                          "pass cache=False)", stacklevel=3)
            return False
