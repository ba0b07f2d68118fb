"""osbc.evaluate on models written as spikingjelly, snntorch and norse tutorials write them: multi-step
convs over [T, B, C, H, W], tuple outputs ((spk, mem), (out, state)), neurons that return tuples.
Accuracy, firing rates and SynOps are checked against the model run by hand and fan-outs counted
by brute force."""

import pytest
import torch
from torch import nn

import osbc
from osbc.errors import OsbcError

T, N, CLASSES = 6, 10, 4


def _spikes(shape, p, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(shape, generator=g) < p).float()


def _labels(seed):
    return torch.randint(0, CLASSES, (N,), generator=torch.Generator().manual_seed(seed))


def _linear_fanout(w: torch.Tensor) -> torch.Tensor:
    """Per input: how many output neurons it drives through a nonzero weight (loop over entries)."""
    out = torch.zeros(w.shape[1], dtype=torch.float64)
    for o in range(w.shape[0]):
        for i in range(w.shape[1]):
            if w[o, i] != 0:
                out[i] += 1
    return out


def _conv2d_fanout(w: torch.Tensor, H: int, W: int, pad: int) -> torch.Tensor:
    """Per input pixel [C, H, W] of a stride-1 Conv2d: how many (output channel, output pixel) pairs it
    reaches through a nonzero weight, counting only output pixels inside the output map."""
    O, C, kh, kw = w.shape
    Ho, Wo = H + 2 * pad - kh + 1, W + 2 * pad - kw + 1
    out = torch.zeros(C, H, W, dtype=torch.float64)
    for c in range(C):
        for i in range(H):
            for j in range(W):
                for o in range(O):
                    for a in range(kh):
                        for b in range(kw):
                            oi, oj = i + pad - a, j + pad - b
                            if w[o, c, a, b] != 0 and 0 <= oi < Ho and 0 <= oj < Wo:
                                out[c, i, j] += 1
    return out


def _events(x: torch.Tensor, fanout: torch.Tensor) -> float:
    """Sum over every input event (any leading time / batch dims) of its count times its fan-out."""
    return (x.double() * fanout).sum().item()


def _check_rate(ev, name, spikes):
    assert spikes.sum() > 0, "test model too quiet to test firing rates"
    assert ev.firing_rates[name] == pytest.approx(spikes.float().mean().item(), rel=1e-6)


# ---- spikingjelly: multi-step convs over [T, B, C, H, W] ----------------------------------------------

def test_spikingjelly_multistep_conv():
    pytest.importorskip("spikingjelly")
    from spikingjelly.activation_based import functional, layer, neuron
    torch.manual_seed(0)
    C, H, O = 2, 5, 3
    net = nn.Sequential(layer.Conv2d(C, O, 3, padding=1, bias=False), neuron.LIFNode(tau=2.0),
                        layer.Flatten(), layer.Linear(O * H * H, CLASSES), neuron.LIFNode(tau=2.0))
    functional.set_step_mode(net, "m")
    with torch.no_grad():
        net[0].weight.abs_().mul_(2)
        net[0].weight[:, 0, 0, :] = 0     # pruned entries: some inputs drive fewer outputs
        net[0].weight[1] = 0
        net[3].weight.add_(0.02).mul_(10)
        net[3].weight[:, ::3] = 0
    x = _spikes((N, T, C, H, H), 0.4, 1)
    y = _labels(2)

    ev = osbc.evaluate(net, (x, y), batch_size=4)

    functional.reset_net(net)
    with torch.no_grad():
        xt = x.transpose(0, 1)                        # [T, N, C, H, W]
        s1 = net[1](net[0](xt))
        s2 = net[4](net[3](net[2](s1)))
    functional.reset_net(net)
    assert ev.accuracy == pytest.approx((s2.mean(0).argmax(-1) == y).float().mean().item())
    _check_rate(ev, "1", s1)
    _check_rate(ev, "4", s2)

    w0, w3 = net[0].weight.detach(), net[3].weight.detach()
    sparse = _events(xt, _conv2d_fanout(w0, H, H, 1)) + _events(s1.flatten(2), _linear_fanout(w3))
    dense = (_events(xt, _conv2d_fanout(torch.ones_like(w0), H, H, 1))
             + _events(s1.flatten(2), _linear_fanout(torch.ones_like(w3))))
    assert ev.synops == pytest.approx(sparse / N, rel=1e-6)
    assert ev.synops_dense == pytest.approx(dense / N, rel=1e-6)
    assert ev.synops < ev.synops_dense


# ---- snntorch: a loop over time returning (spk, mem) ---------------------------------------------------

D, HID = 12, 16


class _TutorialNet(nn.Module):
    """snntorch tutorial style: hidden state passed in and out, a loop over the first (time) dim,
    returns (spikes, membranes) stacked over time."""

    def __init__(self, snn):
        super().__init__()
        self.fc1, self.lif1 = nn.Linear(D, HID), snn.Leaky(beta=0.9)
        self.fc2, self.lif2 = nn.Linear(HID, CLASSES), snn.Leaky(beta=0.8)

    def forward(self, x):
        mem1, mem2 = self.lif1.init_leaky(), self.lif2.init_leaky()
        spk_rec, mem_rec = [], []
        for t in range(x.shape[0]):
            spk1, mem1 = self.lif1(self.fc1(x[t]), mem1)
            spk2, mem2 = self.lif2(self.fc2(spk1), mem2)
            spk_rec.append(spk2)
            mem_rec.append(mem2)
        return torch.stack(spk_rec), torch.stack(mem_rec)


