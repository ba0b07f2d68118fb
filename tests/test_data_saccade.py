"""Events from images (saccade_events) and the offline Digits dataset."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import osbc.data.saccade as sacmod
from osbc.data import NMNIST, Digits, load_dataset, read_nmnist, saccade_events, upsample_images


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    # nothing a test does may land in the user's ~/.cache/osbc
    monkeypatch.setenv("OSBC_CACHE", str(tmp_path_factory.mktemp("osbc-cache")))


def square(size=20, inner=10):
    img = np.zeros((size, size))
    a = (size - inner) // 2
    img[a:a + inner, a:a + inner] = 1.0
    return img


def test_saccade_events_basic():
    imgs = np.stack([square(), square().T * 0.5, np.zeros((20, 20))])
    evs = saccade_events(imgs, (34, 34), seed=3)
    assert len(evs) == 3
    for ev in evs:
        assert (np.diff(ev["t"]) >= 0).all()
        assert ev["t"].min() >= 0 and ev["t"].max() < 300_000
        assert ev["x"].max() < 34 and ev["y"].max() < 34
    sq, dim, blank = evs
    assert sq.size > 500 and 0.3 < sq["p"].mean() < 0.7  # edges give ON and OFF alike
    assert blank.size < 0.1 * sq.size  # background noise only
    # every saccade moves the edges: activity in each third of the recording
    thirds = np.bincount(sq["t"] // 100_000, minlength=3)
    assert (thirds > 0.15 * sq.size).all()
    # events come from the edges, not from the flat inside of the square
    inside = (sq["x"] >= 15) & (sq["x"] < 19) & (sq["y"] >= 15) & (sq["y"] < 19)
    assert inside.mean() < 0.05
    again = saccade_events(imgs, (34, 34), seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(evs, again))
    other = saccade_events(imgs, (34, 34), seed=4)
    assert not np.array_equal(other[0], sq)
    # each image has its own random stream: batching does not change its events
    small_batches = saccade_events(imgs, (34, 34), seed=3, batch=2)
    assert all(np.array_equal(a, b) for a, b in zip(evs, small_batches))
    quiet = saccade_events(np.zeros((2, 5, 5)), (8, 8), noise_hz=0.0)
    assert [q.size for q in quiet] == [0, 0]


def test_saccade_threshold_and_refractory():
    img = square()[None]
    coarse = saccade_events(img, threshold=0.5, jitter_us=0, noise_hz=0, seed=0)[0]
    fine = saccade_events(img, threshold=0.15, jitter_us=0, noise_hz=0, seed=0)[0]
    assert fine.size > 2 * coarse.size
    slow = saccade_events(img, threshold=0.05, refractory_us=20_000, jitter_us=0, noise_hz=0, seed=0)[0]
    for x, y in {(int(a), int(b)) for a, b in zip(slow["x"], slow["y"])}:
        t = slow["t"][(slow["x"] == x) & (slow["y"] == y)]
        assert (np.diff(t) >= 20_000 - 1).all()  # one pixel never fires within its refractory time


def test_saccade_arguments():
    with pytest.raises(ValueError, match="do not fit"):
        saccade_events(np.zeros((1, 40, 40)), (34, 34))
    with pytest.raises(ValueError, match=r"shape \(N, h, w\)"):
        saccade_events(np.zeros(5))
    with pytest.raises(ValueError, match="threshold"):
        saccade_events(np.zeros((1, 5, 5)), threshold=0)
    assert saccade_events(np.zeros((0, 5, 5))) == []
    assert len(saccade_events(square())) == 1  # a single (h, w) image


def test_upsample_images():
    img = np.zeros((1, 8, 8))
    img[0, 2:6, 3:5] = 16
    up = upsample_images(img)
    assert up.shape == (1, 28, 28)
    assert np.abs(up[0, :3]).max() < 0.5 and up.max() > 8  # margin stays dark, stroke survives
    assert abs(np.diff(up[0], axis=1)).max() < 8  # smooth: no 16-level jumps


@pytest.fixture(scope="module")
def digits_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("digits-cache")


def test_digits_builds_real_nmnist_files(digits_cache, monkeypatch):
    pytest.importorskip("sklearn")
    train = Digits(train=True, frames=10, cache=digits_cache)
    test = Digits(train=False, frames=10, cache=digits_cache)
    assert (len(train), len(test)) == (1438, 359)
    assert isinstance(train, NMNIST) and train.sensor_size == (34, 34) and train.num_classes == 10
    counts = np.bincount(test.targets)
    assert counts.min() >= 35 and counts.max() <= 37  # stratified 20 % of ~180 per class
    names = {s.name.rsplit("/", 1)[-1] for s in train.samples}
    assert not names & {s.name.rsplit("/", 1)[-1] for s in test.samples}
    # the files are plain N-MNIST recordings
    bins = sorted((train.root / "Train").rglob("*.bin"))
    assert len(bins) == 1438
    ev = read_nmnist(bins[0])
    assert 1000 < ev.size < 10_000 and ev["t"].max() < 300_000
    x, y = train[0]
    assert x.shape == (10, 2, 34, 34) and x.dtype == torch.float32 and x.sum() == train.events(0).size
    # a second call reuses the files: no simulation
    monkeypatch.setattr(sacmod, "saccade_events", lambda *a, **k: pytest.fail("rebuilt"))
    again = load_dataset("digits", None, train=False, frames=10, cache=digits_cache)
    assert again.root == test.root and torch.equal(again[5][0], test[5][0])


def test_digits_learnable(digits_cache):
    """A linear read-out of the time-summed frames must exceed 85 % on the held-out digits.
    (Ridge regression in closed form: deterministic and quick even on a busy machine; an MLP on
    the same frames does better, see bench/bench_data.py.)"""
    pytest.importorskip("sklearn")
    X, y = Digits(train=True, frames=10, cache=digits_cache).tensors()
    Xt, yt = Digits(train=False, frames=10, cache=digits_cache).tensors()

    def features(frames):  # rate code: events per polarity and 2x2 pixel block
        s = frames.sum(1).numpy().astype(np.float64)
        return s.reshape(len(s), 2, 17, 2, 17, 2).sum((3, 5)).reshape(len(s), -1)

    a, at = features(X), features(Xt)
    mu, sd = a.mean(0), a.std(0) + 1e-3
    a, at = (a - mu) / sd, (at - mu) / sd
    onehot = np.eye(10)[y.numpy()]
    w = np.linalg.solve(a.T @ a + 10.0 * np.eye(a.shape[1]), a.T @ (onehot - onehot.mean(0)))
    acc = float(((at @ w).argmax(1) == yt.numpy()).mean())
    assert acc > 0.85, acc


def test_digits_params_make_new_folder(tmp_path, monkeypatch):
    pytest.importorskip("sklearn")
    images, labels = sacmod._load_sklearn_digits()
    monkeypatch.setattr(sacmod, "_load_sklearn_digits", lambda: (images[:60], labels[:60]))
    a = Digits(tmp_path, frames=4, seed=0, saccade={"threshold": 0.6}, cache=False)
    b = Digits(tmp_path, frames=4, seed=1, saccade={"threshold": 0.6}, cache=False)
    assert a.root != b.root and a.root.parent == b.root.parent == tmp_path
    assert not list(tmp_path.glob(".building-*"))
    with pytest.raises(ValueError, match="test_fraction"):
        Digits(tmp_path, test_fraction=0)
