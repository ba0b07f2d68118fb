"""Hostile and awkward inputs: stale caches, unwritable caches, zip bombs, odd label files, odd
folder names, symlink loops, and random damage to every file format."""

from __future__ import annotations

import os
import struct
import tarfile
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

import osbc.data.cache as cachemod
from osbc.data import (
    NMNIST,
    DVSGesture,
    EventFileError,
    EventFileWarning,
    events_to_frames,
    make_events,
    read_aedat20,
    read_aedat31,
    read_nmnist,
    write_aedat20,
    write_aedat31,
    write_nmnist,
)
from osbc.data.dvsgesture import _parse_labels
from osbc.data.readers import encode_nmnist
from osbc.errors import OsbcError
from test_data_datasets import rand_events


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("OSBC_CACHE", str(tmp_path_factory.mktemp("osbc-cache")))
    monkeypatch.delenv("OSBC_MAX_MEMBER_MB", raising=False)


def small_nmnist(root, rng, per=2, n=200):
    """Train/<d>/<k>.bin with exactly `n` events each (so rewrites keep the size)."""
    events = {}
    for d in range(10):
        for k in range(per):
            name = f"{d}/{k:05d}.bin"
            events[name] = rand_events(rng, n, 34)
            write_nmnist(root / "Train" / name, events[name])
    return events


# ------------------------------------------------------------------------------ stale cache

@pytest.mark.parametrize("keep_mtime", [False, True])
def test_rewritten_file_is_never_served_stale(tmp_path, keep_mtime):
    rng = np.random.default_rng(0)
    root = tmp_path / "n"
    small_nmnist(root, rng)
    ds = NMNIST(root, frames=5, cache=tmp_path / "c")
    name = ds.samples[7].name
    path = root / "Train" / name
    old_frames = ds[7][0].clone()
    uncached = NMNIST(root, frames=None, cache=False)
    old_t = uncached.events(7)["t"].tolist()  # remembered as the last file parsed
    st = path.stat()
    new = rand_events(rng, 200, 34)
    write_nmnist(path, new)  # same size, other events
    assert path.stat().st_size == st.st_size
    if keep_mtime:  # the mtime put back: only the content hash can tell
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
        assert path.stat().st_mtime_ns == st.st_mtime_ns
    expected = events_to_frames(new, (34, 34), 5)
    assert not np.array_equal(expected, old_frames.numpy())
    np.testing.assert_array_equal(ds[7][0].numpy(), expected)  # the same dataset object
    again = NMNIST(root, frames=5, cache=tmp_path / "c")  # and a fresh one on the same cache
    np.testing.assert_array_equal(again[7][0].numpy(), expected)
    assert uncached.events(7)["t"].tolist() == new["t"].tolist() != old_t


def test_rewritten_recording_windows_not_stale(tmp_path):
    rng = np.random.default_rng(1)
    folder = tmp_path / "g" / "DvsGesture"
    ev = rand_events(rng, 3000, 128, 0, 3_000_000)
    write_aedat31(folder / "user01_led.aedat", ev, events_per_packet=300)
    (folder / "user01_led_labels.csv").write_text("1,0,1000000\n2,1000000,2000000\n3,2000000,3000000\n")
    (folder / "trials_to_train.txt").write_text("user01_led.aedat\n")
    ds = DVSGesture(tmp_path / "g", frames=4, cache=tmp_path / "c")
    before = [ds[i][0].clone() for i in range(3)]
    st = (folder / "user01_led.aedat").stat()
    new = rand_events(rng, 3000, 128, 0, 3_000_000)
    write_aedat31(folder / "user01_led.aedat", new, events_per_packet=300)
    os.utime(folder / "user01_led.aedat", ns=(st.st_atime_ns, st.st_mtime_ns))
    for i, (a, b) in enumerate([(0, 1_000_000), (1_000_000, 2_000_000), (2_000_000, 3_000_000)]):
        cut = new[(new["t"] >= a) & (new["t"] < b)]
        got = DVSGesture(tmp_path / "g", frames=4, cache=tmp_path / "c")[i][0]
        np.testing.assert_array_equal(got.numpy(), events_to_frames(cut, (128, 128), 4))
        assert not torch.equal(got, before[i])


# ------------------------------------------------------------------------------ unwritable cache

