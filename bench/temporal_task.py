"""A synthetic event task whose classes differ only in spike timing, shaped like N-MNIST frames.

Every class fires the same ``pixels`` inputs of a [2, 34, 34] sensor, each about once per sample;
what tells the classes apart is the time step at which each input fires. A class is a template:
for every input of the shared pool, a preferred step drawn uniformly from [0, T). A sample of class
c fires each pool input once at its preferred step plus Gaussian jitter (``jitter`` steps, rounded
and clipped into [0, T), so no spike is lost at the edges and the counts carry no class), deletes
each such spike with probability ``deletion``, and adds background spikes at ``noise`` per input and
step over the whole sensor. Summed over time, every class looks the same (a classifier of spike
counts is at chance); a network must detect coincidences, so its neurons' membrane dynamics carry
the task, which is the case the membrane-kernel objective of osbc is made for.

The noise defaults were tuned, on the validation share of the training split only, so that
``nmnist_mlp`` trained as in ``bench_accuracy.py`` (10 epochs) is good but not perfect: 92%
validation accuracy, 89.9% on the test split (seed 0). With less noise it reaches 100%; with more,
training stalls at chance.

    >>> from temporal_task import make_task
    >>> train, test = make_task(seed=0)     # TensorSets: X [N, T, 2, 34, 34] uint8 spikes, y [N]

Seeded and deterministic: the templates, the training and the test samples come from three
independent streams of one seed, so the splits are disjoint draws of the same task, and changing
the number of samples of one split does not change the other.
"""
from __future__ import annotations

import numpy as np
import torch

from osbc.data import TensorSet
from osbc.errors import OsbcError

SENSOR = (2, 34, 34)
DEFAULTS = dict(classes=10, steps=20, pixels=300, jitter=3.0, deletion=0.4, noise=0.02)


def templates(seed: int = 0, classes: int = 10, steps: int = 20, pixels: int = 300) -> tuple[np.ndarray, np.ndarray]:
    """(pool [pixels] flat input indices shared by all classes, preferred step [classes, pixels])."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0]))
    pool = np.sort(rng.choice(int(np.prod(SENSOR)), size=pixels, replace=False))
    return pool, rng.integers(0, steps, size=(classes, pixels))


def sample(n: int, rng: np.random.Generator, pool: np.ndarray, preferred: np.ndarray, steps: int,
           jitter: float, deletion: float, noise: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` samples, every class ``n / classes`` times (``n`` a multiple of the class count) in a
    random order: (X [n, steps, 2, 34, 34] uint8 0/1, y [n] int64)."""
    classes, pixels = preferred.shape
    d = int(np.prod(SENSOR))
    y = rng.permutation(np.arange(n) % classes)
    X = np.zeros((n, steps, d), np.uint8)
    t = np.clip(np.rint(preferred[y] + jitter * rng.standard_normal((n, pixels))), 0, steps - 1).astype(np.int64)
    keep = rng.random((n, pixels)) >= deletion
    rows = np.broadcast_to(np.arange(n)[:, None], (n, pixels))
    cols = np.broadcast_to(pool[None, :], (n, pixels))
    X[rows[keep], t[keep], cols[keep]] = 1
    # background: a binomial count of spikes at uniformly drawn (sample, step, input) positions,
    # not one uniform draw per entry (n T d of them would take seconds and gigabytes)
    k = rng.binomial(n * steps * d, noise)
    X.reshape(-1)[rng.integers(0, n * steps * d, size=k)] = 1
    return torch.from_numpy(X.reshape(n, steps, *SENSOR)), torch.from_numpy(y.astype(np.int64))


def make_task(seed: int = 0, train: int = 3000, test: int = 1000, *, classes: int = DEFAULTS["classes"],
              steps: int = DEFAULTS["steps"], pixels: int = DEFAULTS["pixels"], jitter: float = DEFAULTS["jitter"],
              deletion: float = DEFAULTS["deletion"], noise: float = DEFAULTS["noise"]) -> tuple[TensorSet, TensorSet]:
    """(train, test) :class:`osbc.data.TensorSet` of the task; ``train`` and ``test`` are sample
    counts, each a multiple of ``classes`` (every class equally often)."""
    for name, v in (("train", train), ("test", test)):
        if v < classes or v % classes:
            raise OsbcError(f"make_task: {name}={v} must be a positive multiple of classes={classes}")
    if not 0 < pixels <= int(np.prod(SENSOR)):
        raise OsbcError(f"make_task: pixels={pixels} must be in 1..{int(np.prod(SENSOR))}")
    if steps < 1 or jitter < 0 or not 0 <= deletion < 1 or not 0 <= noise < 1:
        raise OsbcError("make_task: need steps >= 1, jitter >= 0, deletion and noise in [0, 1)")
    pool, preferred = templates(seed, classes, steps, pixels)
    out = []
    for stream, n in ((1, train), (2, test)):
        rng = np.random.default_rng(np.random.SeedSequence([seed, stream]))
        X, y = sample(n, rng, pool, preferred, steps, jitter, deletion, noise)
        out.append(TensorSet(X, y, classes))
    return out[0], out[1]
