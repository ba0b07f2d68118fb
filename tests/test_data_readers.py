"""Round trips and error handling of the event-file readers (osbc.data.readers)."""

from __future__ import annotations

import importlib.util
import struct

import numpy as np
import pytest

from osbc.data import (
    EVENT_DTYPE,
    EventFileError,
    EventFileWarning,
    make_events,
    read_aedat20,
    read_aedat31,
    read_nmnist,
    write_aedat20,
    write_aedat31,
    write_nmnist,
)


def random_events(n, w, h, t_max, seed=0, sort=True):
    rng = np.random.default_rng(seed)
    t = rng.integers(0, t_max, n)
    if sort:
        t = np.sort(t)
    return make_events(rng.integers(0, w, n), rng.integers(0, h, n), t, rng.integers(0, 2, n))


def assert_same(a, b):
    assert a.dtype == EVENT_DTYPE
    assert a.size == b.size
    for f in "xytp":
        np.testing.assert_array_equal(a[f], b[f], err_msg=f"field {f}")


# ------------------------------------------------------------------------------ N-MNIST

def test_nmnist_round_trip(tmp_path):
    ev = random_events(5000, 34, 34, 1 << 23)
    ev["t"][-1] = (1 << 23) - 1  # largest timestamp the format holds
    path = tmp_path / "00001.bin"
    write_nmnist(path, ev)
    assert path.stat().st_size == 5 * ev.size
    assert_same(read_nmnist(path), ev)
    assert_same(read_nmnist(path.read_bytes()), ev)  # bytes, as read from an archive


def test_nmnist_byte_layout(tmp_path):
    # x=3, y=7, ON, t = 0x12345 -> bytes 3, 7, 0x80 | 0x01, 0x23, 0x45
    raw = bytes([3, 7, 0x81, 0x23, 0x45, 33, 0, 0x00, 0x00, 0x09])
    ev = read_nmnist(raw)
    assert ev.tolist() == [(3, 7, 0x12345, 1), (33, 0, 9, 0)]


def test_nmnist_overflow_marker():
    # y = 240 marks a timestamp overflow: +2**13 us for every later event, marker dropped
    raw = bytes([1, 2, 0, 0, 5, 0, 240, 0, 0, 0, 4, 4, 0x80, 0, 7])
    ev = read_nmnist(raw)
    assert ev.tolist() == [(1, 2, 5, 0), (4, 4, 7 + 8192, 1)]


@pytest.mark.parametrize("cut", [1, 4, 7])
def test_nmnist_truncated(tmp_path, cut):
    ev = random_events(10, 34, 34, 1000)
    path = tmp_path / "x.bin"
    write_nmnist(path, ev)
    path.write_bytes(path.read_bytes()[:-cut])
    n_ok = (50 - cut) // 5
    with pytest.raises(EventFileError, match=rf"x\.bin: truncated .* at byte offset {5 * n_ok}") as e:
        read_nmnist(path)
    assert e.value.offset == 5 * n_ok and str(path) in str(e.value)
    with pytest.warns(EventFileWarning, match="truncated"):
        got = read_nmnist(path, on_error="warn")
    assert_same(got, ev[:n_ok])


def test_nmnist_empty_and_off_sensor(tmp_path):
    empty = tmp_path / "empty.bin"
    empty.write_bytes(b"")
    with pytest.raises(EventFileError, match=r"empty\.bin: empty file.*byte offset 0"):
        read_nmnist(empty)
    with pytest.warns(EventFileWarning):
        assert read_nmnist(empty, on_error="warn").size == 0
    # a corrupted byte puts the 3rd event at x = 200: refused with its offset
    bad = bytes([1, 1, 0, 0, 1] * 2 + [200, 1, 0, 0, 2] + [1, 1, 0, 0, 3])
    with pytest.raises(EventFileError, match=r"outside the 34x34 sensor.*byte offset 10"):
        read_nmnist(bad, name="Train/0/1.bin")
    assert read_nmnist(bad, sensor_size=None).size == 4  # N-Caltech101-sized files
    with pytest.raises(EventFileError, match="<bytes>: truncated"):
        read_nmnist(b"\x00" * 3)


def test_reader_argument_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_nmnist(tmp_path / "missing.bin")
    with pytest.raises(ValueError, match="is a folder"):
        read_nmnist(tmp_path)
    with pytest.raises(ValueError, match="on_error"):
        read_nmnist(b"", on_error="ignore")


