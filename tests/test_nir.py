"""NIR export: graphs that nir.read reads back, whose simulation (and snntorch's / norse's imports)
reproduce the exported model's spikes."""

import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import osbc
from osbc import models, snn
from osbc.errors import OsbcError

nir = pytest.importorskip("nir")
pytest.importorskip("h5py")
from osbc.nir_export import export_nir, run_nir  # noqa: E402

#: spikes of a re-simulated export may differ from the original's where a membrane lands within
#: float rounding of the threshold (and spikingjelly fires at v >= threshold, NIR at v > threshold)
AGREEMENT = 0.999


def _spiking(model, gain):
    """Scale weights so that every layer fires (random init alone is mostly silent)."""
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            with torch.no_grad():
                m.weight.mul_(gain)
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return model.eval()


def _run(model, x):
    snn.reset(model)
    with torch.no_grad():
        y = model(x)
    snn.reset(model)
    return y


def _spikes(x_shape, p=0.3):
    return (torch.rand(*x_shape) < p).float()


ARCHS = {
    "mlp": ("nmnist_mlp", dict(in_shape=(2, 6, 6), hidden=24), 8.0),
    "conv": ("small_conv", dict(in_shape=(2, 12, 12), channels=4, hidden=16), 8.0),
    "vote": ("dvsgesture_net", dict(in_shape=(2, 16, 16), channels=6, blocks=2, hidden=16, classes=3, vote=4), 8.0),
}


@pytest.mark.parametrize("arch", list(ARCHS))
def test_export_read_back_and_reproduce(arch, tmp_path):
    name, kw, gain = ARCHS[arch]
    model = _spiking(models.build(name, **kw), gain)
    x = _spikes((10, 3, *model.in_shape))
    path = tmp_path / "net.nir"
    g = export_nir(model, path, dt=1e-3, sample=x)
    back = nir.read(str(path))
    assert set(back.nodes) == set(g.nodes) and sorted(back.edges) == sorted(g.edges)
    assert back.metadata["dt"] == pytest.approx(1e-3)
    for k, n in g.nodes.items():
        assert type(back.nodes[k]) is type(n)
        if hasattr(n, "weight"):
            np.testing.assert_array_equal(np.asarray(back.nodes[k].weight), np.asarray(n.weight))
    y = _run(model, x)
    assert 0.02 < float(y.mean()) < 0.9, "the test model should spike"
    for graph in (g, back):
        y2 = run_nir(graph, x)
        assert y2.shape == y.shape
        assert float((y2 == y).float().mean()) >= AGREEMENT


def test_lif_parameter_convention():
    dt = 1e-3
    model = nn.Sequential(nn.Linear(5, 4), snn.LIF(tau=torch.tensor([2.0, 3.0, 4.0, 5.0]), v_threshold=0.5),
                          nn.Linear(4, 3, bias=False), snn.LIF(3.0, decay_input=False),
                          nn.Linear(3, 2, bias=False), snn.IF(v_threshold=2.0), nn.Linear(2, 2, bias=False),
                          snn.PLIF(init_tau=4.0))
    g = export_nir(model, None, dt=dt, sample=torch.zeros(3, 2, 5))
    lif0, lif1, if2, plif = g.nodes["1"], g.nodes["3"], g.nodes["5"], g.nodes["7"]
    assert isinstance(lif0, nir.LIF) and isinstance(if2, nir.IF) and isinstance(plif, nir.LIF)
    np.testing.assert_allclose(lif0.tau, [2e-3, 3e-3, 4e-3, 5e-3], rtol=1e-6)
    np.testing.assert_allclose(lif0.r, 1.0)
    np.testing.assert_allclose(lif0.v_threshold, 0.5)
    np.testing.assert_allclose(lif0.v_leak, 0.0)
    np.testing.assert_allclose(lif1.tau, 3e-3, rtol=1e-6)
    # decay_input=False: the input enters undivided, a gain of tau = 3 folded into the weights before
    np.testing.assert_allclose(lif1.r, 1.0)
    np.testing.assert_allclose(g.nodes["2"].weight, 3 * model[2].weight.detach().numpy(), rtol=1e-6)
    np.testing.assert_allclose(if2.r, 1 / dt, rtol=1e-6)
    np.testing.assert_allclose(if2.v_threshold, 2.0)
    np.testing.assert_allclose(plif.tau, 4e-3, rtol=1e-5)
    assert isinstance(g.nodes["0"], nir.Affine) and isinstance(g.nodes["2"], nir.Linear)
    # the continuous LIF under forward Euler is the discrete neuron, for any dt
    x = torch.randn(12, 2, 5) * 3
    for dt2 in (1e-4, 1.0):
        g2 = export_nir(model, None, dt=dt2, sample=x)
        assert float((run_nir(g2, x) == _run(model, x)).float().mean()) >= AGREEMENT


