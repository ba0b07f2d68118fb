"""Datasets on small fake copies of the published layouts (folders and archives)."""

from __future__ import annotations

import os
import pickle
import shutil
import tarfile
import zipfile

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from osbc.data import (
    CIFAR10DVS,
    NMNIST,
    DVSGesture,
    EventFileError,
    EventFileWarning,
    calibration_split,
    events_to_frames,
    load_dataset,
    make_events,
    stratified_split,
    write_aedat20,
    write_aedat31,
    write_nmnist,
)
import osbc.data.archive as archive


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    # nothing a test does may land in the user's ~/.cache/osbc
    monkeypatch.setenv("OSBC_CACHE", str(tmp_path_factory.mktemp("osbc-cache")))


def rand_events(rng, n, size, t0=0, t1=300_000):
    return make_events(rng.integers(0, size, n), rng.integers(0, size, n),
                       np.sort(rng.integers(t0, t1, n)), rng.integers(0, 2, n))


def zip_folder(folder, archive, arcroot=None, junk=False):
    with zipfile.ZipFile(archive, "w") as z:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                name = path.relative_to(folder.parent if arcroot is None else arcroot).as_posix()
                z.write(path, name)
                if junk:  # macOS resource forks must be ignored
                    z.writestr(f"__MACOSX/{os.path.dirname(name)}/._{path.name}", b"\0\5\26\7junk")


# ------------------------------------------------------------------------------ N-MNIST

@pytest.fixture
def nmnist_root(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "nmnist"
    events = {}
    for split, per in (("Train", 3), ("Test", 2)):
        for d in range(10):
            for k in range(per):
                ev = rand_events(rng, int(rng.integers(50, 400)), 34)
                name = f"{d}/{k * 7 + d:05d}.bin"
                write_nmnist(root / split / name, ev)
                events[(split, name)] = ev
    return root, events


def test_nmnist_folder(nmnist_root, tmp_path):
    root, events = nmnist_root
    ds = NMNIST(root, train=True, frames=8, split_by="number", cache=tmp_path / "c")
    assert len(ds) == 30 and ds.num_classes == 10 and ds.sensor_size == (34, 34)
    assert ds.targets == sorted(ds.targets) and set(ds.targets) == set(range(10))
    for i in (0, 13, 29):
        x, y = ds[i]
        ev = events[("Train", ds.samples[i].name)]
        assert isinstance(x, torch.Tensor) and x.dtype == torch.float32 and x.shape == (8, 2, 34, 34)
        assert y == int(ds.samples[i].name[0])
        np.testing.assert_array_equal(x.numpy(), events_to_frames(ev, (34, 34), 8, "number"))
    test = NMNIST(root, train=False, frames=None, cache=False)
    ev, y = test[-1]
    np.testing.assert_array_equal(ev["t"], events[("Test", test.samples[-1].name)]["t"])


def test_nmnist_zip_matches_folder(nmnist_root, tmp_path):
    root, _ = nmnist_root
    zroot = tmp_path / "zipped"
    zroot.mkdir()
    for split in ("Train", "Test"):
        zip_folder(root / split, zroot / f"{split}.zip", junk=True)
    before = {p: p.stat().st_mtime_ns for p in zroot.iterdir()}
    a = NMNIST(root, train=False, frames=4, cache=False)
    b = NMNIST(zroot, train=False, frames=4, cache=tmp_path / "c", downsample=2)
    c = NMNIST(zroot, train=False, frames=4, cache=False)
    assert len(a) == len(b) == 20 and a.targets == b.targets
    for i in range(len(a)):
        np.testing.assert_array_equal(a[i][0], c[i][0])
        assert b[i][0].shape == (4, 2, 17, 17) and b[i][0].sum() == a[i][0].sum()
    assert {p: p.stat().st_mtime_ns for p in zroot.iterdir()} == before  # archives untouched


def test_nmnist_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"Train\.zip and Test\.zip.*into .*empty"):
        NMNIST(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="needs root="):
        NMNIST(None)
    (tmp_path / "r" / "Train").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"no <digit>/<id>\.bin files.*Train\.zip"):
        NMNIST(tmp_path / "r")
    # a corrupt archive names itself
    (tmp_path / "z").mkdir()
    (tmp_path / "z" / "Test.zip").write_bytes(b"PK\3\4 not really")
    with pytest.raises(EventFileError, match=r"Test\.zip: not a readable zip archive"):
        NMNIST(tmp_path / "z", train=False)


