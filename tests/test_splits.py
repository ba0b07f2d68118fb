"""osbc.data.splits: data sets in memory, calibration tensors and calibration / evaluation splits,
checked against direct indexing of the data set and osbc.data.calibration_split."""

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

import osbc
from osbc.data import Splits, TensorSet, calibration_inputs, calibration_split, calibration_tensor, in_memory, materialize
from osbc.errors import OsbcError

from helpers import MLP


class Toy(Dataset):
    """n samples [T, 2, 4, 4] with labels 0..classes-1 (class k: k*n/classes samples in a row)."""

    def __init__(self, n=60, classes=3, T=3):
        g = torch.Generator().manual_seed(1)
        self.X = (torch.rand(n, T, 2, 4, 4, generator=g) < 0.3).float()
        self.targets = [i * classes // n for i in range(n)]
        self.num_classes = classes

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        return self.X[i], self.targets[i]


def stacked(ds, indices=None):
    idx = range(len(ds)) if indices is None else indices
    return torch.stack([ds[i][0] for i in idx]), torch.tensor([ds[i][1] for i in idx])


def test_tensor_set_indexes_like_the_data_set():
    ds = Toy()
    ts = in_memory(ds)
    assert isinstance(ts, TensorSet) and len(ts) == len(ds) and ts.num_classes == 3
    assert ts.targets == ds.targets
    for i in (0, 17, 59):
        x, y = ts[i]
        assert torch.equal(x, ds[i][0]) and y == ds[i][1] and isinstance(y, int)
    with pytest.raises(OsbcError, match="one label per sample"):
        TensorSet(torch.zeros(3, 2), torch.zeros(2, dtype=torch.long), 2)


def test_materialize_small_and_large():
    ds = Toy()
    X, y = materialize(ds)
    Xs, ys = stacked(ds)
    assert torch.equal(X, Xs) and torch.equal(y, ys) and X.dtype == torch.float32 and y.dtype == torch.long
    one = ds[0][0].numel() * 4
    assert materialize(ds, limit_bytes=len(ds) * one - 1) is ds   # over the limit: stays lazy
    assert isinstance(materialize(ds, limit_bytes=len(ds) * one), tuple)
    ts = in_memory(ds)
    assert materialize(ts)[0] is ts.X  # already in memory: no copy
    with pytest.raises(OsbcError, match="empty"):
        materialize(Toy(n=0, classes=1))


def test_calibration_tensor_is_the_stratified_draw():
    ds = Toy()
    X = calibration_tensor(ds, 12, seed=3)
    calib, _ = calibration_split(ds, 12, 3)
    assert torch.equal(X, stacked(ds, calib.indices)[0])
    assert X.shape == (12, 3, 2, 4, 4)
    assert sorted(ds.targets[i] for i in calib.indices) == [0] * 4 + [1] * 4 + [2] * 4  # every class in proportion
    assert torch.equal(calibration_tensor(ds, 12, seed=3), X)
    assert not torch.equal(calibration_tensor(ds, 12, seed=4), X)


def test_calibration_inputs_tensor_or_loader_and_the_rest():
    ds = Toy()
    X, rest = calibration_inputs(ds, 12, seed=0)
    calib, _ = calibration_split(ds, 12, 0)
    assert torch.equal(X, stacked(ds, calib.indices)[0])
    assert sorted(rest.indices + calib.indices) == list(range(len(ds))) and not set(rest.indices) & set(calib.indices)
    loader, _ = calibration_inputs(ds, 12, seed=0, batch_size=5, limit_bytes=0)
    assert isinstance(loader, DataLoader)
    assert torch.equal(torch.cat([x for x, _ in loader]), X)
    for bad in (0, 60, 61):
        with pytest.raises(OsbcError, match="calibration samples"):
            calibration_inputs(ds, bad, seed=0)


def test_splits_train_source_shares_the_test_set():
    train, test = Toy(), Toy(n=30)
    sp = Splits(train, test, 9, source="train")
    assert sp.calibration_source is train
    c0, e0, shared0 = sp.draw(0)
    c1, e1, shared1 = sp.draw(1)
    assert shared0 and shared1 and e0 is e1                 # evaluated on the whole test set, held once
    assert torch.equal(e0[0], stacked(test)[0])
    assert torch.equal(c0, calibration_tensor(train, 9, 0)) and not torch.equal(c0, c1)
    assert Splits(train, None, 9).draw(0)[1] is None        # no evaluation asked for


def test_splits_test_source_evaluates_on_the_rest():
    test = Toy(n=30)
    sp = Splits(None, test, 9, source="test")
    calib, (X, y), shared = sp.draw(2)
    picked, rest = calibration_split(test, 9, 2)
    assert not shared and len(y) == 30 - 9
    assert torch.equal(calib, stacked(test, picked.indices)[0])
    assert torch.equal(X, stacked(test, rest.indices)[0])
    with pytest.raises(OsbcError, match="needs the test data set"):
        Splits(Toy(), None, 9, source="test")
    with pytest.raises(OsbcError, match="'train' or 'test'"):
        Splits(Toy(), Toy(), 9, source="val")


def test_calibration_tensor_feeds_prune_directly():
    """What the README quickstart does: no hand-built calibration tensors."""
    torch.manual_seed(0)
    ds = Toy(n=60, T=4)
    model = MLP(d_in=32, hidden=16, out=3)
    X = calibration_tensor(ds, 24, seed=0)
    res = osbc.prune(model, X, sparsity=0.5, method="osbc", solver="fast", verbose=False)
    w = torch.cat([res.model.fc1.weight.flatten(), res.model.fc2.weight.flatten()])
    assert float((w == 0).float().mean()) == pytest.approx(0.5, abs=0.01)
    # the same tensor given as a TensorSet's inputs compresses identically
    res2 = osbc.prune(model, in_memory(calibration_split(ds, 24, 0)[0]).X, sparsity=0.5, method="osbc",
                      solver="fast", verbose=False)
    assert torch.equal(res.model.fc1.weight, res2.model.fc1.weight)
