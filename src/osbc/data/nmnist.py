"""N-MNIST (Orchard et al. 2015), read from ``Train.zip``/``Test.zip`` or their extracted folders."""

from __future__ import annotations

import numpy as np

from .archive import is_junk, natural_key
from .base import EventDataset, Sample
from .readers import read_nmnist

__all__ = ["NMNIST"]

_DIGITS = frozenset("0123456789")  # str.isdigit also takes other scripts' digits ('٣' is 3)


def _nmnist_label(name: str) -> int | None:
    """The digit of a '.../<digit>/<id>.bin' member, else None."""
    parts = name.rsplit("/", 2)
    if len(parts) >= 2 and parts[-2] in _DIGITS and parts[-1].lower().endswith(".bin"):
        return int(parts[-2])
    return None


class NMNIST(EventDataset):
    """N-MNIST (Orchard et al. 2015): 34x34, 10 classes, 60000 train / 10000 test.

    ``root`` holds ``Train.zip`` and ``Test.zip`` as downloaded, or their extracted ``Train/`` and
    ``Test/`` folders (``<digit>/<id>.bin``, digit an ASCII ``0``-``9``). Frames are not cached
    unless ``cache`` asks for it.
    """

    name = "N-MNIST"
    cache_by_default = False
    sensor_size = (34, 34)
    classes = tuple(str(d) for d in range(10))
    download_hint = "download Train.zip and Test.zip (N-MNIST, Orchard et al. 2015) and put them, " \
                    "or their extracted Train/ and Test/ folders,"

    def _index(self) -> list[Sample]:
        split = "Train" if self.train else "Test"
        for cand in (self.root / split, self.root / f"{split}.zip"):
            if cand.exists():
                src = self._add_source(cand)
                break
        else:
            raise self._missing(f"no {split}/ folder or {split}.zip")
        source = self.sources[src]
        samples = []
        for name, size in source.entries().items():
            label = _nmnist_label(name)
            if label is not None and not is_junk(name):
                samples.append(Sample(src, name, label, None, size))
        if not samples:
            raise self._missing(f"{source.path} holds no <digit>/<id>.bin files")
        samples.sort(key=lambda s: (s.label, natural_key(s.name)))
        return samples

    def _decode(self, data: bytes, where: str) -> np.ndarray:
        return read_nmnist(data, name=where, sensor_size=self.sensor_size, on_error=self.on_error)