def test_writers_validate(tmp_path):
    ev = random_events(4, 34, 34, 100)
    with pytest.raises(ValueError, match="fields x, y, t, p"):
        write_nmnist(tmp_path / "a.bin", np.zeros(3))
    big = ev.copy()
    big["t"][0] = 1 << 23
    with pytest.raises(ValueError, match="field t"):
        write_nmnist(tmp_path / "a.bin", big)
    with pytest.raises(ValueError, match="field x"):
        write_aedat20(tmp_path / "a.aedat", make_events([128], [0], [0], [0]))
    with pytest.raises(ValueError, match="field p"):
        write_aedat31(tmp_path / "a.aedat", make_events([1], [0], [0], [2]))
    with pytest.raises(ValueError, match="equally long"):
        make_events([1, 2], [0], [0], [0])
    assert not list(tmp_path.iterdir())  # nothing half-written


# ------------------------------------------------------------------------------ tonic cross-check

def _tonic_read_mnist_file():
    try:
        from tonic.io import read_mnist_file
        return read_mnist_file
    except ImportError:
        pass
    # tonic installed with --no-deps may miss dependencies of its dataset modules; its io module
    # itself needs only numpy, so load that file alone
    spec = importlib.util.find_spec("tonic")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("tonic is not installed")
    path = f"{list(spec.submodule_search_locations)[0]}/io.py"
    mod_spec = importlib.util.spec_from_file_location("_tonic_io_alone", path)
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    return mod.read_mnist_file


def test_nmnist_agrees_with_tonic(tmp_path):
    read_mnist_file = _tonic_read_mnist_file()
    dtype = np.dtype([("x", np.int64), ("y", np.int64), ("t", np.int64), ("p", np.int64)])
    plain = tmp_path / "plain.bin"
    write_nmnist(plain, random_events(3000, 34, 34, 310_000, seed=3))
    marked = tmp_path / "marked.bin"  # with two overflow markers spliced in
    raw = bytearray(plain.read_bytes())
    raw[500:500] = bytes([0, 240, 0, 0, 0])
    raw[5000:5000] = bytes([0, 240, 0, 0, 0])
    marked.write_bytes(bytes(raw))
    for path in (plain, marked):
        theirs = read_mnist_file(str(path), dtype=dtype)
        ours = read_nmnist(path)
        assert ours.size == theirs.size
        for f in "xytp":
            np.testing.assert_array_equal(ours[f], theirs[f], err_msg=f"{path.name}: {f}")


# ------------------------------------------------------------------------------ AEDAT 3.1

HEADER31 = b"#!AER-DAT3.1\r\n#Format: RAW\r\n#Source 1: DVS128\r\n#!END-HEADER\r\n"


def packet(etype, payload, n, size=8, overflow=0, capacity=None, number=None):
    cap = n if capacity is None else capacity
    return struct.pack("<hhiiiiii", etype, 1, size, 4, overflow, cap,
                       n if number is None else number, n) + payload


def test_aedat31_round_trip_with_overflow(tmp_path):
    ev = random_events(20_000, 128, 128, 1 << 31, seed=1)
    ev["t"][12_000:] += 1 << 31  # crosses one tsOverflow
    ev["t"][17_000:] += 5 << 31  # and jumps several
    path = tmp_path / "user01_fluorescent.aedat"
    write_aedat31(path, ev, events_per_packet=3000)
    got = read_aedat31(path)
    assert_same(got, ev)
    assert got["t"].max() > 6 << 31


def test_aedat31_bit_layout_and_skipping(tmp_path):
    # hand-made packets: x=5, y=7 ON valid at t=100; an invalid event; a frame packet (type 2);
    # then x=127, y=0 OFF with overflow 2
    words = struct.pack("<Ii", (5 << 17) | (7 << 2) | (1 << 1) | 1, 100)
    words += struct.pack("<Ii", (9 << 17) | (9 << 2) | 0, 150)  # valid bit clear: dropped
    other = packet(2, b"\xAB" * 40, 2, size=20)
    last = packet(1, struct.pack("<Ii", (127 << 17) | 1, 3), 1, overflow=2)
    # capacity larger than number: the unused room is skipped too
    spare = packet(1, struct.pack("<Ii", (1 << 17) | (2 << 2) | 3, 200) + b"\0" * 16, 1, capacity=3)
    path = tmp_path / "x.aedat"
    path.write_bytes(HEADER31 + packet(1, words, 2) + other + spare + last)
    got = read_aedat31(path)
    assert got.tolist() == [(5, 7, 100, 1), (1, 2, 200, 1), (127, 0, 3 | (2 << 31), 0)]


