"""Stratified subsets: every class in proportion, by a seeded draw or in order."""

from __future__ import annotations

from typing import Sequence

import numpy as np
from torch.utils.data import Dataset, Subset

from ..errors import OsbcError

__all__ = ["stratified_split", "LabeledSubset", "calibration_split"]


def stratified_split(labels: Sequence[int], n: int | float, seed: int | None = 0
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Pick ``n`` indices (or the fraction ``n`` if a float in (0, 1)) with every class in
    proportion (largest remainders); returns (picked, rest), each sorted.

    ``seed=None`` picks the first indices of each class instead of a random draw.
    """
    labels = np.asarray(labels)
    total = labels.size
    if isinstance(n, (float, np.floating)) and not isinstance(n, bool):
        if not 0.0 < n < 1.0:
            raise OsbcError(f"a fraction n must lie strictly between 0 and 1, got {n}")
        m = int(round(n * total))
    elif isinstance(n, (int, np.integer)) and not isinstance(n, bool):
        m = int(n)
    else:
        raise OsbcError(f"n must be a count (int) or a fraction (float), got {n!r}")
    if not 1 <= m <= total:
        raise OsbcError(f"cannot pick {m} of {total} samples: n must be between 1 and {total}")
    classes, counts = np.unique(labels, return_counts=True)
    quota = counts * m / total
    take = np.floor(quota).astype(np.int64)
    short = m - int(take.sum())
    if short:
        # largest fractional remainder first; ties to the larger class, then the lower label
        order = np.lexsort((classes, -counts, -(quota - take)))
        take[order[:short]] += 1
    rng = None if seed is None else np.random.default_rng(seed)
    picked = []
    for c, k in zip(classes, take):
        idx = np.flatnonzero(labels == c)
        if rng is not None:
            idx = rng.permutation(idx)
        picked.append(idx[:k])
    sel = np.sort(np.concatenate(picked)) if picked else np.zeros(0, np.int64)
    mask = np.ones(total, bool)
    mask[sel] = False
    return sel, np.flatnonzero(mask)


class LabeledSubset(Subset):
    """A Subset that keeps ``targets``, ``num_classes``, ``sensor_size`` and ``classes``."""

    def __init__(self, dataset: Dataset, indices: Sequence[int]):
        super().__init__(dataset, [int(i) for i in indices])
        base = _targets(dataset)
        self.targets: list[int] = [base[i] for i in self.indices]

    @property
    def labels(self) -> list[int]:
        return self.targets

    @property
    def num_classes(self) -> int:
        nc = getattr(self.dataset, "num_classes", None)
        return int(nc) if nc is not None else len(set(_targets(self.dataset)))

    @property
    def sensor_size(self) -> tuple[int, int] | None:
        return getattr(self.dataset, "sensor_size", None)

    @property
    def classes(self) -> tuple[str, ...] | None:
        return getattr(self.dataset, "classes", None)


def _targets(dataset: Dataset) -> list[int]:
    t = getattr(dataset, "targets", None)
    if t is not None:
        return [int(v) for v in (t.tolist() if hasattr(t, "tolist") else t)]
    return [int(dataset[i][1]) for i in range(len(dataset))]  # slow path: integrates every sample


def calibration_split(dataset: Dataset, n: int | float, seed: int | None = 0
                      ) -> tuple[LabeledSubset, LabeledSubset]:
    """Stratified (calibration, evaluation) subsets: ``n`` samples (or a fraction) for calibration,
    the rest for evaluation, every class in proportion (e.g. 1000 of N-MNIST's test set)."""
    picked, rest = stratified_split(_targets(dataset), n, seed)
    return LabeledSubset(dataset, picked), LabeledSubset(dataset, rest)
