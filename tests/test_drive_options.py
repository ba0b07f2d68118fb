"""The driving options reach osbc.prune / osbc.quantize: sample cap, time-first data, static frames."""

import torch
from torch import nn

import osbc
import osbc.drive
from osbc import snn
from osbc.errors import OsbcError

import pytest


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(2), nn.Linear(20, 16), snn.LIF(), nn.Linear(16, 4), snn.LIF())


def _spikes(n, T=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, T, 20, generator=g) < 0.3).float()


def test_calib_samples_caps_what_is_read():
    X = _spikes(40)
    capped = osbc.prune(_mlp(), X, 0.5, calib_samples=13, verbose=False)
    first = osbc.prune(_mlp(), X[:13], 0.5, verbose=False)
    assert capped.report.settings["calib_samples"] == 13
    for a, b in zip(capped.model.parameters(), first.model.parameters()):
        assert torch.equal(a, b)


def test_time_first_data_is_read_as_such():
    X = _spikes(24)
    loader_tf = [(X[i:i + 8].transpose(0, 1), torch.zeros(8, dtype=torch.long)) for i in range(0, 24, 8)]
    with pytest.raises(OsbcError, match="time_first"):
        osbc.prune(_mlp(), loader_tf, 0.5, verbose=False)
    a = osbc.prune(_mlp(), loader_tf, 0.5, time_first=True, verbose=False)
    b = osbc.prune(_mlp(), X, 0.5, verbose=False)
    assert a.report.settings["calib_samples"] == 24
    for p, q in zip(a.model.parameters(), b.model.parameters()):
        assert torch.equal(p, q)


def test_static_frames_repeat_over_time_steps():
    X = _spikes(16)[:, 0]                      # [N, 20]: no time axis
    a = osbc.quantize(_mlp(), X, 4, time_steps=5, verbose=False)
    b = osbc.quantize(_mlp(), X[:, None].expand(-1, 5, -1).contiguous(), 4, verbose=False)
    for p, q in zip(a.model.parameters(), b.model.parameters()):
        assert torch.equal(p, q)


def test_calibration_from_a_dataset_or_a_labelled_pair():
    """One batching serves training and calibration: a Dataset of (x [T, ...], y) samples and an
    (X, y) pair are read like the tensor X."""
    X = _spikes(20)
    y = torch.arange(20) % 4
    ref = list(osbc.drive.batches(X, 8))
    for data in (torch.utils.data.TensorDataset(X, y), (X, y)):
        got = list(osbc.drive.batches(data, 8))
        assert [g.shape for g in got] == [r.shape for r in ref]
        assert all(torch.equal(g, r) for g, r in zip(got, ref))
