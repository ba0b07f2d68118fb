"""spikingjelly models in osbc: kernels checked against spikingjelly's own simulation, state reset,
and one-shot compression of a small trained model that stays a spikingjelly model."""

import copy
import math

import pytest
import torch
from torch import nn

sj_neuron = pytest.importorskip("spikingjelly.activation_based.neuron")
from spikingjelly.activation_based import functional, layer, surrogate  # noqa: E402

import osbc  # noqa: E402
from osbc import neurons  # noqa: E402

from helpers import C, D, check_prune_and_quantize, train_briefly  # noqa: E402

T = 12
SHAPE = (3,)


def _membrane(n, T=T):
    """h[0..T-1] of neuron ``n``, measured in spikingjelly: spiking off (threshold = inf, or a huge
    finite one for soft reset, where v - spike * inf would be nan), impulse minus zero input."""
    n.v_threshold = math.inf if n.v_reset is not None else 1e30

    def run(amp):
        functional.reset_net(n)
        x = torch.zeros(T, 1, *SHAPE)
        x[0] = amp
        with torch.no_grad():
            if n.step_mode == "m" and hasattr(n, "store_v_seq"):
                n.store_v_seq = True
                n(x)
                return n.v_seq[:, 0].double()
            out = []
            for t in range(T):  # single steps (multi-step mode: sequences of length 1)
                n(x[t] if n.step_mode == "s" else x[t:t + 1])
                out.append(n.v.reshape(1, *SHAPE)[0].double())
            return torch.stack(out)

    return (run(1.0) - run(0.0)).movedim(0, -1)


NEURONS = {
    "lif": lambda m: sj_neuron.LIFNode(tau=2.0, step_mode=m),
    "lif_tau5_soft": lambda m: sj_neuron.LIFNode(tau=5.0, v_reset=None, step_mode=m),
    "lif_no_decay_input": lambda m: sj_neuron.LIFNode(tau=3.0, decay_input=False, v_reset=-0.5, step_mode=m),
    "plif": lambda m: sj_neuron.ParametricLIFNode(init_tau=4.0, step_mode=m),
    "plif_no_decay_input": lambda m: sj_neuron.ParametricLIFNode(init_tau=1.5, decay_input=False, step_mode=m),
    "if": lambda m: sj_neuron.IFNode(step_mode=m),
    "simple_lif": lambda m: sj_neuron.SimpleLIFNode(3.0, True, step_mode=m),
    "simple_if": lambda m: sj_neuron.SimpleIFNode(step_mode=m),
}


@pytest.mark.parametrize("mode", ["s", "m"])
@pytest.mark.parametrize("name", list(NEURONS))
def test_kernel_matches_spikingjelly(name, mode):
    n = NEURONS[name](mode)
    if name.startswith("plif"):
        with torch.no_grad():
            n.w.add_(0.3)  # a "learned" time constant
    k = neurons.kernel_of(n)
    assert k.name.startswith("spikingjelly.")
    h = k.impulse(T)
    torch.testing.assert_close(_membrane(n), h.expand(*SHAPE, T), rtol=1e-5, atol=1e-6)


class _SlowLIF(sj_neuron.SimpleLIFNode):
    """A user subclass that changes the dynamics: osbc must not use LIF's formula for it."""

    def neuronal_charge(self, x):
        self.v = self.v + (x - self.v) / (2 * self.tau)


def test_subclass_with_new_dynamics_is_measured():
    n = _SlowLIF(2.0, True)
    k = neurons.kernel_of(n)
    assert k.name.startswith("probed")
    torch.testing.assert_close(k.impulse(T).reshape(-1), _membrane(n)[0], rtol=1e-5, atol=1e-6)
    assert neurons.dynamics_of(n) is None  # only measured: no NIR node for it
    # a subclass that keeps the dynamics keeps the exact kernel
    assert neurons.kernel_of(sj_neuron.OTTTLIFNode(tau=2.0)).name == "spikingjelly.OTTTLIFNode"
    assert neurons.dynamics_of(sj_neuron.OTTTLIFNode(tau=2.0)).name == "spikingjelly.OTTTLIFNode"