def test_read_only_cache_reads_uncached_with_one_warning(tmp_path, monkeypatch):
    rng = np.random.default_rng(2)
    small_nmnist(tmp_path / "n", rng)
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    if os.access(ro, os.W_OK):  # root ignores the mode bits: make writes under it fail as they would
        real = cachemod.atomic_write_bytes

        def refuse(path, data):
            if ro in Path(path).parents:
                raise PermissionError(13, "Permission denied", str(path))
            return real(path, data)

        monkeypatch.setattr(cachemod, "atomic_write_bytes", refuse)
    ref = NMNIST(tmp_path / "n", frames=3, cache=False)
    ds = NMNIST(tmp_path / "n", frames=3, cache=ro)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = [ds[i][0] for i in range(len(ds))]
        X, _ = ds.tensors()
        assert ds.prepare() == 0
    msgs = [str(w.message) for w in caught]
    assert len(msgs) == 1 and "not writable" in msgs[0] and str(ro) in msgs[0]
    assert all(torch.equal(got[i], ref[i][0]) for i in range(len(ds)))
    assert torch.equal(X, torch.stack(got))
    assert list(ro.iterdir()) == []
    ro.chmod(0o755)


def test_unwritable_cache_with_tar_archive(tmp_path, monkeypatch):
    rng = np.random.default_rng(3)
    folder = tmp_path / "g" / "DvsGesture"
    for rec in ("user01_led", "user02_lab"):
        write_aedat31(folder / f"{rec}.aedat", rand_events(rng, 800, 128, 0, 2_000_000))
        (folder / f"{rec}_labels.csv").write_text("class,startTime_usec,endTime_usec\n4,0,900000\n"
                                                  "5,900000,2000000\n")
    (folder / "trials_to_train.txt").write_text("user01_led.aedat\nuser02_lab.aedat\n")
    (tmp_path / "t").mkdir()
    with tarfile.open(tmp_path / "t" / "DvsGesture.tar.gz", "w:gz") as tf:
        tf.add(folder, arcname="DvsGesture")
    ref = DVSGesture(tmp_path / "g", frames=3, cache=False)

    def refuse(path, data):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(cachemod, "atomic_write_bytes", refuse)
    monkeypatch.setattr("osbc.data.archive.atomic_write_bytes", refuse)
    ds = DVSGesture(tmp_path / "t", frames=3, cache=tmp_path / "c")
    with pytest.warns(UserWarning, match="not writable") as caught:
        for i in range(len(ds)):
            assert torch.equal(ds[i][0], ref[i][0])
    assert len([w for w in caught if "not writable" in str(w.message)]) == 1


# ------------------------------------------------------------------------------ zip members

def declare_size(archive, size):
    """Overwrite the uncompressed size of the (only) member in both of the zip's headers."""
    b = bytearray(archive.read_bytes())
    struct.pack_into("<I", b, b.find(b"PK\3\4") + 22, size)
    struct.pack_into("<I", b, b.find(b"PK\1\2") + 24, size)
    archive.write_bytes(bytes(b))


def one_member_zip(path, data, name="Train/0/00000.bin"):
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr(name, data)
    return path


def test_zip_member_over_the_cap(tmp_path, monkeypatch):
    ev = rand_events(np.random.default_rng(4), 500, 34)
    data = encode_nmnist(ev)
    archive = one_member_zip(tmp_path / "z" / "Train.zip", data)
    ok = NMNIST(tmp_path / "z", frames=2, cache=False)
    np.testing.assert_array_equal(ok[0][0].numpy(), events_to_frames(ev, (34, 34), 2))
    declare_size(archive, 2_500_000_000)  # 2.5 GB claimed by a file of a few kB
    ds = NMNIST(tmp_path / "z", frames=2, cache=False)
    with pytest.raises(OsbcError, match=r"Train\.zip:Train/0/00000\.bin: declares 2500000000 bytes.*"
                                        r"OSBC_MAX_MEMBER_MB"):
        ds[0]
    # the cap is configurable: 1 kB refuses the genuine 2500-byte member
    one_member_zip(tmp_path / "zz" / "Train.zip", data)
    monkeypatch.setenv("OSBC_MAX_MEMBER_MB", str(1000 / 2**20))
    with pytest.raises(OsbcError, match="declares 2500 bytes, over the 1000-byte limit"):
        NMNIST(tmp_path / "zz", frames=2, cache=False)[0]
    monkeypatch.setenv("OSBC_MAX_MEMBER_MB", "lots")
    with pytest.raises(OsbcError, match="OSBC_MAX_MEMBER_MB='lots'"):
        NMNIST(tmp_path / "zz", frames=2, cache=False)[0]


