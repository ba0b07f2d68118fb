"""Finding weight layer -> BN -> neuron chains by execution order."""

import pytest
import torch
from torch import nn

from osbc import snn
from osbc.trace import batches, find_modules

from helpers import MLP, TB, ConvNet, LoopMLP, spikes


def first(calib):
    return next(batches(calib, 4))


def test_mlp_chain():
    ts = find_modules(MLP(d_in=20), first(spikes(4, 5, 20)))
    assert [(t.name, t.neuron_name, t.mode) for t in ts] == [("fc1", "lif1", "tb"), ("fc2", "lif2", "tb")]
    assert "LIF" in ts[0].describe_kernel()


def test_conv_bn_neuron_and_readout():
    ts = find_modules(ConvNet(size=8), first(spikes(4, 5, 2, 8, 8)))
    names = {t.name: t for t in ts}
    conv = names["conv.m"]
    assert conv.bn is not None and conv.neuron_name == "lif1" and conv.mode == "flat"
    assert names["fc"].neuron_name == "lif2"
    assert names["readout"].neuron is None and names["readout"].kernel.is_identity


def test_nested_modules_and_patterns():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Linear(10, 10, bias=False), nn.Dropout(0.1), snn.LIF())

        def forward(self, x):
            return self.body(x)

    model = nn.Sequential(Block(), Block(), nn.Linear(10, 3))
    x = first(spikes(3, 4, 10))
    assert [t.name for t in find_modules(model, x)] == ["0.body.0", "1.body.0", "2"]
    assert [t.name for t in find_modules(model, x, include="*.body.*")] == ["0.body.0", "1.body.0"]
    assert [t.name for t in find_modules(model, x, exclude=["2"])] == ["0.body.0", "1.body.0"]
    assert all(t.neuron is not None for t in find_modules(model, x, include="*.body.*"))


def test_loop_mode_detected():
    ts = find_modules(LoopMLP(d_in=12), first(spikes(4, 6, 12)))
    assert [t.mode for t in ts] == ["loop", "loop"]
    assert [t.neuron_name for t in ts] == ["lif1", "lif2"]


def test_pool_between_layer_and_neuron_means_identity():
    model = nn.Sequential(TB(nn.Conv2d(2, 4, 3, padding=1)), TB(nn.MaxPool2d(2)), snn.LIF())
    [t] = find_modules(model, first(spikes(2, 3, 2, 4, 4)))
    assert t.kernel.is_identity


def test_errors_are_clear():
    with pytest.raises(ValueError, match="rejected the input"):
        find_modules(MLP(d_in=20), first(spikes(2, 3, 21)))
    with pytest.raises(ValueError, match="nothing to compress"):
        find_modules(nn.Sequential(nn.Flatten(2), snn.LIF()), first(spikes(2, 3, 5)))
    with pytest.raises(ValueError, match="nothing to compress"):
        find_modules(MLP(d_in=20), first(spikes(2, 3, 20)), include="nope*")
    with pytest.raises(ValueError, match="NaN"):
        list(batches(torch.full((2, 3, 4), float("nan"))))
    with pytest.raises(ValueError, match=r"\[N, T"):
        list(batches(torch.zeros(3, 4)))


def test_find_modules_leaves_model_state_alone():
    m = MLP(d_in=20)
    m.train()
    sd = {k: v.clone() for k, v in m.state_dict().items()}
    find_modules(m, first(spikes(2, 3, 20)))
    assert m.training
    assert all(torch.equal(sd[k], v) for k, v in m.state_dict().items())
    assert m.lif1.v == 0.0
