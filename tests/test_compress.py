"""The public API end to end on small SNNs with spike inputs."""

import json

import pytest
import torch

import osbc
from osbc import snn

from helpers import MLP, ConvNet, LoopMLP, spikes


def trained_like_mlp(d_in=200, hidden=64, out=10, seed=0):
    torch.manual_seed(seed)
    m = MLP(d_in=d_in, hidden=hidden, out=out)
    with torch.no_grad():  # scale so that hidden neurons fire at a realistic rate
        m.fc1.weight.mul_(3.0)
        m.fc2.weight.mul_(3.0)
    return m


@pytest.fixture(scope="module")
def calib():
    return spikes(64, 10, 200, rate=0.15, dead=0.2)


def weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def zero_frac(model, names=("fc1", "fc2")):
    ws = [getattr(model, n).weight for n in names]
    return sum(int((w == 0).sum()) for w in ws) / sum(w.numel() for w in ws)


@pytest.mark.parametrize("method, allocation", [
    (m, a) for m in ("osbc", "obc", "magnitude") for a in ("uniform", "lamp", "global")
    if (m, a) != ("magnitude", "global")])  # global ranks OBS losses; magnitude rejects it (tested below)
def test_prune_hits_sparsity_and_leaves_input_alone(calib, method, allocation):
    model = trained_like_mlp()
    before = weights(model)
    res = osbc.prune(model, calib, sparsity=0.9, method=method, allocation=allocation, verbose=False)
    assert zero_frac(res.model) == pytest.approx(0.9, abs=1.0 / 13440)
    assert abs(res.report.sparsity - zero_frac(res.model)) < 1e-9
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert res.model is not model
    json.dumps(res.report.to_dict())
    for layer in res.report:
        assert layer.membrane_error is not None and layer.membrane_error >= 0


def test_same_seed_same_result(calib):
    a = osbc.prune(trained_like_mlp(), calib, sparsity=0.8, allocation="global", verbose=False).model
    b = osbc.prune(trained_like_mlp(), calib, sparsity=0.8, allocation="global", verbose=False).model
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def total_membrane_error(res):
    return sum(l.membrane_error for l in res.report)


@pytest.mark.parametrize("sparsity", [0.5, 0.9, 0.97])
def test_osbc_has_lowest_membrane_error_when_pruning(calib, sparsity):
    errs = {m: total_membrane_error(osbc.prune(trained_like_mlp(), calib, sparsity=sparsity, method=m,
                                               allocation="uniform", verbose=False))
            for m in ("osbc", "obc", "magnitude")}
    assert errs["osbc"] < errs["obc"] < errs["magnitude"], errs


@pytest.mark.parametrize("bits", [4, 2])
def test_osbc_has_lowest_membrane_error_when_quantizing(calib, bits):
    errs = {m: total_membrane_error(osbc.quantize(trained_like_mlp(), calib, bits=bits, method=m, verbose=False))
            for m in ("osbc", "obc", "rtn")}
    assert errs["osbc"] < errs["obc"] < errs["rtn"], errs


@pytest.mark.parametrize("solver", ["exact", "fast"])
def test_quantized_weights_lie_on_a_per_row_grid(calib, solver):
    model = trained_like_mlp()
    res = osbc.quantize(model, calib, bits=3, solver=solver, verbose=False)
    for name in ("fc1", "fc2"):
        w = getattr(res.model, name).weight.detach()
        # 3 bits symmetric per channel: codes -3..3 of a scale set by the row's original max |w|
        scale = getattr(model, name).weight.detach().abs().amax(1, keepdim=True) / 3
        codes = w / scale
        assert torch.allclose(codes, codes.round(), atol=1e-4)
        assert codes.abs().max() <= 3 + 1e-4


@pytest.mark.parametrize("sparsity", [0.9, 0.97])
def test_restricted_solver_hits_sparsity_at_most_fast_error(calib, sparsity):
    """The restricted greedy removes exactly the requested count per layer (uniform), and its
    membrane error is at most the SparseGPT sweep's (it sits between fast and exact)."""
    res = {s: osbc.prune(trained_like_mlp(), calib, sparsity=sparsity, solver=s, allocation="uniform",
                         verbose=False) for s in ("restricted", "fast")}
    r = res["restricted"]
    for name in ("fc1", "fc2"):
        w = getattr(r.model, name).weight
        assert int((w == 0).sum()) == round(sparsity * w.numel())
    assert [l.solver for l in r.report] == ["restricted", "restricted"]
    assert total_membrane_error(r) <= total_membrane_error(res["fast"])


@pytest.mark.parametrize("solver", ["auto", "restricted"])
def test_joint_prune_then_quantize_keeps_zeros(calib, solver):
    pruned = osbc.prune(trained_like_mlp(), calib, sparsity=0.9, solver=solver, verbose=False).model
    zeros = pruned.fc1.weight == 0
    q = osbc.quantize(pruned, calib, bits=4, verbose=False).model
    assert torch.all(q.fc1.weight[zeros] == 0)
    assert zero_frac(q) >= 0.9 - 1e-9


