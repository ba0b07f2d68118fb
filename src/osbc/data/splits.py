"""Data sets held in memory and the calibration / evaluation splits of one-shot compression.

>>> from osbc.data import load_dataset, calibration_tensor
>>> train = load_dataset("digits", train=True, frames=10)
>>> X = calibration_tensor(train, 256, seed=0)          # [256, 10, 2, 34, 34], every class in proportion
>>> res = osbc.prune(model, X, sparsity=0.97)

A compression pass reads its calibration inputs several times (once per layer and Hessian), so a
small set is worth holding as one tensor; a set too large for that stays a lazy data set.
"""

from __future__ import annotations

from typing import Union

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from ..errors import OsbcError
from .subsets import LabeledSubset, calibration_split

__all__ = ["TensorSet", "in_memory", "materialize", "calibration_inputs", "calibration_tensor", "Splits"]

#: a data set as (inputs [N, T, ...], labels [N]) tensors, or the data set itself when too large
Materialized = Union[tuple[Tensor, Tensor], Dataset]

#: above this many bytes of float32 inputs, :func:`materialize` leaves a data set lazy
EVAL_LIMIT_BYTES = 2e9
#: the same limit for calibration inputs, which live next to the model's activations
CALIB_LIMIT_BYTES = 1e9


class TensorSet(Dataset):
    """A labelled data set held in memory: ``X`` [N, T, ...] float32, ``y`` [N] int64.

    Indexing is a tensor lookup (fast repeated passes), and it keeps what osbc reads from data sets:
    ``targets`` (a list of ints, for stratified splits) and ``num_classes``."""

    def __init__(self, X: Tensor, y: Tensor, num_classes: int):
        if len(X) != len(y):
            raise OsbcError(f"TensorSet: {len(X)} inputs but {len(y)} labels; give one label per sample")
        self.X, self.y = X, y
        self.targets: list[int] = y.tolist()
        self.num_classes = int(num_classes)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        return self.X[i], int(self.y[i])


def in_memory(dataset: Dataset) -> TensorSet:
    """All of ``dataset`` as a :class:`TensorSet` (``num_classes`` from the data set, else the
    largest label + 1), whatever its size."""
    X, y = materialize(dataset, float("inf"))
    nc = getattr(dataset, "num_classes", None) or int(y.max()) + 1
    return TensorSet(X, y, int(nc))


def materialize(dataset: Dataset, limit_bytes: float = EVAL_LIMIT_BYTES) -> Materialized:
    """``dataset`` as tensors ``(X [N, T, ...], y [N])`` when its inputs fit in ``limit_bytes`` of
    float32, else ``dataset`` itself. Both forms are accepted by :func:`osbc.train`,
    :func:`osbc.evaluate` and (the inputs) :func:`osbc.prune` / :func:`osbc.quantize`."""
    if isinstance(dataset, TensorSet):
        return dataset.X, dataset.y
    n = len(dataset)
    if n == 0:
        raise OsbcError("the data set is empty; check its root folder and split")
    x0, _ = dataset[0]
    if n * x0.numel() * 4 > limit_bytes:
        return dataset
    X = torch.empty((n, *x0.shape), dtype=torch.float32)
    y = torch.empty(n, dtype=torch.long)
    for i in range(n):
        xi, yi = dataset[i]
        X[i] = torch.as_tensor(xi)
        y[i] = int(yi)
    return X, y


def calibration_inputs(dataset: Dataset, n: int, seed: int = 0, batch_size: int = 64,
                       limit_bytes: float = CALIB_LIMIT_BYTES) -> tuple[Tensor | DataLoader, LabeledSubset]:
    """``n`` stratified samples of ``dataset`` (every class in proportion, drawn with ``seed``):
    returns (calibration inputs, the other samples). The inputs are a tensor [n, T, ...] when they
    fit in ``limit_bytes``, else a DataLoader of (x, y) batches of ``batch_size``."""
    if not 1 <= n < len(dataset):
        raise OsbcError(f"{n} calibration samples requested from a data set of {len(dataset)}; "
                        f"ask for 1 to {len(dataset) - 1}")
    calib, rest = calibration_split(dataset, n, seed)
    m = materialize(calib, limit_bytes)
    if isinstance(m, tuple):
        return m[0], rest
    return DataLoader(calib, batch_size=batch_size, shuffle=False), rest


def calibration_tensor(dataset: Dataset, n: int, seed: int = 0) -> Tensor:
    """``n`` stratified samples of ``dataset`` drawn with ``seed``, stacked as one tensor
    [n, T, ...] to pass to :func:`osbc.prune` / :func:`osbc.quantize` (the inputs only)."""
    X, _ = materialize(calibration_split(dataset, n, seed)[0], float("inf"))
    return X


class Splits:
    """Calibration and evaluation data for a series of seeds.

    ``source="train"``: calibrate on ``n`` samples of ``train``, evaluate on all of ``test`` (held
    in memory once, shared by every seed). ``source="test"``: calibrate on ``n`` samples of
    ``test`` and evaluate on the rest of it (the paper's N-MNIST quantization protocol), so the
    evaluation set changes with the seed. ``test`` may be None with ``source="train"`` (no
    evaluation)."""

    def __init__(self, train: Dataset | None, test: Dataset | None, n: int, batch_size: int = 64,
                 source: str = "train"):
        if source not in ("train", "test"):
            raise OsbcError(f"Splits: source must be 'train' or 'test', got {source!r}")
        if (train if source == "train" else test) is None:
            raise OsbcError(f"Splits: source={source!r} needs the {source} data set")
        self.train, self.test, self.n, self.batch_size, self.source = train, test, n, batch_size, source
        self._test: Materialized | None = None

    @property
    def calibration_source(self) -> Dataset:
        """The data set the calibration samples come from."""
        return self.train if self.source == "train" else self.test

    def draw(self, seed: int) -> tuple[Tensor | DataLoader, Materialized | None, bool]:
        """(calibration inputs, evaluation data or None, whether the evaluation data is the same
        for every seed)."""
        if self.source == "test":
            calib, rest = calibration_inputs(self.test, self.n, seed, self.batch_size)
            return calib, materialize(rest), False
        calib, _ = calibration_inputs(self.train, self.n, seed, self.batch_size)
        if self.test is None:
            return calib, None, True
        if self._test is None:
            self._test = materialize(self.test)
        return calib, self._test, True
