"""DVS128 Gesture (Amir et al. 2017), read from ``DvsGesture.tar.gz`` or the extracted folder."""

from __future__ import annotations

import re

import numpy as np

from .archive import is_junk
from .base import EventDataset, Sample
from .readers import EventFileError, read_aedat31

__all__ = ["DVSGesture"]

_INT = re.compile(r"[+-]?[0-9]+")  # ASCII digits only: int() would also take '٣' as 3


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
        lists = sorted((n for n in entries if n.rsplit("/", 1)[-1] == list_name and not is_junk(n)), key=len)
        if not lists:
            raise self._missing(f"{source.path} has no {list_name}")
        prefix = lists[0][: -len(list_name)]
        trials = [ln.strip() for ln in source.read(lists[0]).decode("utf-8-sig", "replace").splitlines()]
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
    """Rows class,startTime_usec,endTime_usec (class 1-based) -> (label 0-based, start, end).

    A UTF-8 byte-order mark is dropped, and the first non-blank line is a header only when its
    first field is not a number: a file without a header keeps its first row."""
    rows = []
    header_allowed = True
    for k, line in enumerate(data.decode("utf-8-sig", "replace").splitlines(), 1):
        if not line.strip():
            continue
        parts = [p.strip() for p in line.split(",")]
        if header_allowed and not _INT.fullmatch(parts[0]):
            header_allowed = False
            continue
        header_allowed = False
        c = a = b = 0
        if len(parts) >= 3 and all(_INT.fullmatch(p) for p in parts[:3]):
            c, a, b = (int(p) for p in parts[:3])
        if not 1 <= c <= num_classes or b <= a:
            raise EventFileError(where, None, f"line {k} is not class(1-{num_classes}),"
                                 f"startTime_usec,endTime_usec with start < end: {line!r}")
        rows.append((c - 1, a, b))
    return rows