def test_batchnorm_is_folded():
    model = _spiking(models.build("small_conv", in_shape=(2, 8, 8), channels=3, hidden=8), 6.0)
    g = export_nir(model, None, sample=_spikes((4, 2, 2, 8, 8)))
    kinds = [type(n).__name__ for n in g.nodes.values()]
    assert "BatchNorm" not in " ".join(kinds) and kinds.count("Conv2d") == 2
    conv = model.conv1[0]
    bn = model.conv1[1]
    a = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach()
    np.testing.assert_allclose(g.nodes["conv1_0"].weight, (conv.weight * a[:, None, None, None]).detach().numpy(),
                               rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(g.nodes["conv1_0"].bias, (bn.bias - bn.running_mean * a).detach().numpy(),
                               rtol=1e-5, atol=1e-6)


def test_compressed_model_exports_with_metadata():
    model = _spiking(models.build("nmnist_mlp", in_shape=(1, 4, 8), hidden=32), 6.0)
    calib = _spikes((16, 6, 1, 4, 8))
    pruned = osbc.prune(model, calib, sparsity=0.9, method="magnitude", allocation="uniform", verbose=False).model
    both = osbc.quantize(pruned, calib, bits=4, method="rtn", verbose=False).model
    g = export_nir(both, None, sample=calib[:4].transpose(0, 1))
    fc1 = g.nodes["fc1"]
    np.testing.assert_array_equal(fc1.weight, both.fc1.weight.detach().numpy())
    assert fc1.metadata["osbc_sparsity"] >= 0.85 and fc1.metadata["osbc_bits"] == 4


def test_soft_reset_warns_and_maxpool_needs_spikes():
    model = nn.Sequential(nn.Linear(4, 3), snn.LIF(2.0, v_reset=None))
    with pytest.warns(UserWarning, match="reset"):
        export_nir(model, None, sample=torch.zeros(2, 1, 4))
    pool = nn.Sequential(models.SeqToANN(nn.MaxPool2d(2)), nn.Flatten(2), nn.Linear(4, 2))
    with pytest.raises(ValueError, match="MaxPool2d on non-binary"):
        export_nir(pool, None, sample=torch.rand(2, 1, 1, 4, 4))
    with pytest.raises(ValueError, match="sample"):
        export_nir(nn.Sequential(nn.Linear(2, 2)), None)


def _flat_mlp():
    # no Flatten: snntorch's and norse's importers pass NIR's batch-free Flatten dims to torch unchanged
    return models.SpikingNet([("fc1", nn.Linear(40, 32, bias=False)), ("sn1", snn.LIF(2.0)),
                              ("fc2", nn.Linear(32, 10, bias=False)), ("sn2", snn.LIF(2.0))], in_shape=(40,))


def test_snntorch_import_reproduces_our_spikes(tmp_path, capsys):
    pytest.importorskip("snntorch")
    pytest.importorskip("nirtorch")
    from snntorch import utils as snn_utils
    from snntorch.import_nir import import_from_nir

    model = _spiking(_flat_mlp(), 6.0)
    x = _spikes((20, 4, 40))
    y = _run(model, x)
    assert float(y.mean()) > 0.02
    # snntorch's importer assumes dt = 1e-4 (beta = 1 - 1e-4 / tau)
    export_nir(model, tmp_path / "mlp.nir", dt=1e-4, sample=x)
    net = import_from_nir(nir.read(str(tmp_path / "mlp.nir")))
    snn_utils.reset(net)
    out = []
    with torch.no_grad():
        for t in range(x.shape[0]):
            o = net(x[t])
            out.append(o[0] if isinstance(o, tuple) else o)
    y2 = torch.stack(out)
    assert float((y2 == y).float().mean()) >= AGREEMENT


def test_norse_import_reproduces_our_spikes(tmp_path):
    pytest.importorskip("norse")
    pytest.importorskip("nirtorch")
    import norse.torch as nt

    model = _spiking(_flat_mlp(), 6.0)
    x = _spikes((20, 4, 40))
    y = _run(model, x)
    dt = 1e-3
    export_nir(model, tmp_path / "mlp.nir", dt=dt, sample=x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        net = nt.from_nir(nir.read(str(tmp_path / "mlp.nir")), dt=dt)
    state, out = None, []
    with torch.no_grad():
        for t in range(x.shape[0]):
            o, state = net(x[t], state)
            out.append(o)
    assert float((torch.stack(out) == y).float().mean()) >= AGREEMENT


def test_cli_export_nir(tmp_path, capsys):
    from osbc import checkpoint, cli

    model = _spiking(models.build("small_conv", in_shape=(2, 8, 8), channels=3, hidden=8), 6.0)
    ck = tmp_path / "m.safetensors"
    checkpoint.save(model, ck, data="digits", frames=4)
    out = tmp_path / "m.nir"
    assert cli.main(["export-nir", str(ck), "-o", str(out), "--dt", "1e-4"]) == 0
    assert "wrote" in capsys.readouterr().out
    g = nir.read(str(out))
    assert math.isclose(float(g.metadata["dt"]), 1e-4)
    assert cli.main(["export-nir", str(ck), "-o", str(out)]) == 1  # exists, no --force


def test_residual_is_exported_as_a_graph():
    """A residual add becomes two edges into one node (NIR sums a node's inputs), not a chain that
    drops the shortcut; a merge that is not a sum is refused."""

    class Res(nn.Module):
        def __init__(self, op):
            super().__init__()
            self.fc1, self.fc2, self.lif, self.op = nn.Linear(4, 4), nn.Linear(4, 4), snn.LIF(2.0), op

        def forward(self, x):
            a = self.fc1(x)
            return self.lif(self.op(self.fc2(a), a))

    torch.manual_seed(0)
    model = _spiking(Res(torch.add), 3.0)
    x = torch.randn(10, 3, 4) * 2
    g = export_nir(model, None, sample=x)
    assert sorted(g.edges) == sorted([("input", "fc1"), ("fc1", "fc2"), ("fc1", "lif"), ("fc2", "lif"),
                                      ("lif", "output")])
    y = _run(model, x)
    assert 0.02 < float(y.mean()) < 0.9
    assert float((run_nir(g, x) == y).float().mean()) >= AGREEMENT
    with pytest.raises(OsbcError, match="does not reproduce the model .*lif: NIR sums a node.s inputs"):
        export_nir(Res(torch.mul), None, sample=x)
    with pytest.raises(OsbcError, match="lif: its inputs from fc1, fc2 have shapes"):
        export_nir(Res(lambda a, b: torch.cat([a, b], -1)), None, sample=x)

    class InputShortcut(nn.Module):  # the trace cannot see the raw input added: the run on the sample can
        def __init__(self):
            super().__init__()
            self.fc, self.lif = nn.Linear(4, 4), snn.LIF(2.0)

        def forward(self, x):
            return self.lif(self.fc(x) + x)

    with pytest.raises(OsbcError, match="does not reproduce the model .* not a module"):
        export_nir(_spiking(InputShortcut(), 3.0), None, sample=x)
