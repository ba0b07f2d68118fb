"""Readers and writers for the event formats the datasets are published in.

Every reader returns a structured array with fields ``x, y, t, p`` (:data:`EVENT_DTYPE`), ``t`` in
microseconds and ``p`` 1 for ON (brighter), 0 for OFF.  Each parses the whole file with one
``np.frombuffer`` and bit operations, so a file costs a few passes over memory, not a Python loop
over events (AEDAT 3.1 loops over packets, a few thousand per recording at most).

A reader takes a path or the file's bytes (members of an archive are read without extracting them).
Problems in the bytes raise :class:`EventFileError` naming the file and byte offset; with
``on_error="warn"`` the reader instead warns (:class:`EventFileWarning`) and returns what could be
decoded before the problem (an empty array if nothing could).
"""

from __future__ import annotations

import os
import struct
import warnings
from typing import Callable, Literal, Union

import numpy as np

from ..atomic import atomic_write_bytes
from ..errors import OsbcError

__all__ = [
    "EVENT_DTYPE",
    "EventFileError",
    "EventFileWarning",
    "make_events",
    "read_nmnist",
    "write_nmnist",
    "encode_nmnist",
    "read_aedat31",
    "write_aedat31",
    "read_aedat20",
    "write_aedat20",
]

EVENT_DTYPE = np.dtype([("x", np.int16), ("y", np.int16), ("t", np.int64), ("p", np.int8)])

Source = Union[str, os.PathLike, bytes, bytearray, memoryview]
OnError = Literal["raise", "warn"]


class EventFileError(OsbcError):
    """A data file is empty, truncated or malformed; names the file and the byte offset."""

    def __init__(self, path: str, offset: int | None, problem: str):
        self.path, self.offset, self.problem = path, offset, problem
        where = f" at byte offset {offset}" if offset is not None else ""
        super().__init__(f"{path}: {problem}{where}")


class EventFileWarning(UserWarning):
    """Issued instead of :class:`EventFileError` when the caller asked for ``on_error="warn"``."""


def make_events(x, y, t, p) -> np.ndarray:
    """Build an event array from four equally long sequences."""
    x, y, t, p = (np.asarray(a) for a in (x, y, t, p))
    if not (x.shape == y.shape == t.shape == p.shape) or x.ndim != 1:
        raise OsbcError(f"make_events: x, y, t, p must be 1-D and equally long, got shapes "
                        f"{x.shape}, {y.shape}, {t.shape}, {p.shape}")
    ev = np.empty(x.size, EVENT_DTYPE)
    ev["x"], ev["y"], ev["t"], ev["p"] = x, y, t, p
    return ev


# --------------------------------------------------------------------------------------- helpers

def _load(source: Source, name: str | None) -> tuple[bytes | memoryview, str]:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return source, name or "<bytes>"
    path = os.fspath(source)
    try:
        with open(path, "rb") as f:
            return f.read(), name or path
    except IsADirectoryError:
        raise OsbcError(f"{path}: is a folder, expected an event file") from None


def _check_on_error(on_error: str) -> None:
    if on_error not in ("raise", "warn"):
        raise OsbcError(f"on_error must be 'raise' or 'warn', got {on_error!r}")


def _problem(name: str, offset: int | None, problem: str, on_error: OnError) -> None:
    """Raise, or warn and let the caller return what it decoded before the problem."""
    err = EventFileError(name, offset, problem)
    if on_error == "raise":
        raise err
    warnings.warn(f"{err}; using the {0 if offset is None else offset} bytes before it",
                  EventFileWarning, stacklevel=3)


def _as_events(events: np.ndarray, fmt: str) -> np.ndarray:
    names = getattr(getattr(events, "dtype", None), "names", None) or ()
    missing = {"x", "y", "t", "p"} - set(names)
    if missing:
        raise OsbcError(f"{fmt}: events need fields x, y, t, p (missing {sorted(missing)}); "
                        "build them with osbc.data.make_events")
    return events