def test_zip_bomb_ratio_and_lying_size(tmp_path):
    bomb = one_member_zip(tmp_path / "b" / "Train.zip", bytes(8 << 20))  # 8 MiB of zeros, ~8 kB packed
    assert bomb.stat().st_size < 100_000
    with pytest.raises(OsbcError, match=r"Train\.zip:Train/0/00000\.bin: \d+ compressed bytes claim.*zip bomb"):
        NMNIST(tmp_path / "b", frames=2, cache=False)[0]
    # a member that declares 1000 bytes but inflates to 8 MiB: never read past what it declares
    liar = one_member_zip(tmp_path / "l" / "Train.zip", bytes(8 << 20))
    declare_size(liar, 1000)
    with pytest.raises(EventFileError, match=r"Train\.zip:Train/0/00000\.bin: cannot be read"):
        NMNIST(tmp_path / "l", frames=2, cache=False)[0]


def test_tar_member_over_the_cap(tmp_path, monkeypatch):
    folder = tmp_path / "g" / "DvsGesture"
    write_aedat31(folder / "user01_led.aedat", rand_events(np.random.default_rng(5), 4000, 128))
    (folder / "user01_led_labels.csv").write_text("1,0,100000\n")
    (folder / "trials_to_train.txt").write_text("user01_led.aedat\n")
    (tmp_path / "t").mkdir()
    with tarfile.open(tmp_path / "t" / "DvsGesture.tar.gz", "w:gz") as tf:
        tf.add(folder, arcname="DvsGesture")
    monkeypatch.setenv("OSBC_MAX_MEMBER_MB", str(8000 / 2**20))
    ds = DVSGesture(tmp_path / "t", frames=2, cache=tmp_path / "c")
    with pytest.raises(OsbcError, match=r"DvsGesture\.tar\.gz:DvsGesture/user01_led\.aedat: declares"):
        ds[0]


# ------------------------------------------------------------------------------ labels and names

def test_labels_csv_bom_and_header_detection():
    rows = "3,100,200\r\n11,200,300\r\n"
    assert _parse_labels(("\ufeff" + rows).encode(), "f.csv", 11) == [(2, 100, 200), (10, 200, 300)]
    assert _parse_labels(rows.encode(), "f.csv", 11) == [(2, 100, 200), (10, 200, 300)]
    with_header = "\ufeffclass,startTime_usec,endTime_usec\n\n" + rows
    assert _parse_labels(with_header.encode(), "f.csv", 11) == [(2, 100, 200), (10, 200, 300)]
    # only the first non-blank line may be a header; a later word is an error, not a skip
    with pytest.raises(EventFileError, match="f.csv: line 2 "):
        _parse_labels(b"3,100,200\nclass,startTime_usec,endTime_usec\n", "f.csv", 11)
    # non-ASCII digits are not numbers ('\u0663' is ARABIC-INDIC DIGIT THREE)
    with pytest.raises(EventFileError, match="line 2"):
        _parse_labels("class,a,b\n\u0663,100,200\n".encode(), "f.csv", 11)
    with pytest.raises(EventFileError, match="line 1"):
        _parse_labels(b"3,100\n", "f.csv", 11)


def test_gesture_labels_with_bom_keep_first_row(tmp_path):
    rng = np.random.default_rng(6)
    folder = tmp_path / "DvsGesture"
    write_aedat31(folder / "user05_natural.aedat", rand_events(rng, 2000, 128, 0, 2_000_000))
    (folder / "user05_natural_labels.csv").write_bytes("\ufeff2,0,1000000\n7,1000000,2000000\n".encode())
    (folder / "trials_to_test.txt").write_bytes("\ufeffuser05_natural.aedat\n".encode())
    ds = DVSGesture(tmp_path, train=False, frames=2, cache=False)
    assert ds.targets == [1, 6] and [s.window for s in ds.samples] == [(0, 1_000_000), (1_000_000, 2_000_000)]


def test_nmnist_class_folders_ascii_digits_only(tmp_path):
    rng = np.random.default_rng(7)
    small_nmnist(tmp_path / "n", rng, per=1)
    for odd in ("\u0663", "\uff13", "\u00b3"):  # Arabic-Indic three, fullwidth three, superscript three
        write_nmnist(tmp_path / "n" / "Train" / odd / "00000.bin", rand_events(rng, 50, 34))
    ds = NMNIST(tmp_path / "n", frames=2, cache=False)
    assert len(ds) == 10 and ds.targets == list(range(10))
    assert all(s.name[0] in "0123456789" for s in ds.samples)
    only_odd = tmp_path / "o" / "Train" / "\u0663"
    write_nmnist(only_odd / "1.bin", rand_events(rng, 50, 34))
    with pytest.raises(FileNotFoundError, match=r"no <digit>/<id>\.bin files"):
        NMNIST(tmp_path / "o")


