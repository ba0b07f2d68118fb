"""Frame integration against direct counts (spikingjelly's fixed-frame-number conventions)."""

from __future__ import annotations

import numpy as np
import pytest

from osbc.data import downsampled_size, events_to_frames, frame_index, make_events, sparse_frame_counts


def reference_frames(ev, h, w, T, split_by):
    """Spikingjelly's recipe written out: per frame an index window [j_l, j_r) into the
    time-sorted events, then one count per event with plain Python loops."""
    n = ev.size
    t = ev["t"]
    bounds = []
    if split_by == "number":
        di = n // T
        bounds = [(i * di, (i + 1) * di) for i in range(T)]
        bounds[-1] = (bounds[-1][0], n)
    else:
        dt = (int(t[-1]) - int(t[0])) // T
        for i in range(T):
            lo, hi = t[0] + i * dt, t[0] + (i + 1) * dt
            idx = [k for k in range(n) if lo <= t[k] < hi]
            bounds.append((idx[0], idx[-1] + 1 if i < T - 1 else n))
    out = np.zeros((T, 2, h, w))
    for i, (a, b) in enumerate(bounds):
        for k in range(a, b):
            out[i, int(ev["p"][k] != 0), ev["y"][k], ev["x"][k]] += 1
    return out


def dense_events(n, h, w, t_max, seed):
    rng = np.random.default_rng(seed)
    # enough events that no time window is empty (spikingjelly's recipe needs that)
    t = np.sort(np.r_[np.linspace(0, t_max, 200).astype(int), rng.integers(0, t_max, n - 200)])
    return make_events(rng.integers(0, w, n), rng.integers(0, h, n), t, rng.integers(0, 2, n))


@pytest.mark.parametrize("split_by", ["time", "number"])
@pytest.mark.parametrize("T", [1, 3, 10, 16])
def test_matches_reference(split_by, T):
    ev = dense_events(1500, 6, 5, 98_765, seed=T)
    got = events_to_frames(ev, (6, 5), T, split_by)
    assert got.shape == (T, 2, 6, 5) and got.dtype == np.float32
    np.testing.assert_array_equal(got, reference_frames(ev, 6, 5, T, split_by))
    assert got.sum() == ev.size


def test_hand_made_time_split():
    # t spans 0..100 us, T = 4 -> dt = 25: [0,25) [25,50) [50,75) [75, end]
    ev = make_events(x=[0, 1, 1, 2, 2, 0], y=[0, 0, 0, 1, 1, 1], t=[0, 24, 25, 60, 75, 100],
                     p=[1, 0, 0, 1, 1, 0])
    f = events_to_frames(ev, (2, 3), 4, "time", dtype=None)
    expect = np.zeros((4, 2, 2, 3), int)
    expect[0, 1, 0, 0] = 1  # t=0 ON at (x0, y0)
    expect[0, 0, 0, 1] = 1  # t=24 OFF at (x1, y0)
    expect[1, 0, 0, 1] = 1  # t=25
    expect[2, 1, 1, 2] = 1  # t=60
    expect[3, 1, 1, 2] = 1  # t=75
    expect[3, 0, 1, 0] = 1  # t=100, the last event, lands in the last frame
    np.testing.assert_array_equal(f, expect)
    # unsorted input gives the same counts for split_by="time"
    perm = np.random.default_rng(0).permutation(ev.size)
    np.testing.assert_array_equal(events_to_frames(ev[perm], (2, 3), 4, "time", dtype=None), expect)


def test_hand_made_number_split():
    ev = make_events(x=[0] * 7, y=[0] * 7, t=range(7), p=[1, 1, 0, 0, 1, 0, 1])
    # 7 // 3 = 2 per frame, the last frame takes the remaining 3
    np.testing.assert_array_equal(frame_index(ev["t"], 3, "number"), [0, 0, 1, 1, 2, 2, 2])
    f = events_to_frames(ev, (1, 1), 3, "number", dtype=None)[:, :, 0, 0]
    np.testing.assert_array_equal(f, [[0, 2], [2, 0], [1, 2]])
    # fewer events than frames: all in the last frame (as spikingjelly's windows give)
    np.testing.assert_array_equal(frame_index(ev["t"][:2], 5, "number"), [4, 4])


def test_edge_cases():
    empty = make_events([], [], [], [])
    assert not events_to_frames(empty, (4, 4), 5).any()
    # a recording shorter than T microseconds: 1 us frames
    ev = make_events([0, 0, 0], [0, 0, 0], [10, 11, 12], [1, 1, 1])
    np.testing.assert_array_equal(frame_index(ev["t"], 5, "time"), [0, 1, 2])
    with pytest.raises(ValueError, match="outside the 4x4 sensor_size"):
        events_to_frames(make_events([4], [0], [0], [0]), (4, 4), 2)
    for bad in (dict(frames=0), dict(frames=2.5), dict(split_by="count"), dict(downsample=0)):
        kw = dict(frames=2, split_by="time", downsample=1) | bad
        with pytest.raises(ValueError):
            events_to_frames(ev, (4, 4), **kw)


@pytest.mark.parametrize("factor", [2, 4])
def test_downsample_sums_blocks(factor):
    ev = dense_events(3000, 128, 128, 50_000, seed=factor)
    full = events_to_frames(ev, (128, 128), 5, "number", dtype=None)
    small = events_to_frames(ev, (128, 128), 5, "number", downsample=factor, dtype=None)
    assert small.shape == (5, 2, 128 // factor, 128 // factor)
    blocks = full.reshape(5, 2, 128 // factor, factor, 128 // factor, factor).sum((3, 5))
    np.testing.assert_array_equal(small, blocks)
    # sizes that do not divide keep the partial edge block
    assert downsampled_size((34, 34), 4) == (9, 9)
    assert events_to_frames(make_events([33], [33], [0], [1]), (34, 34), 1, downsample=4)[0, 1, 8, 8] == 1


@pytest.mark.parametrize("n", [40, 3000])
def test_sparse_and_dense_paths_agree(n):
    # 40 events on 128x128 at T=5 take the scatter paths, 3000 on 6x5 the counting paths
    size = 128 if n == 40 else 6
    rng = np.random.default_rng(n)
    ev = make_events(rng.integers(0, size, n), rng.integers(0, size, n),
                     np.sort(rng.integers(0, 10_000, n)), rng.integers(0, 2, n))
    ev[1] = ev[0]  # a repeated event must count twice
    for split_by in ("time", "number"):
        dense = events_to_frames(ev, (size, size), 5, split_by, dtype=None)
        brute = np.zeros_like(dense)
        for f, e in zip(frame_index(ev["t"], 5, split_by), ev):
            brute[f, int(e["p"] != 0), e["y"], e["x"]] += 1
        np.testing.assert_array_equal(dense, brute)
        idx, counts, shape = sparse_frame_counts(ev, (size, size), 5, split_by)
        assert shape == dense.shape and (np.diff(idx) > 0).all()
        np.testing.assert_array_equal(idx, np.flatnonzero(dense))
        np.testing.assert_array_equal(counts, dense.ravel()[idx])