def test_cache_reused_and_repaired(nmnist_root, tmp_path, monkeypatch):
    root, _ = nmnist_root
    cache = tmp_path / "cache"
    ds = NMNIST(root, frames=6, cache=cache)
    assert ds.prepare() == len(ds) and ds.prepare() == 0
    first = [ds[i][0] for i in range(len(ds))]
    files = sorted(cache.rglob("*.frames"))
    assert len(files) == len(ds)
    # a second dataset reads the cache only: the event files are never parsed again
    monkeypatch.setattr(NMNIST, "_decode", lambda *a: pytest.fail("cache not used"))
    again = NMNIST(root, frames=6, cache=cache)
    for i in range(len(again)):
        assert torch.equal(again[i][0], first[i])
    monkeypatch.undo()
    # a damaged cache file is rebuilt, not trusted
    victim = again._cache_path(3)
    victim.write_bytes(victim.read_bytes()[:10])
    assert torch.equal(NMNIST(root, frames=6, cache=cache)[3][0], first[3])
    assert len(victim.read_bytes()) > 10
    # other settings use other files
    NMNIST(root, frames=7, cache=cache)[0]
    assert len(list(cache.rglob("*.frames"))) == len(ds) + 1


def test_default_cache_env(nmnist_root, tmp_path, monkeypatch):
    root, _ = nmnist_root
    monkeypatch.setenv("OSBC_CACHE", str(tmp_path / "envcache"))
    NMNIST(root, train=False, frames=3)[0]  # N-MNIST caches no frames unless asked
    assert not (tmp_path / "envcache").exists()
    NMNIST(root, train=False, frames=3, cache=True)[0]
    assert list((tmp_path / "envcache").rglob("*.frames"))


def test_on_error_warn(nmnist_root, tmp_path):
    root, events = nmnist_root
    ds = NMNIST(root, frames=2, cache=False)
    victim = root / "Train" / ds.samples[0].name
    victim.write_bytes(victim.read_bytes()[:-2])
    with pytest.raises(EventFileError, match=rf"{ds.samples[0].name}: truncated"):
        ds[0]
    soft = NMNIST(root, frames=2, cache=False, on_error="warn")
    with pytest.warns(EventFileWarning):
        x, _ = soft[0]
    assert x.sum() == events[("Train", ds.samples[0].name)].size - 1


def test_dataloader_and_pickle(nmnist_root, tmp_path):
    root, _ = nmnist_root
    ds = NMNIST(root, frames=5, cache=tmp_path / "c")
    xb, yb = next(iter(DataLoader(ds, batch_size=7, shuffle=True)))
    assert xb.shape == (7, 5, 2, 34, 34) and yb.dtype == torch.int64
    clone = pickle.loads(pickle.dumps(ds))
    assert torch.equal(clone[4][0], ds[4][0])
    X, y = ds.tensors()
    assert X.shape == (30, 5, 2, 34, 34) and torch.equal(X[4], ds[4][0]) and y.tolist() == ds.targets


def test_dataloader_workers_zip(nmnist_root, tmp_path):
    root, _ = nmnist_root
    zroot = tmp_path / "zipped"
    zroot.mkdir()
    zip_folder(root / "Train", zroot / "Train.zip")
    ds = NMNIST(zroot, frames=5, cache=False)
    ds[0]  # opens the zip in the parent: workers must not share its file offset
    total = sum(x.sum() for x, _ in DataLoader(ds, batch_size=4, num_workers=2))
    assert total == sum(ds[i][0].sum() for i in range(len(ds)))


# ------------------------------------------------------------------------------ DVS128 Gesture

def make_gesture(root, rng):
    """Two train recordings and one test recording, each with labelled windows."""
    folder = root / "DvsGesture"
    windows = {}
    recs = {"user01_fluorescent": "train", "user02_lab": "train", "user24_led": "test"}
    for rec in recs:
        ev = rand_events(rng, 6000, 128, t0=1_000_000, t1=6_500_000)
        write_aedat31(folder / f"{rec}.aedat", ev, events_per_packet=500)
        rows = [(c, 1_000_000 + 1_000_000 * k, 1_000_000 + 1_000_000 * k + 700_000)
                for k, c in enumerate(rng.choice(np.arange(1, 12), 5, replace=False))]
        text = "class,startTime_usec,endTime_usec\n" + "".join(f"{c},{a},{b}\n" for c, a, b in rows)
        (folder / f"{rec}_labels.csv").write_text(text)
        windows[rec] = (ev, rows)
    (folder / "trials_to_train.txt").write_text("user01_fluorescent.aedat\nuser02_lab.aedat\n\n")
    (folder / "trials_to_test.txt").write_text("user24_led.aedat\n")
    return windows