@pytest.mark.parametrize("solver", ["exact", "blocked", "fast", "restricted"])
def test_nm_pattern(calib, solver):
    res = osbc.prune(trained_like_mlp(), calib, nm="2:4", solver=solver, verbose=False)
    for name in ("fc1", "fc2"):
        w = getattr(res.model, name).weight.detach()
        assert torch.all((w.reshape(w.shape[0], -1, 4) != 0).sum(-1) <= 2)
    assert zero_frac(res.model) == pytest.approx(0.5)


@pytest.mark.parametrize("method, solver", [("osbc", "exact"), ("osbc", "blocked"), ("obc", "fast"),
                                            ("osbc", "restricted"), ("magnitude", "auto")])
def test_nm_pattern_on_inputs_not_a_multiple_of_m(method, solver):
    """18 inputs, 2:4: every group of 4 keeps at most 2 (the partial last group of 2 counts as
    padded), in all four solvers; before, the layer's budget round(0.5 R d) left some rows 3 of 4."""
    m = trained_like_mlp(d_in=18, hidden=12)
    res = osbc.prune(m, spikes(32, 8, 18, rate=0.2, dead=0.1), nm="2:4", method=method, solver=solver,
                     verbose=False)
    for name in ("fc1", "fc2"):
        w = getattr(res.model, name).weight.detach()
        R, d = w.shape
        padded = torch.zeros(R, -(-d // 4) * 4)
        padded[:, :d] = w
        assert ((padded.view(R, -1, 4) != 0).sum(-1) <= 2).all()
    fc1 = res.model.fc1.weight.detach()
    assert ((fc1[:, :16].reshape(12, 4, 4) != 0).sum(-1) == 2).all()    # full groups: exactly N


def test_sequential_calibration_runs_and_differs(calib):
    d = osbc.prune(trained_like_mlp(), calib, sparsity=0.9, calibration="dense", verbose=False).model
    s = osbc.prune(trained_like_mlp(), calib, sparsity=0.9, calibration="sequential", verbose=False).model
    assert torch.equal(d.fc1.weight, s.fc1.weight)  # the first layer sees the same inputs
    assert not torch.equal(d.fc2.weight, s.fc2.weight)
    assert zero_frac(s) == pytest.approx(0.9, abs=1e-3)


def test_loop_model_compresses_like_multistep_model(calib):
    a = trained_like_mlp()
    b = LoopMLP(d_in=200, hidden=64)
    b.load_state_dict(a.state_dict())
    ra = osbc.prune(a, calib[:16], sparsity=0.9, verbose=False).model
    rb = osbc.prune(b, calib[:16], sparsity=0.9, verbose=False).model
    assert torch.allclose(ra.fc1.weight, rb.fc1.weight, atol=1e-5)
    assert type(rb) is LoopMLP


def test_conv_bn_model_and_dataloader_calib():
    torch.manual_seed(0)
    model = ConvNet(size=8)
    model.eval()
    x = spikes(24, 6, 2, 8, 8)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, torch.zeros(24)), batch_size=7)
    res = osbc.prune(model, loader, sparsity=0.8, verbose=False)
    assert {l.name for l in res.report} == {"conv.m", "fc", "readout"}
    assert res.report.sparsity == pytest.approx(0.8, abs=1e-3)
    q = osbc.quantize(res.model, loader, bits=4, method="obc", verbose=False)
    assert q.report.layers[0].bits == 4


def test_per_neuron_tau_rows(calib):
    m = trained_like_mlp()
    m.lif1 = snn.LIF(torch.where(torch.arange(64) % 2 == 0, 2.0, 6.0))
    res = osbc.prune(m, calib, sparsity=0.9, solver="exact", verbose=False)
    assert "per-neuron" in res.report.layers[0].kernel
    assert zero_frac(res.model) == pytest.approx(0.9, abs=1e-3)


def test_inplace_modifies_the_given_model(calib):
    m = trained_like_mlp()
    res = osbc.prune(m, calib, sparsity=0.5, inplace=True, verbose=False)
    assert res.model is m and zero_frac(m) == pytest.approx(0.5, abs=1e-3)


@pytest.mark.parametrize("kwargs, match", [
    (dict(sparsity=1.0), "sparsity"), (dict(sparsity=-0.1), "sparsity"), (dict(method="foo"), "method"),
    (dict(allocation="x"), "allocation"), (dict(solver="x"), "solver"), (dict(calibration="x"), "calibration"),
    (dict(nm="4:2"), "N < M"), (dict(method="magnitude", allocation="global"), "global"),
])
def test_bad_prune_arguments(calib, kwargs, match):
    with pytest.raises(ValueError, match=match):
        osbc.prune(trained_like_mlp(), calib, verbose=False, **kwargs)


@pytest.mark.parametrize("bits", [1, 9, 4.5, True])
def test_bad_bits(calib, bits):
    with pytest.raises(ValueError, match="bits"):
        osbc.quantize(trained_like_mlp(), calib, bits=bits, verbose=False)