def _checked_fields(events: np.ndarray, fmt: str, x_max: int, y_max: int, t_max: int
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """x, y, t, p of ``events`` as int64, each checked against the format's range (p in [0, 1])."""
    ev = _as_events(events, fmt)
    x, y, t, p = (np.asarray(ev[f]).astype(np.int64) for f in "xytp")
    for field, a, hi in (("x", x, x_max), ("y", y, y_max), ("t", t, t_max), ("p", p, 1)):
        if a.size and (a.min() < 0 or a.max() > hi):
            raise OsbcError(f"{fmt}: field {field} must lie in [0, {hi}] for this format, "
                            f"got [{a.min()}, {a.max()}]")
    return x, y, t, p


def _check_sensor(ev: np.ndarray, sensor_size: tuple[int, int] | None, name: str,
                  offset_of: Callable[[int], int], on_error: OnError) -> np.ndarray:
    """Refuse events off the sensor (or keep those before the first one); offset_of(i) is the
    byte offset of event i, computed only for the message."""
    if sensor_size is None or ev.size == 0:
        return ev
    h, w = sensor_size
    bad = (ev["x"] >= w) | (ev["y"] >= h) | (ev["x"] < 0) | (ev["y"] < 0)
    if bad.any():
        i = int(np.argmax(bad))
        _problem(name, int(offset_of(i)), f"event ({ev['x'][i]}, {ev['y'][i]}) lies outside the "
                 f"{h}x{w} sensor (corrupted file, or the wrong reader)", on_error)
        return ev[:i]
    return ev


# --------------------------------------------------------------------------------------- N-MNIST

_NMNIST_OVERFLOW_Y = 240  # y = 240 marks a timestamp overflow (ATIS tools); never a real pixel
_NMNIST_OVERFLOW_US = 1 << 13


def read_nmnist(source: Source, *, name: str | None = None,
                sensor_size: tuple[int, int] | None = (34, 34),
                on_error: OnError = "raise") -> np.ndarray:
    """Read an N-MNIST ``.bin`` file (5 bytes per event).

    byte0 = x, byte1 = y, bit 7 of byte2 = polarity, t = (byte2 & 0x7F) << 16 | byte3 << 8 | byte4.
    Events with y = 240 are timestamp-overflow markers of the ATIS tools: each adds 2**13 us to all
    later timestamps and is dropped (the published files have none; handled as tonic does).
    ``sensor_size`` (H, W) rejects coordinates off the sensor; None accepts any byte (N-Caltech101).
    """
    _check_on_error(on_error)
    buf, name = _load(source, name)
    raw = np.frombuffer(buf, np.uint8)
    if raw.size == 0:
        _problem(name, 0, "empty file, expected 5-byte N-MNIST events", on_error)
        return np.empty(0, EVENT_DTYPE)
    n = raw.size // 5
    if raw.size % 5:
        _problem(name, 5 * n, f"truncated N-MNIST file ({raw.size} bytes is not a multiple of 5; "
                 "re-extract or re-download it)", on_error)
    rec = raw[: 5 * n].reshape(n, 5)
    b2 = rec[:, 2]
    t = ((b2 & 0x7F).astype(np.int64) << 16) | (rec[:, 3].astype(np.int64) << 8) | rec[:, 4]
    marker = rec[:, 1] == _NMNIST_OVERFLOW_Y
    offset_of = lambda i: 5 * i  # noqa: E731
    if marker.any():
        t += _NMNIST_OVERFLOW_US * np.cumsum(marker)
        keep = ~marker
        rec, t, b2 = rec[keep], t[keep], b2[keep]
        offset_of = lambda i: 5 * int(np.flatnonzero(keep)[i])  # noqa: E731
    ev = np.empty(t.size, EVENT_DTYPE)
    ev["x"], ev["y"], ev["t"], ev["p"] = rec[:, 0], rec[:, 1], t, b2 >> 7
    return _check_sensor(ev, sensor_size, name, offset_of, on_error)


def write_nmnist(path: str | os.PathLike, events: np.ndarray) -> None:
    """Write events as an N-MNIST ``.bin`` file (x, y < 256 but y != 240, 0 <= t < 2**23 us)."""
    atomic_write_bytes(path, [encode_nmnist(events)])


def encode_nmnist(events: np.ndarray) -> bytes:
    """The bytes of an N-MNIST ``.bin`` file holding ``events`` (see :func:`write_nmnist`)."""
    x, y, t, p = _checked_fields(events, "write_nmnist", 255, 255, (1 << 23) - 1)
    if (y == _NMNIST_OVERFLOW_Y).any():
        raise OsbcError("write_nmnist: y = 240 is reserved for timestamp-overflow markers")
    rec = np.empty((x.size, 5), np.uint8)
    rec[:, 0], rec[:, 1] = x, y
    rec[:, 2] = (p << 7) | (t >> 16)
    rec[:, 3], rec[:, 4] = (t >> 8) & 0xFF, t & 0xFF
    return rec.tobytes()


# --------------------------------------------------------------------------------------- AEDAT 3.1

_AEDAT3_MAGIC = b"#!AER-DAT3"
_AEDAT3_END = b"#!END-HEADER"
_PACKET = struct.Struct("<hhiiiiii")  # type, source, size, tsOffset, tsOverflow, capacity, number, valid
_POLARITY = 1


def _aedat31_body_start(buf: bytes, name: str, on_error: OnError) -> int | None:
    if not bytes(buf[:len(_AEDAT3_MAGIC)]) == _AEDAT3_MAGIC:
        first = bytes(buf[:16]).split(b"\n")[0]
        hint = " (an AEDAT 2.0 file: use read_aedat20)" if first.startswith(b"#!AER-DAT2") else ""
        problem = "empty file" if len(buf) == 0 else f"not an AEDAT 3.x file{hint}, it starts with {first[:12]!r}"
        _problem(name, 0, problem, on_error)
        return None
    end = bytes(buf[:1 << 20]).find(_AEDAT3_END)
    nl = bytes(buf[end:end + 64]).find(b"\n") if end >= 0 else -1
    if end < 0 or nl < 0:
        _problem(name, 0, "AEDAT 3.1 header has no '#!END-HEADER' line (truncated header?)", on_error)
        return None
    return end + nl + 1


def read_aedat31(source: Source, *, name: str | None = None,
                 sensor_size: tuple[int, int] | None = None,
                 on_error: OnError = "raise") -> np.ndarray:
    """Read the polarity events of an AEDAT 3.1 file (DVS128 Gesture); other packet types are skipped.

    Packets: 28-byte little-endian header, then eventCapacity * eventSize bytes of which the first
    eventNumber events are used. Polarity events are uint32 data (bit 0 valid, bit 1 polarity,
    bits 2-16 y, bits 17-31 x) and int32 timestamp; t = timestamp | tsOverflow << 31.
    Events whose valid bit is clear are dropped.
    """
    _check_on_error(on_error)
    buf, name = _load(source, name)
    pos = _aedat31_body_start(buf, name, on_error)
    if pos is None:
        return np.empty(0, EVENT_DTYPE)
    size = len(buf)
    if pos == size:
        _problem(name, pos, "no event packets after the header", on_error)
        return np.empty(0, EVENT_DTYPE)
    raw = np.frombuffer(buf, np.uint8)
    chunks: list[np.ndarray] = []
    counts: list[int] = []
    overflows: list[int] = []
    offsets: list[int] = []
    sizes: list[int] = []
    while pos < size:
        if size - pos < _PACKET.size:
            _problem(name, pos, f"truncated packet header ({size - pos} of 28 bytes)", on_error)
            break
        etype, _src, esize, ts_off, ovf, cap, num, _valid = _PACKET.unpack_from(buf, pos)
        if esize <= 0 or cap < 0 or not 0 <= num <= cap or ovf < 0:
            _problem(name, pos, f"malformed packet header (type {etype}, eventSize {esize}, "
                     f"capacity {cap}, number {num}, overflow {ovf})", on_error)
            break
        body, end = pos + _PACKET.size, pos + _PACKET.size + cap * esize
        if end > size:
            _problem(name, pos, f"truncated packet: header announces {cap * esize} bytes of events, "
                     f"{size - body} remain", on_error)
            # whole events that did arrive are still usable
            num = min(num, (size - body) // esize)
            end = size
        if etype == _POLARITY and num:
            if esize < 8 or ts_off != 4:
                _problem(name, pos, f"polarity packet with eventSize {esize} and eventTSOffset "
                         f"{ts_off}, expected 8 and 4", on_error)
                break
            block = raw[body: body + num * esize]
            if esize != 8:
                block = block.reshape(num, esize)[:, :8].ravel()
            chunks.append(block)
            counts.append(num)
            overflows.append(ovf)
            offsets.append(body)
            sizes.append(esize)
        pos = end
    if not chunks:
        return np.empty(0, EVENT_DTYPE)
    words = np.concatenate(chunks).view("<u4").reshape(-1, 2)
    data = words[:, 0]
    ts = words[:, 1].astype(np.int64) & 0x7FFFFFFF
    counts_a = np.asarray(counts)
    ts |= np.repeat(np.asarray(overflows, np.int64), counts_a) << 31
    valid = (data & 1).astype(bool)
    ev = np.empty(data.size, EVENT_DTYPE)
    ev["x"] = (data >> 17) & 0x7FFF
    ev["y"] = (data >> 2) & 0x7FFF
    ev["t"] = ts
    ev["p"] = (data >> 1) & 1
    kept = None if valid.all() else np.flatnonzero(valid)
    if kept is not None:
        ev = ev[kept]

    def offset_of(i: int) -> int:
        k = i if kept is None else int(kept[i])
        j = int(np.searchsorted(np.cumsum(counts_a), k, side="right"))
        return offsets[j] + (k - int(counts_a[:j].sum())) * sizes[j]

    return _check_sensor(ev, sensor_size, name, offset_of, on_error)


def write_aedat31(path: str | os.PathLike, events: np.ndarray, *, events_per_packet: int = 4096,
                  source_id: int = 1) -> None:
    """Write events as an AEDAT 3.1 file of polarity packets (inverse of :func:`read_aedat31`).

    A packet holds one tsOverflow value, so a new packet starts wherever t // 2**31 changes.
    """
    if events_per_packet < 1:
        raise OsbcError(f"write_aedat31: events_per_packet must be >= 1, got {events_per_packet}")
    x, y, t, p = _checked_fields(events, "write_aedat31", 0x7FFF, 0x7FFF, (1 << 62) - 1)
    words = np.empty((x.size, 2), "<u4")
    words[:, 0] = (x << 17) | (y << 2) | (p << 1) | 1
    words[:, 1] = t & 0x7FFFFFFF
    epoch = t >> 31
    cuts = np.flatnonzero(np.diff(epoch)) + 1
    out = [b"#!AER-DAT3.1\r\n#Format: RAW\r\n#Source %d: DVS128\r\n" % source_id,
           b"#Written-By: osbc\r\n#!END-HEADER\r\n"]
    for lo, hi in zip(np.r_[0, cuts], np.r_[cuts, x.size]):
        for a in range(int(lo), int(hi), events_per_packet):
            b = min(a + events_per_packet, int(hi))
            n = b - a
            out.append(_PACKET.pack(_POLARITY, source_id, 8, 4, int(epoch[a]), n, n, n))
            out.append(words[a:b].tobytes())
    atomic_write_bytes(path, out)


# --------------------------------------------------------------------------------------- AEDAT 2.0

def _aedat20_body_start(buf: bytes, name: str, on_error: OnError) -> int | None:
    pos, size = 0, len(buf)
    while pos < size and buf[pos] == 0x23:  # '#': one more header line
        nl = bytes(buf[pos: pos + 4096]).find(b"\n")
        if nl < 0:
            _problem(name, pos, "AEDAT header line without end of line (truncated header?)", on_error)
            return None
        line = bytes(buf[pos: pos + nl])
        if pos == 0 and line.startswith(b"#!AER-DAT") and not line.startswith(b"#!AER-DAT2"):
            _problem(name, 0, f"not an AEDAT 2.0 file ({line.strip().decode(errors='replace')}"
                     f"{'; use read_aedat31' if line.startswith(b'#!AER-DAT3') else ''})", on_error)
            return None
        pos += nl + 1
    return pos


def read_aedat20(source: Source, *, name: str | None = None, remap: bool = True,
                 sensor_size: tuple[int, int] | None = None,
                 on_error: OnError = "raise") -> np.ndarray:
    """Read an AEDAT 2.0 file (CIFAR10-DVS): ``#`` header lines, then big-endian uint32 (address,
    timestamp) pairs; polarity = bit 0, x = bits 1-7, y = bits 8-14.

    ``remap=True`` applies the published CIFAR10-DVS mapping (spikingjelly's):
    x' = 127 - y, y' = 127 - x, p' = 1 - p, which puts the images upright with ON = brighter.
    """
    _check_on_error(on_error)
    buf, name = _load(source, name)
    pos = _aedat20_body_start(buf, name, on_error)
    if pos is None:
        return np.empty(0, EVENT_DTYPE)
    body = len(buf) - pos
    if body == 0:
        _problem(name, pos, "no events after the header" if pos else "empty file", on_error)
        return np.empty(0, EVENT_DTYPE)
    n = body // 8
    if body % 8:
        _problem(name, pos + 8 * n, f"truncated AEDAT 2.0 event ({body % 8} of 8 bytes)", on_error)
    words = np.frombuffer(buf, ">u4", count=2 * n, offset=pos).reshape(n, 2)
    addr = words[:, 0]
    raw_p = (addr & 1).astype(np.int8)
    raw_x = ((addr >> 1) & 0x7F).astype(np.int16)
    raw_y = ((addr >> 8) & 0x7F).astype(np.int16)
    ev = np.empty(n, EVENT_DTYPE)
    if remap:
        ev["x"], ev["y"], ev["p"] = 127 - raw_y, 127 - raw_x, 1 - raw_p
    else:
        ev["x"], ev["y"], ev["p"] = raw_x, raw_y, raw_p
    ev["t"] = words[:, 1]
    return _check_sensor(ev, sensor_size, name, lambda i: pos + 8 * i, on_error)


def write_aedat20(path: str | os.PathLike, events: np.ndarray, *, remap: bool = True) -> None:
    """Write events as an AEDAT 2.0 file (inverse of :func:`read_aedat20` with the same ``remap``)."""
    x, y, t, p = _checked_fields(events, "write_aedat20", 127, 127, (1 << 32) - 1)
    if remap:
        x, y, p = 127 - y, 127 - x, 1 - p
    words = np.empty((x.size, 2), ">u4")
    words[:, 0] = (y << 8) | (x << 1) | p
    words[:, 1] = t
    header = (b"#!AER-DAT2.0\r\n"
              b"# This is a raw AE data file - do not edit\r\n"
              b"# Data format is int32 address, int32 timestamp (8 bytes total), repeated for each event\r\n"
              b"# Timestamps tick is 1 us\r\n"
              b"# Written by osbc\r\n")
    atomic_write_bytes(path, [header, words.tobytes()])