def test_reset_clears_state_and_allows_deepcopy():
    net = nn.Sequential(layer.Linear(4, 3), sj_neuron.LIFNode(tau=2.0, step_mode="m"))
    functional.set_step_mode(net, "m")
    x = torch.rand(5, 2, 4, requires_grad=True)
    net(x).sum().backward()
    assert isinstance(net[1].v, torch.Tensor)
    osbc.snn.reset(net)  # through the registry
    assert net[1].v == 0.0
    copy.deepcopy(net)


# ---- compressing a small trained spikingjelly model --------------------------------------------

def _sj_mlp():
    net = nn.Sequential(
        layer.Linear(D, 48, bias=False),
        sj_neuron.LIFNode(tau=2.0, surrogate_function=surrogate.ATan(), detach_reset=True),
        layer.Linear(48, C, bias=False),
        sj_neuron.ParametricLIFNode(init_tau=2.0, surrogate_function=surrogate.ATan(), detach_reset=True))
    functional.set_step_mode(net, "m")
    return net


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    return train_briefly(_sj_mlp(), n=192, epochs=6, after_step=functional.reset_net)


def test_prune_and_quantize_spikingjelly(trained):
    targets, res, _ = check_prune_and_quantize(trained, lambda m: (m[0], m[2]), after=functional.reset_net)
    assert [t.neuron_name for t in targets] == ["1", "3"]
    assert targets[0].kernel.name == "spikingjelly.LIFNode"
    assert [type(a) for a in res.model] == [type(a) for a in trained]  # same library, same classes


def test_spikingjelly_conv_model_compresses():
    """Multi-step conv wrappers with BatchNorm, pooling and flatten."""
    torch.manual_seed(0)
    net = nn.Sequential(
        layer.Conv2d(2, 6, 3, padding=1, bias=False), layer.BatchNorm2d(6),
        sj_neuron.LIFNode(tau=2.0, surrogate_function=surrogate.ATan()), layer.MaxPool2d(2),
        layer.Flatten(), layer.Linear(6 * 4 * 4, 5, bias=False), sj_neuron.IFNode())
    functional.set_step_mode(net, "m")
    with torch.no_grad():
        net[0].weight.mul_(4)
    net.eval()
    calib = (torch.rand(16, 6, 2, 8, 8) < 0.3).float()
    targets = osbc.inspect(net, calib)
    assert [(t.name, t.bn is not None, t.neuron_name) for t in targets] == [("0", True, "2"), ("5", False, "6")]
    res = osbc.prune(net, calib, sparsity=0.7, allocation="uniform", verbose=False)
    assert type(res.model[2]) is sj_neuron.LIFNode
    with torch.no_grad():
        out = res.model(calib[:4].transpose(0, 1))
    functional.reset_net(res.model)
    assert out.shape == (6, 4, 5)


def test_spikingjelly_model_exports_to_nir():
    pytest.importorskip("nir")
    from osbc.nir_export import export_nir, run_nir

    torch.manual_seed(0)
    net = nn.Sequential(
        layer.Conv2d(2, 4, 3, padding=1), layer.BatchNorm2d(4), sj_neuron.LIFNode(tau=2.0), layer.MaxPool2d(2),
        layer.Flatten(), layer.Linear(4 * 4 * 4, 6), sj_neuron.ParametricLIFNode(init_tau=3.0),
        layer.Dropout(0.5), layer.Linear(6, 3, bias=False), sj_neuron.IFNode())
    functional.set_step_mode(net, "m")
    with torch.no_grad():
        net[0].weight.mul_(4)
        net[5].weight.mul_(8)
        net[8].weight.mul_(6)
        net[1].running_var.uniform_(0.5, 2)
    net.eval()
    x = (torch.rand(10, 3, 2, 8, 8) < 0.4).float()
    with torch.no_grad():
        y = net(x)
    functional.reset_net(net)
    assert float(y.mean()) > 0.02
    g = export_nir(net, None, dt=1e-3, sample=x)
    kinds = [type(n).__name__ for n in g.nodes.values()]
    assert kinds.count("LIF") == 3 and kinds.count("IF") == 1 and "Flatten" in kinds and "AvgPool2d" in kinds  # + max-pool gate
    assert float((run_nir(g, x) == y).float().mean()) >= 0.999