# ------------------------------------------------------------------------------ symlink loops

def test_symlink_loop_is_listed_once(tmp_path):
    rng = np.random.default_rng(8)
    small_nmnist(tmp_path / "n", rng, per=1)
    clean = [s.name for s in NMNIST(tmp_path / "n", frames=2, cache=False).samples]
    train = tmp_path / "n" / "Train"
    os.symlink(train, train / "3" / "up")  # Train/3/up -> Train: an endless walk when followed
    os.symlink(train / "5" / "self", train / "5" / "self")  # a link to itself
    with pytest.warns(UserWarning, match=r"Train/3/up: the same folder as .*Train.*skipped"):
        ds = NMNIST(tmp_path / "n", frames=2, cache=False)
    assert [s.name for s in ds.samples] == clean
    # a root that links to itself is simply not there
    os.symlink(tmp_path / "loop", tmp_path / "loop")
    with pytest.raises(FileNotFoundError, match="N-MNIST not found"):
        NMNIST(tmp_path / "loop")


def test_unreadable_folder_is_a_one_line_error(tmp_path, monkeypatch):
    small_nmnist(tmp_path / "n", np.random.default_rng(9), per=1)
    real = os.scandir

    def scandir(path):
        if str(path).endswith("/7"):
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.raises(OsbcError, match=r"Train/7: cannot list this folder \(Permission denied\)"):
        NMNIST(tmp_path / "n")


# ------------------------------------------------------------------------------ error types

def test_user_errors_are_osbc_errors(tmp_path):
    assert issubclass(EventFileError, OsbcError) and issubclass(OsbcError, ValueError)
    with pytest.raises(OsbcError, match="on_error"):
        read_nmnist(b"", on_error="ignore")
    with pytest.raises(OsbcError, match="frames must be a positive integer"):
        events_to_frames(make_events([0], [0], [0], [1]), (34, 34), 0)
    with pytest.raises(OsbcError, match="write_aedat20: field x must lie in"):
        write_aedat20(tmp_path / "x.aedat", make_events([200], [0], [0], [1]))
    from osbc.data import load_dataset, stratified_split
    with pytest.raises(OsbcError, match="unknown dataset"):
        load_dataset("mnist")
    with pytest.raises(OsbcError, match="cannot pick"):
        stratified_split([0, 1], 3)


# ------------------------------------------------------------------------------ random damage

@pytest.mark.parametrize("fmt", ["nmnist", "aedat31", "aedat20"])
def test_random_damage_never_crashes(tmp_path, fmt):
    """Seeded random cuts, byte flips and splices of valid files: every reader returns events or
    raises EventFileError (warns with on_error='warn'), never anything else."""
    rng = np.random.default_rng({"nmnist": 10, "aedat31": 11, "aedat20": 12}[fmt])
    size = 34 if fmt == "nmnist" else 128
    write = {"nmnist": write_nmnist, "aedat31": write_aedat31, "aedat20": write_aedat20}[fmt]
    read = {"nmnist": read_nmnist, "aedat31": read_aedat31, "aedat20": read_aedat20}[fmt]
    write(tmp_path / "f", rand_events(rng, 300, size))
    good = (tmp_path / "f").read_bytes()
    for trial in range(300):
        b = bytearray(good)
        kind = trial % 3
        if kind == 0:
            b = b[: int(rng.integers(0, len(b)))]
        elif kind == 1:
            for pos in rng.integers(0, len(b), int(rng.integers(1, 20))):
                b[pos] = int(rng.integers(0, 256))
        else:
            a, c = sorted(rng.integers(0, len(b), 2))
            b = b[:a] + bytes(rng.integers(0, 256, int(rng.integers(0, 64)), dtype=np.uint8)) + b[c:]
        data = bytes(b)
        try:
            ev = read(data, sensor_size=(size, size))
            assert ev.dtype.names == ("x", "y", "t", "p")
        except EventFileError:
            pass
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", EventFileWarning)
            ev = read(data, sensor_size=(size, size), on_error="warn")
        assert ev.size == 0 or (ev["x"].max() < size and ev["y"].max() < size)
