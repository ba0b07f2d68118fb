"""Finding weight layer -> BN -> neuron chains by execution order."""

import pytest
import torch
import torch.nn.functional as F
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


def test_neuron_kernel_reaches_through_pooling():
    """Conv -> pool -> neuron: the conv gets the neuron's kernel (pools act per channel); a pool over
    a Linear's features mixes its rows, so that Linear gets the identity kernel."""
    for pool in (nn.MaxPool2d(2), nn.AvgPool2d(2)):
        tau = torch.tensor([2.0, 3.0, 4.0, 5.0]).reshape(4, 1, 1)  # per channel
        model = nn.Sequential(TB(nn.Conv2d(2, 4, 3, padding=1)), TB(nn.BatchNorm2d(4)), TB(pool), snn.LIF(tau))
        [t] = find_modules(model, first(spikes(2, 3, 2, 4, 4)))
        assert t.neuron is model[3] and t.bn is model[1].m
        expected = torch.stack([(1 / c) * (1 - 1 / c) ** torch.arange(5.0) for c in (2.0, 3.0, 4.0, 5.0)])
        torch.testing.assert_close(t.kernel.impulse(5), expected.double())
    lin = nn.Sequential(nn.Linear(6, 8), nn.MaxPool1d(2), snn.LIF())
    [t] = find_modules(lin, first(spikes(2, 3, 6)))
    assert t.kernel.is_identity


def test_snntorch_conv_maxpool_leaky_order():
    """snntorch's tutorial order: conv -> max pool -> Leaky, looping over time in forward."""
    st = pytest.importorskip("snntorch")

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 4, 3, padding=1)
            self.lif1 = st.Leaky(beta=torch.tensor([0.5, 0.6, 0.7, 0.8]).reshape(4, 1, 1))
            self.fc = nn.Linear(4 * 2 * 2, 3)
            self.lif2 = st.Leaky(beta=0.9)

        def forward(self, x):
            m1, m2, out = self.lif1.init_leaky(), self.lif2.init_leaky(), []
            for t in range(x.shape[0]):
                s1, m1 = self.lif1(F.max_pool2d(self.conv(x[t]), 2), m1)
                s2, m2 = self.lif2(self.fc(s1.flatten(1)), m2)
                out.append(s2)
            return torch.stack(out)

    ts = find_modules(Net(), first(spikes(3, 4, 2, 4, 4)))
    assert [(t.name, t.neuron_name, t.mode) for t in ts] == [("conv", "lif1", "loop"), ("fc", "lif2", "loop")]
    beta = torch.tensor([0.5, 0.6, 0.7, 0.8], dtype=torch.float64)
    torch.testing.assert_close(ts[0].kernel.impulse(4), beta[:, None] ** torch.arange(4.0, dtype=torch.float64))


class ResBlock(nn.Module):
    """A spiking ResNet block: the neuron follows ``out += shortcut``."""

    def __init__(self, c_in, c_out, downsample):
        super().__init__()
        self.conv1 = TB(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False))
        self.bn1 = TB(nn.BatchNorm2d(c_out))
        self.lif1 = snn.LIF(2.0)
        self.conv2 = TB(nn.Conv2d(c_out, c_out, 3, padding=1, bias=False))
        self.bn2 = TB(nn.BatchNorm2d(c_out))
        self.down = nn.Sequential(TB(nn.Conv2d(c_in, c_out, 1, bias=False)), TB(nn.BatchNorm2d(c_out))) \
            if downsample else None
        self.lif2 = snn.LIF(3.0)

    def forward(self, x):
        shortcut = x if self.down is None else self.down(x)  # computed before the main path
        out = self.bn2(self.conv2(self.lif1(self.bn1(self.conv1(x)))))
        out += shortcut
        return self.lif2(out)


def test_residual_add_gives_the_neuron_to_both_branches():
    model = nn.Sequential(ResBlock(2, 4, downsample=True), ResBlock(4, 4, downsample=False))
    ts = {t.name: t for t in find_modules(model, first(spikes(2, 3, 2, 4, 4)))}
    assert list(ts) == ["0.down.0.m", "0.conv1.m", "0.conv2.m", "1.conv1.m", "1.conv2.m"]
    for name, neuron, bn in [("0.down.0.m", "0.lif2", "0.down.1.m"), ("0.conv1.m", "0.lif1", "0.bn1.m"),
                             ("0.conv2.m", "0.lif2", "0.bn2.m"), ("1.conv1.m", "1.lif1", "1.bn1.m"),
                             ("1.conv2.m", "1.lif2", "1.bn2.m")]:
        t = ts[name]
        assert t.neuron_name == neuron and t.bn is model.get_submodule(bn)
        assert t.kernel.params["tau"] == (3.0 if neuron.endswith("lif2") else 2.0)


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
