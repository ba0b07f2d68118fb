"""CIFAR10-DVS (Li et al. 2017), read from the ten class archives or their extracted folders."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import OsbcError
from .archive import is_junk, natural_key
from .base import EventDataset, Sample
from .frames import SplitBy
from .readers import OnError, read_aedat20
from .subsets import stratified_split

__all__ = ["CIFAR10DVS"]


class CIFAR10DVS(EventDataset):
    """CIFAR10-DVS (Li et al. 2017): 128x128, 10 classes x 1000 recordings, no official split.

    ``root`` holds the ten archives ``airplane.zip`` ... ``truck.zip`` as downloaded, or their
    extracted ``<class>/`` folders. The split takes ``train_fraction`` (0.9) of every class:
    a seeded random draw (``seed``), or the first files in natural order with ``seed=None``
    (spikingjelly's ``random_split=False``). Events use the published coordinate mapping.
    """

    name = "CIFAR10-DVS"
    sensor_size = (128, 128)
    classes = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
    download_hint = ("download airplane.zip, automobile.zip, bird.zip, cat.zip, deer.zip, dog.zip, "
                     "frog.zip, horse.zip, ship.zip and truck.zip (CIFAR10-DVS, Li et al. 2017) and put "
                     "them, or their extracted <class>/ folders,")

    def __init__(self, root: str | os.PathLike | None, train: bool = True, frames: int | None = 20,
                 split_by: SplitBy = "time", *, downsample: int = 1, train_fraction: float = 0.9,
                 seed: int | None = 0, cache: bool | str | os.PathLike | None = None,
                 on_error: OnError = "raise", transform: Callable | None = None,
                 target_transform: Callable | None = None):
        if not 0.0 < train_fraction < 1.0:
            raise OsbcError(f"train_fraction must lie strictly between 0 and 1, got {train_fraction}")
        self.train_fraction, self.seed = train_fraction, seed
        super().__init__(root, train, frames, split_by, downsample=downsample, cache=cache,
                         on_error=on_error, transform=transform, target_transform=target_transform)

    def _index(self) -> list[Sample]:
        found: dict[int, Path] = {}
        missing = []
        for c, cls in enumerate(self.classes):
            for cand in (self.root / cls, self.root / f"{cls}.zip"):
                if cand.exists():
                    found[c] = cand
                    break
            else:
                missing.append(f"{cls}.zip")
        if missing:
            raise self._missing("missing " + ", ".join(missing))
        everything: list[Sample] = []
        for c, path in found.items():
            src = self._add_source(path)
            source = self.sources[src]
            files = sorted(((n, s) for n, s in source.entries().items()
                            if n.lower().endswith(".aedat") and not is_junk(n)),
                           key=lambda ns: natural_key(ns[0]))
            if not files:
                raise self._missing(f"{path} holds no .aedat files")
            everything += [Sample(src, n, c, None, s) for n, s in files]
        train_idx, test_idx = stratified_split([s.label for s in everything], self.train_fraction, self.seed)
        return [everything[i] for i in (train_idx if self.train else test_idx)]

    def _decode(self, data: bytes, where: str) -> np.ndarray:
        return read_aedat20(data, name=where, sensor_size=self.sensor_size, on_error=self.on_error)