def test_bad_inputs(calib):
    with pytest.raises(ValueError, match="empty"):
        osbc.prune(trained_like_mlp(), calib[:0], verbose=False)
    with pytest.raises(ValueError, match="empty"):
        osbc.prune(trained_like_mlp(), [], verbose=False)
    with pytest.raises(ValueError, match="rejected"):
        osbc.prune(trained_like_mlp(), spikes(4, 5, 199), verbose=False)
    bad = calib[:4].clone()
    bad[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        osbc.prune(trained_like_mlp(), bad, verbose=False)
    m = trained_like_mlp()
    with torch.no_grad():
        m.fc2.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="fc2.*NaN"):
        osbc.prune(m, calib, verbose=False)
    with pytest.raises(ValueError, match="calibration"):
        osbc.prune(trained_like_mlp(), None, method="osbc", verbose=False)
    with pytest.raises(ValueError, match="nothing to compress"):
        osbc.prune(torch.nn.Sequential(torch.nn.Flatten(2), snn.LIF()), calib, verbose=False)


def test_dead_inputs_and_silent_layers_never_give_nan():
    m = trained_like_mlp(d_in=50, hidden=16)
    x = torch.zeros(8, 5, 50)
    x[:, :, :3] = 1.0  # almost everything is dead; hidden layer may be silent
    for res in (osbc.prune(m, x, sparsity=0.9, verbose=False), osbc.quantize(m, x, bits=2, verbose=False)):
        for p in res.model.parameters():
            assert torch.isfinite(p).all()


def test_inspect_lists_modules(calib):
    ts = osbc.inspect(trained_like_mlp(), calib)
    assert [t.name for t in ts] == ["fc1", "fc2"]


@pytest.mark.parametrize("R, d, sparsity, kw, want", [
    (64, 200, 0.5, {}, "exact"),                           # small layer, low sparsity: exact is affordable
    (64, 30, 0.97, {}, "restricted"),                      # tiny layer: both instant, restricted's estimate lower
    (64, 30, 0.97, dict(seconds=1e-7), "fast"),            # ... and a budget neither fits
    (256, 2312, 0.97, {}, "restricted"),                   # the digits MLP's first layer: ~21 s exact, ~1 s restricted
    (256, 2312, 0.85, {}, "restricted"),                   # ~21 s exact, ~4 s restricted
    (256, 2312, 0.75, {}, "exact"),                        # under 80%: exact or fast only
    (512, 4608, 0.97, {}, "restricted"),                   # exact ~330 s, restricted ~4 s
    (512, 4608, 0.99, {}, "restricted"),
    (512, 4608, 0.97, dict(device_type="cuda"), "restricted"),  # cheaper than exact on any device
    (512, 4608, 0.8, {}, "restricted"),                    # ~38 s with the late pool (measured 49 s)
    (512, 4608, 0.75, {}, "fast"),                         # under 80%: exact or fast only
    (512, 4608, 0.97, dict(nm=True), "fast"),              # N:M: restricted would run exact itself
    (512, 4608, 1.0, dict(pruning=False), "refined"),      # quantization: refined at any size
    (512, 8192, 0.97, {}, "restricted"),                   # exact ~1900 s, restricted ~20 s
    (512, 8192, 0.95, {}, "restricted"),                   # restricted ~27 s (measured 21 s)
    (512, 8192, 0.9, {}, "restricted"),                    # ~53 s with the late pool (measured 49 s)
    (512, 8192, 0.85, {}, "fast"),                         # both over the minute (restricted ~110 s)
    (512, 8192, 0.97, dict(seconds=10.0), "fast"),         # a tighter budget
])
def test_auto_solver_rule(R, d, sparsity, kw, want):
    from osbc.compress import auto_solver
    assert auto_solver(R, d, sparsity, **kw) == want


def test_auto_resolves_to_restricted_where_exact_is_too_slow(calib, monkeypatch):
    """With the exact solver's estimated time pushed over the limit (a 10^-8 throughput), the
    layers at 97% go to restricted, the 2:4 ones to fast, and the result is restricted's own."""
    from osbc import compress
    monkeypatch.setitem(compress._FLOPS, "cpu", 1e3)
    monkeypatch.setattr(compress, "_RESTRICTED_COST", 1e-6)
    kw = dict(sparsity=0.97, allocation="uniform", device="cpu", verbose=False)
    auto = osbc.prune(trained_like_mlp(), calib, solver="auto", **kw)
    assert [l.solver for l in auto.report] == ["restricted", "restricted"]
    ref = osbc.prune(trained_like_mlp(), calib, solver="restricted", **kw)
    assert all(torch.equal(a, b) for a, b in zip(auto.model.state_dict().values(), ref.model.state_dict().values()))
    nm = osbc.prune(trained_like_mlp(), calib, nm="2:4", solver="auto", device="cpu", verbose=False)
    assert [l.solver for l in nm.report] == ["fast", "fast"]
