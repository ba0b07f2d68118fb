"""NIR export round trip through the importers users have: snntorch ``import_from_nir``, norse
``from_nir`` and spikingjelly's ``nir_exchange.import_from_nir``. Each compressed model is exported,
re-imported by every importer that supports its nodes, run on a spike sample and compared with
osbc's own run of the model; a graph that cannot be exported exactly is refused with an OsbcError.

``python tests/test_nir_roundtrip.py`` prints the agreement of every model x importer."""

from __future__ import annotations

import contextlib
import io
import tempfile
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import osbc
from osbc import models, snn
from osbc.errors import OsbcError

nir = pytest.importorskip("nir")
pytest.importorskip("nirtorch")
from osbc.nir_export import export_nir, run_nir  # noqa: E402

#: snntorch's importer hard-codes dt = 1e-4; the others take dt, so one export serves all three
DT = 1e-4
#: a membrane within float rounding of the threshold may flip a spike (the importers compute in
#: float32 with their own operation order); everything else must agree
EXACT = 0.999
T, B = 12, 4


def _spikes(shape, p=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(*shape, generator=g) < p).float()


def _scale(model, gain):
    """Random init alone is mostly silent: scale the weights so that every layer fires."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                m.weight.mul_(gain)
    return model.eval()


def _compressed(model, in_shape, sparsity=0.5):
    """``osbc.prune`` with the fast solver on random spike calibration ([N, T, ...])."""
    calib = _spikes((16, 6, *in_shape), seed=1)
    return osbc.prune(model, calib, sparsity=sparsity, solver="fast", allocation="uniform", verbose=False).model


# ---- the models ---------------------------------------------------------------------------------

def osbc_mlp():
    torch.manual_seed(0)
    m = _scale(models.build("nmnist_mlp", in_shape=(2, 6, 6), hidden=32), 6.0)
    return _compressed(m, (2, 6, 6)), (2, 6, 6)


def osbc_conv():
    torch.manual_seed(0)
    m = models.build("small_conv", in_shape=(2, 8, 8), channels=4, hidden=16)
    for bn in m.modules():
        if isinstance(bn, nn.BatchNorm2d):
            with torch.no_grad():
                bn.running_var.uniform_(0.5, 2.0)
                bn.bias.uniform_(-0.1, 0.1)
    return _compressed(_scale(m, 15.0), (2, 8, 8)), (2, 8, 8)


def sj_conv():
    sj = pytest.importorskip("spikingjelly.activation_based.neuron")
    from spikingjelly.activation_based import functional, layer

    torch.manual_seed(0)
    net = nn.Sequential(layer.Conv2d(2, 4, 3, padding=1), sj.LIFNode(tau=2.0), layer.MaxPool2d(2),
                        layer.Flatten(), layer.Linear(4 * 4 * 4, 12), sj.LIFNode(tau=2.0),
                        layer.Linear(12, 5, bias=False), sj.IFNode())
    functional.set_step_mode(net, "m")
    return _compressed(_scale(net, 6.0), (2, 8, 8)), (2, 8, 8)


class _Loop(nn.Module):
    """The usual snntorch style: single-step neurons, a loop over time in forward."""

    def __init__(self, n1, n2, d=20):
        super().__init__()
        self.fc1, self.lif1, self.fc2, self.lif2 = nn.Linear(d, 16), n1, nn.Linear(16, 4, bias=False), n2

    def forward(self, x):
        from snntorch import utils

        utils.reset(self)
        out = []
        for t in range(x.shape[0]):
            z = self.lif1(self.fc1(x[t]))[0]
            out.append(self.lif2(self.fc2(z))[0])
        return torch.stack(out)


def snntorch_leaky():
    st = pytest.importorskip("snntorch")
    torch.manual_seed(0)
    net = _Loop(st.Leaky(beta=0.8, reset_mechanism="zero", reset_delay=False),
                st.Leaky(beta=0.9, reset_mechanism="zero", reset_delay=False))
    return _compressed(_scale(net, 3.0), (20,)), (20,)


def snntorch_synaptic():
    st = pytest.importorskip("snntorch")
    torch.manual_seed(0)
    net = _Loop(st.Synaptic(alpha=0.6, beta=0.8, reset_mechanism="zero", reset_delay=False),
                st.Leaky(beta=0.7, reset_mechanism="zero", reset_delay=False))
    return _compressed(_scale(net, 3.0), (20,)), (20,)


def norse_lif():
    nt = pytest.importorskip("norse.torch")
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = nn.Linear(20, 16)
            self.lif1 = nt.LIF(nt.LIFParameters(tau_mem_inv=torch.tensor(200.0), tau_syn_inv=torch.tensor(400.0)),
                               dt=DT)
            self.fc2 = nn.Linear(16, 4, bias=False)
            self.lif2 = nt.LIF(nt.LIFParameters(tau_mem_inv=torch.tensor(300.0), tau_syn_inv=torch.tensor(500.0)),
                               dt=DT)

        def forward(self, x):
            z, _ = self.lif1(self.fc1(x))
            return self.lif2(self.fc2(z))[0]

    return _compressed(_scale(Net(), 400.0), (20,)), (20,)


def adaptive_pool():
    torch.manual_seed(0)
    m = models.SpikingNet([("conv", models.SeqToANN(nn.Conv2d(2, 4, 3, padding=1))), ("sn1", snn.LIF(2.0)),
                           ("gap", models.SeqToANN(nn.AdaptiveAvgPool2d(2))), ("flat", nn.Flatten(2)),
                           ("fc", nn.Linear(16, 5)), ("sn2", snn.LIF(2.0))], in_shape=(2, 8, 8))
    return _compressed(_scale(m, 15.0), (2, 8, 8)), (2, 8, 8)


def maxpool_before_neuron():
    torch.manual_seed(0)
    m = models.SpikingNet([("conv", models.SeqToANN(nn.Conv2d(2, 4, 3, padding=1), nn.MaxPool2d(2))),
                           ("sn1", snn.LIF(2.0)), ("flat", nn.Flatten(2)), ("fc", nn.Linear(64, 5)),
                           ("sn2", snn.LIF(2.0))], in_shape=(2, 8, 8))
    return _compressed(_scale(m, 15.0), (2, 8, 8)), (2, 8, 8)


class _Residual(nn.Module):
    in_shape = (16,)

    def __init__(self):
        super().__init__()
        self.fc1, self.sn1 = nn.Linear(16, 16), snn.LIF(2.0)
        self.fc2, self.sn2 = nn.Linear(16, 16), snn.LIF(2.0)
        self.fc3, self.sn3 = nn.Linear(16, 4), snn.LIF(2.0)

    def forward(self, x):
        a = self.sn1(self.fc1(x))
        b = self.sn2(self.fc2(a) + a)  # a spike shortcut around fc2
        return self.sn3(self.fc3(b))


def residual():
    torch.manual_seed(0)
    return _compressed(_scale(_Residual(), 8.0), (16,)), (16,)


MODELS = {f.__name__: f for f in (osbc_mlp, osbc_conv, sj_conv, snntorch_leaky, snntorch_synaptic, norse_lif,
                                  adaptive_pool, maxpool_before_neuron, residual)}


# ---- the importers ------------------------------------------------------------------------------

def _snntorch(graph, x):
    pytest.importorskip("snntorch")
    from snntorch import utils
    from snntorch.import_nir import import_from_nir

    with contextlib.redirect_stdout(io.StringIO()):  # it prints its weight-scaling notes
        net = import_from_nir(graph)
    utils.reset(net)
    out = []
    for t in range(x.shape[0]):
        o = net(x[t])
        out.append(o[0] if isinstance(o, tuple) else o)
    return torch.stack(out)


def _norse(graph, x):
    nt = pytest.importorskip("norse.torch")
    net = nt.from_nir(graph, dt=DT)
    state, out = None, []
    for t in range(x.shape[0]):
        o, state = net(x[t], state)
        out.append(o)
    return torch.stack(out)


def _spikingjelly(graph, x):
    pytest.importorskip("spikingjelly.activation_based.nir_exchange")
    from spikingjelly.activation_based.nir_exchange.from_nir import import_from_nir

    net = import_from_nir(graph, dt=DT, step_mode="s")
    state, out = None, []
    for t in range(x.shape[0]):
        o, state = net(x[t], state)
        out.append(o)
    return torch.stack(out)


IMPORTERS = {"snntorch": _snntorch, "norse": _norse, "spikingjelly": _spikingjelly}


def _reference(model, x):
    snn.reset(model)
    with torch.no_grad():
        y = model(x)
    snn.reset(model)
    return y[0] if isinstance(y, tuple) else y


def agreement(name: str, importer: str):
    """(fraction of equal spikes, firing rate of the reference) of ``importer``'s re-import of the
    exported model ``name``; raises what the exporter or the importer raises."""
    model, in_shape = MODELS[name]()
    x = _spikes((T, B, *in_shape), seed=2)
    y = _reference(model, x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with tempfile.TemporaryDirectory() as d:  # through the file, as users get it
            export_nir(model, f"{d}/net.nir", dt=DT, sample=x)
            graph = nir.read(f"{d}/net.nir")
        with torch.no_grad():
            y2 = IMPORTERS[importer](graph, x)
    return float((y2.reshape(y.shape) == y).float().mean()), float(y.mean())


# ---- the support matrix -------------------------------------------------------------------------

ALL = ("snntorch", "norse", "spikingjelly")
NO_AVGPOOL = ("snntorch", "spikingjelly")  # norse's importer maps no AvgPool2d
#: model -> the importers that support all its nodes (each must reproduce our spikes)
SUPPORTED = {
    "osbc_mlp": ALL,
    "osbc_conv": NO_AVGPOOL,        # spike max pooling = AvgPool2d + a LIF gate
    "sj_conv": ("spikingjelly",),   # + IF, which snntorch's importer maps to Leaky(beta=0.9)
    "snntorch_leaky": ALL,
    "snntorch_synaptic": ALL,
    "norse_lif": ALL,
    "adaptive_pool": NO_AVGPOOL,
    "residual": ALL,                # the shortcut is a second edge into sn2
}
#: model -> why the exporter refuses it
REFUSED = {"maxpool_before_neuron": "conv.1: MaxPool2d on non-binary input"}


@pytest.mark.parametrize("name,importer", [(m, i) for m, imps in SUPPORTED.items() for i in imps])
def test_reimport_reproduces_our_spikes(name, importer):
    a, rate = agreement(name, importer)
    assert rate > 0.02, "the test model should spike"
    assert a >= EXACT


@pytest.mark.parametrize("name", list(REFUSED))
def test_inexact_graphs_are_refused(name):
    model, in_shape = MODELS[name]()
    with pytest.raises(OsbcError, match=REFUSED[name]):
        export_nir(model, None, dt=DT, sample=_spikes((3, 2, *in_shape)))


def test_uneven_adaptive_pool_is_refused():
    m = models.SpikingNet([("gap", models.SeqToANN(nn.AdaptiveAvgPool2d(3))), ("flat", nn.Flatten(2)),
                           ("fc", nn.Linear(18, 2)), ("sn", snn.LIF(2.0))], in_shape=(2, 8, 8))
    with pytest.raises(OsbcError, match="gap.0: AdaptiveAvgPool2d from .* uneven windows"):
        export_nir(m, None)


def test_gain_folds_into_weights_or_threshold():
    """snntorch Leaky(beta) has gain 1 / (1 - beta) in NIR's LIF: it goes into the Linear before
    (r stays 1, which norse's importer assumes); a neuron on the graph input has no such layer and
    counts its voltage in units of the gain instead - both exact."""
    st = pytest.importorskip("snntorch")
    model = _Loop(st.Leaky(beta=0.75, reset_mechanism="zero", reset_delay=False),
                  st.Leaky(beta=0.5, reset_mechanism="zero", reset_delay=False))
    g = export_nir(model, None, dt=DT, sample=torch.zeros(2, 1, 20))
    assert float(g.nodes["lif1"].r.max()) == 1.0 and float(g.nodes["lif2"].v_threshold.max()) == 1.0
    np.testing.assert_allclose(g.nodes["fc1"].weight, 4 * model.fc1.weight.detach().numpy(), rtol=1e-6)
    np.testing.assert_allclose(g.nodes["fc2"].weight, 2 * model.fc2.weight.detach().numpy(), rtol=1e-6)
    alone = nn.Sequential(snn.LIF(2.0, decay_input=False))
    x = _spikes((8, 3, 5)) * 0.6
    g = export_nir(alone, None, dt=DT, sample=x)
    np.testing.assert_allclose(g.nodes["0"].v_threshold, 0.5, rtol=1e-6)  # threshold 1 / gain 2
    assert torch.equal(run_nir(g, x), _reference(alone, x))


if __name__ == "__main__":
    for name in MODELS:
        for imp in IMPORTERS:
            try:
                a, rate = agreement(name, imp)
                print(f"{name:24s} {imp:13s} agreement {a:.4f} (rate {rate:.3f})")
            except Exception as e:  # noqa: BLE001 - a report
                print(f"{name:24s} {imp:13s} {type(e).__name__}: {str(e).splitlines()[0][:110] if str(e) else ''}")