def test_aedat31_errors(tmp_path):
    path = tmp_path / "bad.aedat"
    ev = random_events(100, 128, 128, 10_000)
    write_aedat31(path, ev, events_per_packet=40)
    data = path.read_bytes()
    body = data.index(b"#!END-HEADER\r\n") + len(b"#!END-HEADER\r\n")
    # cut inside the second packet's events
    second = body + 28 + 40 * 8
    path.write_bytes(data[: second + 28 + 8 * 10 + 3])
    with pytest.raises(EventFileError, match=rf"bad\.aedat: truncated packet.*byte offset {second}"):
        read_aedat31(path)
    with pytest.warns(EventFileWarning):
        got = read_aedat31(path, on_error="warn")
    assert_same(got, ev[:50])  # the first packet and the whole events of the cut one
    # cut inside a packet header
    path.write_bytes(data[: body + 28 + 40 * 8 + 10])
    with pytest.raises(EventFileError, match=rf"truncated packet header.*offset {second}"):
        read_aedat31(path)
    # nonsense header fields
    path.write_bytes(data[:body] + packet(1, b"", 5, number=9, capacity=5))
    with pytest.raises(EventFileError, match=rf"malformed packet header.*offset {body}"):
        read_aedat31(path)
    # no END-HEADER, empty, header only, or an AEDAT 2.0 file
    path.write_bytes(b"#!AER-DAT3.1\r\n#Format: RAW\r\n")
    with pytest.raises(EventFileError, match="END-HEADER"):
        read_aedat31(path)
    with pytest.raises(EventFileError, match="empty file"):
        read_aedat31(b"", name="e.aedat")
    with pytest.raises(EventFileError, match="no event packets"):
        read_aedat31(HEADER31, name="h.aedat")
    with pytest.raises(EventFileError, match="use read_aedat20"):
        read_aedat31(b"#!AER-DAT2.0\r\n" + b"\0" * 16, name="c.aedat")
    # coordinates off the sensor when one is given
    path.write_bytes(HEADER31 + packet(1, struct.pack("<Ii", (300 << 17) | 1, 1), 1))
    with pytest.raises(EventFileError, match=rf"outside the 128x128 sensor.*offset {len(HEADER31) + 28}"):
        read_aedat31(path, sensor_size=(128, 128))


# ------------------------------------------------------------------------------ AEDAT 2.0

def test_aedat20_round_trip(tmp_path):
    ev = random_events(10_000, 128, 128, 1 << 32, seed=2)
    for remap in (True, False):
        path = tmp_path / f"cifar10_cat_{remap}.aedat"
        write_aedat20(path, ev, remap=remap)
        assert_same(read_aedat20(path, remap=remap), ev)


def test_aedat20_published_mapping():
    # raw address: y=10 (bits 8-14), x=3 (bits 1-7), p=1 (bit 0); big-endian address then time
    body = struct.pack(">II", (10 << 8) | (3 << 1) | 1, 77) + struct.pack(">II", 1 << 8, 78)
    data = b"#!AER-DAT2.0\r\n# comment\r\n" + body
    assert read_aedat20(data, remap=False).tolist() == [(3, 10, 77, 1), (0, 1, 78, 0)]
    # spikingjelly's mapping: x' = 127 - y, y' = 127 - x, p' = 1 - p
    assert read_aedat20(data).tolist() == [(117, 124, 77, 0), (126, 127, 78, 1)]


def test_aedat20_errors(tmp_path):
    path = tmp_path / "cifar10_dog_1.aedat"
    write_aedat20(path, random_events(20, 128, 128, 1000))
    data = path.read_bytes()
    path.write_bytes(data[:-5])
    start = len(data) - 20 * 8
    with pytest.raises(EventFileError, match=rf"cifar10_dog_1\.aedat: truncated.*offset {start + 19 * 8}"):
        read_aedat20(path)
    with pytest.warns(EventFileWarning):
        assert read_aedat20(path, on_error="warn").size == 19
    with pytest.raises(EventFileError, match="no events after the header"):
        read_aedat20(data[:start], name="h.aedat")
    with pytest.raises(EventFileError, match="empty file"):
        read_aedat20(b"", name="e.aedat")
    with pytest.raises(EventFileError, match="use read_aedat31"):
        read_aedat20(HEADER31 + b"\0" * 8, name="g.aedat")
    with pytest.raises(EventFileError, match="without end of line"):
        read_aedat20(b"#!AER-DAT2.0 no newline", name="n.aedat")