def test_gesture_folder_windows(tmp_path):
    windows = make_gesture(tmp_path / "g", np.random.default_rng(1))
    before = sorted((p, p.stat().st_mtime_ns) for p in (tmp_path / "g").rglob("*"))
    train = DVSGesture(tmp_path / "g", train=True, frames=4, cache=False)
    test = DVSGesture(tmp_path / "g", train=False, frames=4, cache=tmp_path / "c")
    assert (len(train), len(test)) == (10, 5) and train.num_classes == 11
    ev, rows = windows["user24_led"]
    for i, (c, a, b) in enumerate(rows):
        x, y = test[i]
        assert y == c - 1
        cut = ev[(ev["t"] >= a) & (ev["t"] < b)]
        np.testing.assert_array_equal(x.numpy(), events_to_frames(cut, (128, 128), 4))
        np.testing.assert_array_equal(test.events(i)["t"], cut["t"])
    # one parse of the recording cached all its windows
    assert len(list((tmp_path / "c").rglob("*.frames"))) == 5
    assert sorted((p, p.stat().st_mtime_ns) for p in (tmp_path / "g").rglob("*")) == before


def test_gesture_tar_in_place(tmp_path, monkeypatch):
    make_gesture(tmp_path / "g", np.random.default_rng(2))
    (tmp_path / "t").mkdir()
    with tarfile.open(tmp_path / "t" / "DvsGesture.tar.gz", "w:gz") as tf:
        tf.add(tmp_path / "g" / "DvsGesture", arcname="DvsGesture")
    ref = DVSGesture(tmp_path / "g", train=True, frames=3, split_by="number", cache=False)
    ds = DVSGesture(tmp_path / "t", train=True, frames=3, split_by="number", cache=tmp_path / "c")
    assert ds.targets == ref.targets
    for i in range(len(ds)):
        assert torch.equal(ds[i][0], ref[i][0])
    # the archive listing is remembered and the frames cached: the archive is not opened again
    assert list((tmp_path / "c" / "archives").glob("tar-index-*.json"))
    monkeypatch.setattr(archive._TarSource, "_open", lambda self: pytest.fail("archive reopened"))
    again = DVSGesture(tmp_path / "t", train=True, frames=3, split_by="number", cache=tmp_path / "c")
    assert all(torch.equal(again[i][0], ref[i][0]) for i in range(len(again)))
    with pytest.raises(ValueError, match=r"needs the cache.*tar xzf DvsGesture\.tar\.gz"):
        DVSGesture(tmp_path / "t", cache=False)


def test_gesture_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"DvsGesture\.tar\.gz"):
        DVSGesture(tmp_path)
    make_gesture(tmp_path / "g", np.random.default_rng(3))
    (tmp_path / "t").mkdir()
    with tarfile.open(tmp_path / "t" / "DvsGesture.tar.gz", "w:gz") as tf:
        tf.add(tmp_path / "g" / "DvsGesture", arcname="DvsGesture")
    archive = tmp_path / "t" / "DvsGesture.tar.gz"
    archive.write_bytes(archive.read_bytes()[:-3000])  # an interrupted download
    with pytest.raises(EventFileError, match=r"DvsGesture\.tar\.gz: archive is truncated or corrupted"):
        DVSGesture(tmp_path / "t", cache=tmp_path / "c")
    folder = tmp_path / "g" / "DvsGesture"
    (folder / "user24_led_labels.csv").write_text("class,startTime_usec,endTime_usec\n12,5,9\n")
    with pytest.raises(EventFileError, match=r"user24_led_labels\.csv: line 2"):
        DVSGesture(tmp_path / "g", train=False)
    (folder / "user24_led.aedat").unlink()
    with pytest.raises(FileNotFoundError, match=r"user24_led\.aedat listed in trials_to_test\.txt"):
        DVSGesture(tmp_path / "g", train=False)


# ------------------------------------------------------------------------------ CIFAR10-DVS

def make_cifar(root, rng, per_class=10):
    for cls in CIFAR10DVS.classes:
        for i in range(per_class):
            write_aedat20(root / cls / f"cifar10_{cls}_{i}.aedat", rand_events(rng, 300, 128))


