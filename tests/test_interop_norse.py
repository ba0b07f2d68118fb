"""norse models in osbc: kernels (parameters in ``module.p``, step ``module.dt``) checked against
norse's own simulation, one-shot compression of a small trained model that stays a norse model,
and NIR export of a norse model."""

import pytest
import torch
from torch import nn

nt = pytest.importorskip("norse.torch")

from osbc import neurons  # noqa: E402

from helpers import C, D, check_prune_and_quantize, prototype_data, train_briefly  # noqa: E402

T = 10
N = 3


def _membrane(n, multi_step):
    """h[0..T-1] of ``n`` measured in norse: threshold = inf (spiking off), impulse minus zero input,
    reading ``state.v`` (multi-step modules record every step's state)."""
    if hasattr(n.p, "v_th"):
        n.p = n.p._replace(v_th=torch.full_like(torch.as_tensor(n.p.v_th, dtype=torch.float32), float("inf")))

    def run(amp):
        x = torch.zeros(T, 1, N)
        x[0] = amp
        with torch.no_grad():
            if multi_step:
                n.record_states = True
                _, st = n(x)
                return st.v[:, 0].double()
            s, out = None, []
            for t in range(T):
                _, s = n(x[t], s)
                out.append(s.v[0].double())
            return torch.stack(out)

    return (run(1.0) - run(0.0)).movedim(0, -1)


P = nt.LIFParameters
NEURONS = {
    "lif_per_neuron": (lambda: nt.LIF(P(tau_mem_inv=torch.tensor([100.0, 200.0, 50.0]),
                                        tau_syn_inv=torch.tensor(200.0), v_leak=torch.tensor(0.3))), True),
    "lif_cell": (lambda: nt.LIFCell(), False),
    "lif_cell_equal_taus": (lambda: nt.LIFCell(P(tau_mem_inv=torch.tensor(200.0), tau_syn_inv=torch.tensor(200.0))),
                            False),
    "lif_cell_dt": (lambda: nt.LIFCell(dt=5e-4), False),
    "lif_box": (lambda: nt.LIFBoxCell(nt.LIFBoxParameters(tau_mem_inv=torch.tensor(300.0))), False),
    "iaf": (lambda: nt.IAF(), True),
    "iaf_cell": (lambda: nt.IAFCell(), False),
    "li": (lambda: nt.LI(), True),
    "li_cell": (lambda: nt.LICell(), False),
    "li_box": (lambda: nt.LIBoxCell(), False),
}


@pytest.mark.parametrize("name", list(NEURONS))
def test_kernel_matches_norse(name):
    make, multi = NEURONS[name]
    n = make()
    k = neurons.kernel_of(n)
    assert k.name.startswith("norse.")
    torch.testing.assert_close(_membrane(n, multi), k.impulse(T).expand(N, T), rtol=1e-5, atol=1e-6)


def test_norse_lif_current_enters_in_the_same_step():
    """norse adds the input to the synaptic current before the membrane update: h[0] = dt/tau_mem."""
    k = neurons.kernel_of(nt.LIFCell(P(tau_mem_inv=torch.tensor(100.0), tau_syn_inv=torch.tensor(200.0))))
    h = k.impulse(3)
    assert float(h[0]) == pytest.approx(0.1) and float(h[1]) == pytest.approx(0.9 * 0.1 + 0.1 * 0.8)


# ---- compressing a small trained norse model ---------------------------------------------------

class Net(nn.Module):
    """A multi-step LIF layer, then a single-step LIFBoxCell driven by a loop with explicit state."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(D, 48, bias=False)
        self.lif1 = nt.LIF(P(tau_mem_inv=torch.tensor(200.0), tau_syn_inv=torch.tensor(400.0)))
        self.fc2 = nn.Linear(48, C, bias=False)
        self.lif2 = nt.LIFBoxCell(nt.LIFBoxParameters(tau_mem_inv=torch.linspace(200.0, 400.0, C)))

    def forward(self, x):
        z, _ = self.lif1(self.fc1(x))
        s, out = None, []
        for t in range(x.shape[0]):
            o, s = self.lif2(self.fc2(z[t]), s)
            out.append(o)
        return torch.stack(out)


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    net = Net()
    with torch.no_grad():
        net.fc1.weight.mul_(8)
        net.fc2.weight.mul_(8)
    return train_briefly(net, n=128, epochs=4)


def test_prune_and_quantize_norse(trained):
    targets, res, _ = check_prune_and_quantize(trained, lambda m: (m.fc1, m.fc2))
    assert [(t.name, t.neuron_name) for t in targets] == [("fc1", "lif1"), ("fc2", "lif2")]
    assert targets[0].kernel.name == "norse.LIF" and tuple(targets[1].kernel.shape) == (C,)
    assert type(res.model.lif1) is nt.LIF and type(res.model.lif2) is nt.LIFBoxCell


def test_norse_model_exports_to_nir(trained):
    pytest.importorskip("nir")
    from osbc.nir_export import export_nir, run_nir

    x, _ = prototype_data(8, 3)
    x = x.transpose(0, 1)
    with torch.no_grad():
        y = trained(x)
    assert float(y.mean()) > 0.02
    g = export_nir(trained, None, dt=1e-3, sample=x)
    kinds = [type(n).__name__ for n in g.nodes.values()]
    assert "CubaLIF" in kinds and "LIF" in kinds
    # with dt = the modules' dt, NIR's time constants are norse's
    cuba = next(n for n in g.nodes.values() if type(n).__name__ == "CubaLIF")
    assert float(cuba.tau_mem.flat[0]) == pytest.approx(1 / 200.0) and float(cuba.tau_syn.flat[0]) == pytest.approx(
        1 / 400.0)
    assert float((run_nir(g, x) == y).float().mean()) >= 0.999