class _SequentialNet(nn.Module):
    """snntorch tutorial style with init_hidden=True neurons in an nn.Sequential; the last neuron has
    output=True and returns (spk, mem)."""

    def __init__(self, snn):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(D, HID), snn.Leaky(beta=0.9, init_hidden=True),
                                 nn.Linear(HID, CLASSES), snn.Leaky(beta=0.8, init_hidden=True, output=True))

    def forward(self, x):
        spk_rec, mem_rec = [], []
        for t in range(x.shape[0]):
            spk, mem = self.net(x[t])
            spk_rec.append(spk)
            mem_rec.append(mem)
        return torch.stack(spk_rec), torch.stack(mem_rec)


def _prune_and_scale(fc1, fc2):
    """Mostly excitatory weights, so that every layer spikes, with some entries pruned."""
    with torch.no_grad():
        fc1.weight.add_(0.1).mul_(2)
        fc1.weight[::2, :4] = 0
        fc2.weight.add_(0.1).mul_(2)
        fc2.weight[:, 1::3] = 0


def test_snntorch_tutorial_loop_returning_spk_mem():
    snn = pytest.importorskip("snntorch")
    torch.manual_seed(0)
    net = _TutorialNet(snn)
    _prune_and_scale(net.fc1, net.fc2)
    x, y = _spikes((N, T, D), 0.5, 3), _labels(4)

    ev = osbc.evaluate(net, (x, y), batch_size=3)

    xt = x.transpose(0, 1)
    s1, s2 = [], []
    with torch.no_grad():
        m1 = m2 = torch.zeros(())
        for t in range(T):
            a, m1 = net.lif1(net.fc1(xt[t]), m1)
            b, m2 = net.lif2(net.fc2(a), m2)
            s1.append(a)
            s2.append(b)
    s1, s2 = torch.stack(s1), torch.stack(s2)
    assert ev.accuracy == pytest.approx((s2.mean(0).argmax(-1) == y).float().mean().item())
    _check_rate(ev, "lif1", s1)
    _check_rate(ev, "lif2", s2)
    sparse = _events(xt, _linear_fanout(net.fc1.weight)) + _events(s1, _linear_fanout(net.fc2.weight))
    dense = (_events(xt, _linear_fanout(torch.ones_like(net.fc1.weight)))
             + _events(s1, _linear_fanout(torch.ones_like(net.fc2.weight))))
    assert ev.synops == pytest.approx(sparse / N, rel=1e-6)
    assert ev.synops_dense == pytest.approx(dense / N, rel=1e-6)


def test_snntorch_output_true_neuron_reports_its_spikes():
    snn = pytest.importorskip("snntorch")
    torch.manual_seed(1)
    net = _SequentialNet(snn)
    _prune_and_scale(net.net[0], net.net[2])
    x, y = _spikes((N, T, D), 0.5, 5), _labels(6)

    ev = osbc.evaluate(net, (x, y), batch_size=4)

    osbc.snn.reset(net)
    xt = x.transpose(0, 1)
    s1, s2 = [], []
    with torch.no_grad():
        for t in range(T):
            a = net.net[1](net.net[0](xt[t]))
            b, _ = net.net[3](net.net[2](a))
            s1.append(a)
            s2.append(b)
    osbc.snn.reset(net)
    s1, s2 = torch.stack(s1), torch.stack(s2)
    assert ev.accuracy == pytest.approx((s2.mean(0).argmax(-1) == y).float().mean().item())
    _check_rate(ev, "net.1", s1)
    _check_rate(ev, "net.3", s2)   # the (spk, mem) neuron: its spikes, not 0
    assert ev.firing_rates["net.3"] > 0


# ---- norse: SequentialState returning (out, state) -----------------------------------------------------

def _norse_net(norse, readout):
    torch.manual_seed(2)
    net = norse.SequentialState(nn.Linear(D, HID), norse.LIF(), nn.Linear(HID, CLASSES), readout)
    _prune_and_scale(net[0], net[2])
    with torch.no_grad():  # norse's LIF integrates with dt = 1 ms, tau_mem = 10 ms: it needs more current
        net[0].weight.mul_(2)
        net[2].weight.mul_(3)
    return net


@pytest.mark.parametrize("readout", ["LIF", "LI"])
def test_norse_sequential_state_returning_out_state(readout):
    norse = pytest.importorskip("norse.torch")
    net = _norse_net(norse, getattr(norse, readout)())
    x, y = _spikes((N, T, D), 0.6, 7), _labels(8)

    ev = osbc.evaluate(net, (x, y), batch_size=4)

    xt = x.transpose(0, 1)
    with torch.no_grad():
        z1, _ = net[1](net[0](xt))
        out, _ = net[3](net[2](z1))
    assert ev.accuracy == pytest.approx((out.mean(0).argmax(-1) == y).float().mean().item())
    _check_rate(ev, "1", z1)
    if readout == "LIF":
        _check_rate(ev, "3", out)
    else:  # a leaky integrator outputs its membrane, not a spike train: no firing rate
        assert list(ev.firing_rates) == ["1"] and ev.mean_firing_rate == ev.firing_rates["1"]
    sparse = _events(xt, _linear_fanout(net[0].weight)) + _events(z1, _linear_fanout(net[2].weight))
    assert ev.synops == pytest.approx(sparse / N, rel=1e-6)


# ---- the output rule -----------------------------------------------------------------------------------

class _RateOut(nn.Module):
    """Returns the time mean [B, classes] instead of [T, B, classes]."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(D, CLASSES)

    def forward(self, x):
        return self.fc(x).mean(0)


def test_output_not_time_first_is_a_user_error():
    x, y = _spikes((N, T, D), 0.5, 9), _labels(10)
    with pytest.raises(OsbcError, match=r"_RateOut returned \(10, 4\).*\[T, B, classes\]"):
        osbc.evaluate(_RateOut(), (x, y))
