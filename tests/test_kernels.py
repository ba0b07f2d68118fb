"""Membrane kernels against explicit Toeplitz products and neuron simulations."""

import math

import pytest
import torch
from torch import nn

from osbc import kernels as K
from osbc import neurons, snn


def simulate(neuron, T, shape=(3,)):
    """Membrane trace of `neuron` (spiking off) for a unit impulse at t=0, minus the zero-input trace."""
    neuron.spiking = False

    def run(amp):
        x = torch.zeros(T, 1, *shape)
        x[0] = amp
        neuron.reset()
        with torch.no_grad():
            return neuron(x)[:, 0].double()

    return (run(1.0) - run(0.0))


@pytest.mark.parametrize("neuron", [
    snn.LIF(2.0), snn.LIF(3.5, decay_input=False), snn.LIF(2.0, v_reset=None), snn.LIF(4.0, v_reset=-0.3),
    snn.IF(), snn.PLIF(2.5), snn.LIF(5.0, decay_input=False, v_reset=None),
])
def test_kernel_equals_simulation(neuron):
    T = 12
    h = neurons.kernel_of(neuron).for_rows((3,), 0).impulse(T)
    sim = simulate(neuron, T)
    assert torch.allclose(sim, h[:, None].expand_as(sim), atol=1e-6)


def test_plif_kernel_tracks_learned_tau():
    n = snn.PLIF(2.0)
    with torch.no_grad():
        n.w.fill_(0.3)
    h = neurons.kernel_of(n).for_rows((3,), 0).impulse(8)
    assert torch.allclose(simulate(n, 8)[:, 0], h, atol=1e-6)


def test_per_neuron_tau_kernel_rows():
    tau = torch.tensor([2.0, 3.0, 7.0])
    n = snn.LIF(tau)
    k = neurons.kernel_of(n).for_rows((3,), 0)
    assert tuple(k.shape) == (3,)
    h = k.impulse(10)  # [3, T]
    assert torch.allclose(simulate(n, 10).t(), h, atol=1e-6)


def test_per_channel_tau_conv_and_per_pixel_error():
    n = snn.LIF(torch.tensor([2.0, 3.0]).reshape(2, 1, 1))
    k = neurons.kernel_of(n).for_rows((2, 4, 4), 0)
    assert tuple(k.shape) == (2,)
    n2 = snn.LIF(1.5 + torch.rand(2, 4, 4))
    with pytest.raises(K.KernelError, match="per pixel"):
        neurons.kernel_of(n2).for_rows((2, 4, 4), 0)


@pytest.mark.parametrize("kernel", [
    K.Kernel.first_order(0.7, 0.3),
    K.Kernel.second_order(0.5, 0.8, 0.2),
    K.Kernel.second_order(0.6, 0.6),
    K.Kernel.fir(torch.tensor([0.3, -0.2, 0.1, 0.05])),
    K.Kernel.identity(),
])
def test_recurrence_equals_toeplitz(kernel):
    T = 9
    x = torch.randn(T, 4, 5, dtype=torch.float64)
    Km = kernel.toeplitz(T)
    want = torch.einsum("ts,sbd->tbd", Km, x)
    assert torch.allclose(kernel.apply(x), want, atol=1e-10)


def test_second_order_closed_forms():
    a, b = 0.5, 0.8
    h = K.Kernel.second_order(a, b).impulse(6)
    assert torch.allclose(h, torch.tensor([(b ** (n + 1) - a ** (n + 1)) / (b - a) for n in range(6)],
                                          dtype=torch.float64))
    h = K.Kernel.second_order(0.7, 0.7).impulse(6)
    assert torch.allclose(h, torch.tensor([(n + 1) * 0.7 ** n for n in range(6)], dtype=torch.float64))


def test_per_row_apply_matches_each_row():
    k = K.Kernel.first_order(torch.tensor([0.2, 0.5, 0.9]), torch.tensor([1.0, 0.5, 2.0]))
    x = torch.randn(7, 2, 3, 4, dtype=torch.float64)  # channel dim 2
    y = k.apply(x, channel_dim=2)
    for r in range(3):
        kr = K.Kernel.first_order(k.A[r, 0, 0], k.B[r, 0])
        assert torch.allclose(y[:, :, r], kr.apply(x[:, :, r]))


def test_groups_merge_identical_rows():
    k = K.Kernel.first_order(torch.tensor([0.5, 0.6, 0.5, 0.6, 0.6]))
    groups = k.groups(5)
    assert sorted(sorted(r.tolist()) for r, _ in groups) == [[0, 2], [1, 3, 4]]


class LeakyCustom(nn.Module):
    """An unregistered neuron: single-step calls, state `v`, threshold attribute."""

    def __init__(self, decay=0.6, leak=0.1):
        super().__init__()
        self.decay, self.leak, self.v_threshold, self.v = decay, leak, 1.0, 0.0

    def reset(self):
        self.v = 0.0

    def forward(self, x):
        out = []
        for t in range(x.shape[0]):
            self.v = self.decay * self.v + x[t] + self.leak
            s = (self.v >= self.v_threshold).float()
            self.v = self.v * (1 - s)
            out.append(s)
        return torch.stack(out)


def test_probe_unknown_neuron():
    k = neurons.kernel_of(LeakyCustom(0.6), (3,), T=10).for_rows((3,), 0)
    assert torch.allclose(k.impulse(10), torch.tensor([0.6 ** n for n in range(10)], dtype=torch.float64), atol=1e-5)


class Squarer(LeakyCustom):
    def forward(self, x):
        out = []
        for t in range(x.shape[0]):
            self.v = self.decay * self.v + x[t] ** 2
            out.append((self.v >= self.v_threshold).float())
        return torch.stack(out)


def test_probe_nonlinear_neuron_is_a_clear_error():
    with pytest.raises(K.KernelError, match="not linear"):
        neurons.kernel_of(Squarer(), (3,), T=5)


def test_lif_rejects_bad_tau():
    with pytest.raises(ValueError, match="tau"):
        snn.LIF(0.5)
    with pytest.raises(ValueError, match="finite"):
        snn.LIF(math.nan)


def test_lif_trains_through_surrogate():
    torch.manual_seed(0)
    fc = nn.Linear(4, 3)
    lif = snn.LIF(2.0)
    x = torch.rand(6, 8, 4) * 3
    out = lif(fc(x))
    out.mean().backward()
    assert fc.weight.grad is not None and fc.weight.grad.abs().sum() > 0


def test_adapters_load_only_for_their_own_neurons():
    """A model of osbc neurons never imports the other libraries (norse alone costs ~1 s to
    import); a norse neuron loads norse's adapter on first sight."""
    import subprocess
    import sys
    code = (
        "import sys, torch; from torch import nn; import osbc; from osbc import snn, neurons, interop\n"
        "m = nn.Sequential(nn.Linear(4, 3), snn.LIF(2.0))\n"
        "osbc.prune(m, torch.rand(8, 5, 4), sparsity=0.5, verbose=False)\n"
        "assert not any(k.split('.')[0] in interop.LIBRARIES for k in sys.modules), sorted(sys.modules)\n"
        "assert interop.AVAILABLE == []\n"
        "try:\n    import norse.torch as nt\nexcept ImportError:\n    print('ok'); sys.exit()\n"
        "assert neurons.kernel_of(nt.LIFBoxCell()).name and interop.AVAILABLE == ['norse']\n"
        "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
