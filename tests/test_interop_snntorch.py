"""snntorch models in osbc: kernels checked against snntorch's own simulation (scalar and per-neuron
beta/alpha), state reset, one-shot compression of a small trained model that loops over time in
``forward``, and NIR export of an snntorch model."""

import pytest
import torch
from torch import nn

snn = pytest.importorskip("snntorch")

import osbc  # noqa: E402
from osbc import neurons  # noqa: E402

from helpers import C, D, check_prune_and_quantize, train_briefly  # noqa: E402

T = 10
N = 3


def _membrane(n):
    """h[0..T-1] of ``n`` measured in snntorch: spiking off (threshold = inf; a huge finite one
    for reset by subtraction, where mem - reset * inf would be nan), impulse minus zero input,
    reading the ``mem`` state after each single step."""
    n.threshold = torch.tensor(float("inf") if n.reset_mechanism == "zero" else 1e30)

    def run(amp):
        neurons.reset_module(n)
        x = torch.zeros(T, 1, N)
        x[0] = amp
        out = []
        with torch.no_grad():
            for t in range(T):
                n(x[t])
                out.append(n.mem[0].double())
        return torch.stack(out)

    return (run(1.0) - run(0.0)).movedim(0, -1)


NEURONS = {
    "leaky": lambda: snn.Leaky(beta=0.8),
    "leaky_per_neuron": lambda: snn.Leaky(beta=torch.tensor([0.5, 0.9, 1.2]), init_hidden=True),
    "leaky_learned": lambda: snn.Leaky(beta=0.7, learn_beta=True, reset_mechanism="zero"),
    "synaptic": lambda: snn.Synaptic(alpha=0.6, beta=0.8),
    "synaptic_per_neuron": lambda: snn.Synaptic(alpha=torch.tensor([0.5, 0.7, 0.9]), beta=0.7),
    "synaptic_equal": lambda: snn.Synaptic(alpha=0.75, beta=0.75, init_hidden=True),
}


@pytest.mark.parametrize("name", list(NEURONS))
def test_kernel_matches_snntorch(name):
    n = NEURONS[name]()
    k = neurons.kernel_of(n)
    h = k.impulse(T)
    torch.testing.assert_close(_membrane(n), h.expand(N, T), rtol=1e-5, atol=1e-6)
    if name.endswith("per_neuron"):
        assert tuple(k.shape) == (N,)  # one kernel per neuron, hence per output row


def test_beta_is_clamped_like_snntorch():
    k = neurons.kernel_of(snn.Leaky(beta=torch.tensor([1.3, -0.2])))
    torch.testing.assert_close(k.impulse(3), torch.tensor([[1.0, 1, 1], [1, 0, 0]], dtype=torch.float64))


def test_reset_zeroes_hidden_state():
    n = snn.Synaptic(alpha=0.5, beta=0.5, init_hidden=True)
    n(torch.ones(2, 3))
    assert n.mem.abs().sum() > 0
    osbc.snn.reset(nn.Sequential(n))
    assert n.mem.abs().sum() == 0 and n.syn.abs().sum() == 0


# ---- compressing a small trained snntorch model ------------------------------------------------

class Net(nn.Module):
    """The usual snntorch style: single-step neurons, a loop over time in forward."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(D, 48, bias=False)
        self.lif1 = snn.Leaky(beta=torch.linspace(0.5, 0.9, 48))  # per-neuron beta
        self.fc2 = nn.Linear(48, C, bias=False)
        self.lif2 = snn.Synaptic(alpha=0.5, beta=0.8)

    def forward(self, x):
        mem1 = self.lif1.init_leaky()
        syn2, mem2 = self.lif2.init_synaptic()
        out = []
        for t in range(x.shape[0]):
            s1, mem1 = self.lif1(self.fc1(x[t]), mem1)
            s2, syn2, mem2 = self.lif2(self.fc2(s1), syn2, mem2)
            out.append(s2)
        return torch.stack(out)


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    return train_briefly(Net(), n=192, epochs=5)


def test_prune_and_quantize_snntorch(trained):
    targets, res, _ = check_prune_and_quantize(trained, lambda m: (m.fc1, m.fc2))
    assert [(t.name, t.neuron_name, t.mode) for t in targets] == [("fc1", "lif1", "loop"), ("fc2", "lif2", "loop")]
    assert tuple(targets[0].kernel.shape) == (48,)  # per-neuron beta -> per-row kernels
    m = res.model
    assert type(m) is Net and type(m.lif1) is snn.Leaky and type(m.lif2) is snn.Synaptic


def test_snntorch_model_exports_to_nir():
    nir = pytest.importorskip("nir")  # noqa: F841
    from osbc.nir_export import export_nir, run_nir

    torch.manual_seed(0)

    class Loop(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = nn.Linear(20, 16)
            self.lif1 = snn.Leaky(beta=torch.linspace(0.5, 0.9, 16), reset_mechanism="zero", reset_delay=False)
            self.fc2 = nn.Linear(16, 4, bias=False)
            self.lif2 = snn.Synaptic(alpha=0.6, beta=0.7, reset_mechanism="zero", reset_delay=False)

        def forward(self, x):
            m1 = self.lif1.init_leaky()
            s2, m2 = self.lif2.init_synaptic()
            out = []
            for t in range(x.shape[0]):
                z, m1 = self.lif1(self.fc1(x[t]), m1)
                z, s2, m2 = self.lif2(self.fc2(z), s2, m2)
                out.append(z)
            return torch.stack(out)

    net = Loop().eval()
    with torch.no_grad():
        net.fc1.weight.mul_(3)
        net.fc2.weight.mul_(2)
    x = (torch.rand(15, 4, 20) < 0.4).float()
    with torch.no_grad():
        y = net(x)
    assert float(y.mean()) > 0.02
    g = export_nir(net, None, dt=1e-3, sample=x)
    assert [type(n).__name__ for n in g.nodes.values()].count("CubaLIF") == 1
    assert float((run_nir(g, x) == y).float().mean()) >= 0.999