def test_cifar_split_and_archives(tmp_path):
    make_cifar(tmp_path / "c10", np.random.default_rng(4))
    train = CIFAR10DVS(tmp_path / "c10", train=True, frames=2, cache=False)
    test = CIFAR10DVS(tmp_path / "c10", train=False, frames=2, cache=False)
    assert (len(train), len(test)) == (90, 10)
    assert np.bincount(test.targets).tolist() == [1] * 10
    names = {s.name for s in train.samples} | {s.name for s in test.samples}
    assert len(names) == 100  # disjoint and complete
    # seeded: same seed same split, another seed another split; seed=None = first 9 per class
    assert [s.name for s in CIFAR10DVS(tmp_path / "c10", train=False, cache=False).samples] == \
        [s.name for s in test.samples]
    other = CIFAR10DVS(tmp_path / "c10", train=False, seed=1, cache=False)
    assert [s.name for s in other.samples] != [s.name for s in test.samples]
    first = CIFAR10DVS(tmp_path / "c10", train=False, seed=None, cache=False)
    assert all(s.name.endswith("_9.aedat") for s in first.samples)  # natural order: 9 after 8, not 10
    # the original zips give the same samples
    (tmp_path / "z").mkdir()
    for cls in CIFAR10DVS.classes:
        zip_folder(tmp_path / "c10" / cls, tmp_path / "z" / f"{cls}.zip")
    z = CIFAR10DVS(tmp_path / "z", train=False, frames=2, cache=tmp_path / "cache")
    assert z.targets == test.targets
    for i in range(len(z)):
        assert torch.equal(z[i][0], test[i][0])


def test_cifar_missing_names_archives(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"airplane\.zip, automobile\.zip.*truck\.zip"):
        CIFAR10DVS(tmp_path)
    make_cifar(tmp_path / "c", np.random.default_rng(5), per_class=1)
    shutil.rmtree(tmp_path / "c" / "frog")
    with pytest.raises(FileNotFoundError, match=r"missing frog\.zip\)"):
        CIFAR10DVS(tmp_path / "c")
    with pytest.raises(ValueError, match="train_fraction"):
        CIFAR10DVS(tmp_path / "c", train_fraction=1.0)


# ------------------------------------------------------------------------------ splits and factory

def test_stratified_split():
    labels = np.repeat(np.arange(4), [100, 50, 30, 20])
    picked, rest = stratified_split(labels, 20, seed=0)
    assert np.bincount(labels[picked]).tolist() == [10, 5, 3, 2]
    assert np.intersect1d(picked, rest).size == 0 and picked.size + rest.size == 200
    assert np.array_equal(stratified_split(labels, 20, seed=0)[0], picked)
    frac, _ = stratified_split(labels, 0.1, seed=None)
    assert np.bincount(labels[frac]).tolist() == [10, 5, 3, 2] and frac[:10].tolist() == list(range(10))
    odd, _ = stratified_split(labels, 7, seed=1)  # largest remainders decide the rounding
    assert odd.size == 7 and np.bincount(labels[odd], minlength=4).tolist() == [3, 2, 1, 1]
    for bad in (0, 201, 1.0, -0.5, "3", True):
        with pytest.raises(ValueError):
            stratified_split(labels, bad)


def test_calibration_split(nmnist_root, tmp_path):
    root, _ = nmnist_root
    ds = NMNIST(root, frames=2, cache=False)
    calib, rest = calibration_split(ds, 10, seed=0)
    assert len(calib) == 10 and len(rest) == 20
    assert sorted(calib.targets) == list(range(10)) and calib.num_classes == 10
    assert calib.sensor_size == (34, 34)
    x, y = calib[3]
    assert y == calib.targets[3] and x.shape == (2, 2, 34, 34)
    inner, _ = calibration_split(rest, 0.5, seed=0)  # subsets of subsets keep their labels
    assert len(inner) == 10 and sorted(inner.targets) == list(range(10))


def test_load_dataset(nmnist_root, tmp_path):
    root, _ = nmnist_root
    ds = load_dataset("N-MNIST", root, train=False, frames=3, cache=False)
    assert isinstance(ds, NMNIST) and ds.frames == 3 and not ds.train
    with pytest.raises(ValueError, match="unknown dataset 'mnist'"):
        load_dataset("mnist", root)
    with pytest.raises(FileNotFoundError, match="DvsGesture"):
        load_dataset("dvs_gesture", tmp_path)
    with pytest.raises(ValueError, match="split_by"):
        load_dataset("nmnist", root, split_by="events")
