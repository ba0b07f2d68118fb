"""Integration of event streams into a fixed number of frames (spikingjelly's conventions).

``split_by="number"``: T slices of N // T consecutive events, the last one taking the remainder
(all events in the last frame when N < T).  ``split_by="time"``: dt = (t_last - t_first) // T
microseconds, frame i holds t in [t_first + i dt, t_first + (i+1) dt), the last frame everything
from t_first + (T-1) dt on (t_first, t_last: the smallest and largest timestamps, which are the
first and last of a time-ordered recording).  Channel 0 counts OFF events (p == 0), channel 1 ON events.
This is ``integrate_events_by_fixed_frames_number`` computed per event instead of per window, so
it needs no time sorting and one counting pass does the whole sample.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from ..errors import OsbcError

__all__ = ["SplitBy", "frame_index", "events_to_frames", "sparse_frame_counts", "downsampled_size"]

SplitBy = Literal["time", "number"]


def _check(frames: int, split_by: str, downsample: int) -> None:
    if not isinstance(frames, (int, np.integer)) or isinstance(frames, bool) or frames < 1:
        raise OsbcError(f"frames must be a positive integer, got {frames!r}")
    if split_by not in ("time", "number"):
        raise OsbcError(f"split_by must be 'time' or 'number', got {split_by!r}")
    if not isinstance(downsample, (int, np.integer)) or downsample < 1:
        raise OsbcError(f"downsample must be a positive integer factor (2: 128 -> 64), got {downsample!r}")


def downsampled_size(sensor_size: tuple[int, int], downsample: int = 1) -> tuple[int, int]:
    """Frame (H, W) after summing downsample x downsample pixel blocks (partial blocks at the edge)."""
    h, w = sensor_size
    return -(-h // downsample), -(-w // downsample)


def frame_index(t: np.ndarray, frames: int, split_by: SplitBy = "time") -> np.ndarray:
    """Frame of each event (int64 in [0, frames)); events must be in time order for "number"."""
    _check(frames, split_by, 1)
    n = t.size
    if n == 0:
        return np.zeros(0, np.int64)
    if split_by == "number":
        per = n // frames
        if per == 0:  # fewer events than frames: spikingjelly puts them all in the last frame
            return np.full(n, frames - 1, np.int64)
        return np.minimum(np.arange(n, dtype=np.int64) // per, frames - 1)
    t = t.astype(np.int64, copy=False)
    t0 = t.min()
    # a recording shorter than `frames` microseconds would give dt = 0 (spikingjelly fails there);
    # 1 us frames keep the formula meaningful
    dt = max(int(t.max() - t0) // frames, 1)
    return np.minimum((t - t0) // dt, frames - 1)


def _flat_index(events: np.ndarray, sensor_size: tuple[int, int], frames: int, split_by: SplitBy,
                downsample: int) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """Index of each event in the raveled [frames, 2, H, W] array, and that shape."""
    _check(frames, split_by, downsample)
    h, w = sensor_size
    x = np.asarray(events["x"]).astype(np.int64)
    y = np.asarray(events["y"]).astype(np.int64)
    if x.size and (x.min() < 0 or y.min() < 0 or x.max() >= w or y.max() >= h):
        raise OsbcError(f"events_to_frames: events reach x in [{x.min()}, {x.max()}], "
                        f"y in [{y.min()}, {y.max()}], outside the {h}x{w} sensor_size given")
    hh, ww = downsampled_size(sensor_size, downsample)
    if downsample > 1:
        x //= downsample
        y //= downsample
    on = np.asarray(events["p"]) != 0
    fi = frame_index(np.asarray(events["t"]), frames, split_by)
    return ((fi * 2 + on) * hh + y) * ww + x, (frames, 2, hh, ww)


def sparse_frame_counts(events: np.ndarray, sensor_size: tuple[int, int], frames: int,
                        split_by: SplitBy = "time", downsample: int = 1
                        ) -> tuple[np.ndarray, np.ndarray, tuple[int, int, int, int]]:
    """The non-zero entries of :func:`events_to_frames` as (flat indices ascending, counts, shape)."""
    flat, shape = _flat_index(events, sensor_size, frames, split_by, downsample)
    size = int(np.prod(shape))
    if flat.size * 8 < size:
        # few events for many bins (N-MNIST at T=100): sorting the events beats scanning a
        # full-size count array for its non-zeros
        return (*_sorted_counts(flat), shape)
    counts = np.bincount(flat, minlength=size)
    idx = np.flatnonzero(counts)
    return idx, counts[idx], shape


def _sorted_counts(flat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    flat = np.sort(flat)
    first = np.flatnonzero(np.r_[True, flat[1:] != flat[:-1]]) if flat.size else flat
    return flat[first], np.diff(np.r_[first, flat.size])


def events_to_frames(events: np.ndarray, sensor_size: tuple[int, int], frames: int,
                     split_by: SplitBy = "time", downsample: int = 1,
                     dtype: np.dtype | type | None = np.float32) -> np.ndarray:
    """Count events per (frame, polarity, pixel): array [frames, 2, H, W].

    ``sensor_size`` is (H, W) of the recording; ``downsample`` sums blocks of pixels
    (2: 128x128 -> 64x64). ``dtype=None`` gives int64 counts.
    """
    flat, shape = _flat_index(events, sensor_size, frames, split_by, downsample)
    size = int(np.prod(shape))
    if flat.size * 64 < size:
        # very sparse (a short recording at large T): scatter the few counts instead of
        # counting into, and converting, a full-size int64 array
        idx, counts = _sorted_counts(flat)
        out = np.zeros(size, np.int64 if dtype is None else dtype)
        out[idx] = counts
        return out.reshape(shape)
    counts = np.bincount(flat, minlength=size).reshape(shape)
    return counts if dtype is None else counts.astype(dtype)
