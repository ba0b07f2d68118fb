"""The neuron registry: one registration gives osbc a neuron's kernel, state reset and NIR node."""

import pytest
import torch
from torch import nn

from osbc import neurons
from osbc.errors import OsbcError


class Decaying(nn.Module):
    """A user's neuron: v <- d v + g x (+ spikes at 1, reset to 0), single step per call."""

    def __init__(self, d=0.7, g=0.5):
        super().__init__()
        self.d, self.g, self.v = d, g, 0.0

    def forward(self, x):
        out = []
        for t in range(x.shape[0]):
            self.v = self.d * self.v + self.g * x[t]
            s = (self.v >= 1.0).float()
            self.v = self.v * (1 - s)
            out.append(s)
        return torch.stack(out)


def _reset(m):
    m.v = 0.0


neurons.register(Decaying, lambda m: neurons.Dynamics(m.d, m.g, "Decaying", threshold=1.0), _reset)


def test_one_registration_gives_kernel_reset_and_nir_node():
    n = Decaying(0.7, 0.5)
    assert neurons.is_neuron(n)
    h = neurons.kernel_of(n).impulse(5)
    torch.testing.assert_close(h, 0.5 * 0.7 ** torch.arange(5, dtype=torch.float64))
    n(torch.ones(3, 1, 2))
    neurons.reset_module(n)
    assert n.v == 0.0

    pytest.importorskip("nir")
    from osbc.nir_export import to_nir

    model = nn.Sequential(nn.Linear(3, 2), Decaying(0.75, 0.5))
    g = to_nir(model, dt=1e-3, sample=torch.zeros(2, 1, 3))
    lif = g.nodes["1"]
    # v <- d v + g x is NIR's LIF with tau = dt / (1 - d), r = g / (1 - d) = 2, folded into the weights
    assert type(lif).__name__ == "LIF"
    assert float(lif.tau[0]) == pytest.approx(4e-3, rel=1e-6) and float(lif.r[0]) == 1.0
    assert g.nodes["0"].weight == pytest.approx(2 * model[0].weight.detach().numpy())


def test_dynamics_give_both_kernel_orders():
    d = neurons.Dynamics(0.8, 0.5, "two", syn_decay=0.6)
    h = d.kernel().impulse(4)
    brute = [0.5 * sum(0.6 ** i * 0.8 ** (n - i) for i in range(n + 1)) for n in range(4)]
    torch.testing.assert_close(h, torch.tensor(brute, dtype=torch.float64))


def test_registration_errors_are_clear():
    with pytest.raises(OsbcError, match="reset_mode"):
        neurons.Dynamics(0.5, 1.0, "x", reset_mode="soft")
    with pytest.raises(OsbcError, match="give dynamics"):
        neurons.register(Decaying)
