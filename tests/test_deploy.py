"""osbc.deploy: masks that keep a pruned model's zeros through real fine-tuning (Adam with momentum and
weight decay), and the integer codes of quantized layers (osbc.quantize per channel, per layer, pow2)."""

import copy

import pytest
import torch
import torch.nn.functional as F

import osbc
from osbc import storage
from osbc.deploy import is_frozen
from osbc.errors import OsbcError
from osbc.training import predict

from helpers import MLP, ConvNet, spikes

D, HID, OUT = 60, 24, 4


@pytest.fixture(scope="module")
def calib():
    return spikes(48, 6, D, rate=0.2, dead=0.1)


@pytest.fixture(scope="module")
def pruned(calib):
    torch.manual_seed(0)
    m = MLP(d_in=D, hidden=HID, out=OUT)
    with torch.no_grad():  # neurons that fire, so that training reaches every weight
        m.fc1.weight.mul_(8)
        m.fc2.weight.mul_(8)
    # magnitude pruning zeroes weights of active inputs too (OBS prunes silent inputs first, whose
    # weights get no gradient and would stay zero without any mask)
    return osbc.prune(m, calib, sparsity=0.7, method="magnitude", verbose=False).model


def _fine_tune(model, calib, steps=5):
    """A few real training steps: Adam with weight decay, MSE of the output rate to random targets."""
    y = torch.randint(0, OUT, (calib.shape[0],), generator=torch.Generator().manual_seed(1))
    opt = torch.optim.Adam(model.parameters(), lr=0.01, weight_decay=0.1)
    model.train()
    for _ in range(steps):
        rate = predict(model, calib)
        loss = F.mse_loss(rate, F.one_hot(y, OUT).float())
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_freeze_keeps_zeros_through_adam_and_unfreeze_gives_plain_weights(pruned, calib):
    keys = set(pruned.state_dict())
    before = {n: pruned.get_submodule(n).weight.detach().clone() for n in ("fc1", "fc2")}
    zeros = {n: w == 0 for n, w in before.items()}
    assert all(z.float().mean() > 0.2 for z in zeros.values())

    free = copy.deepcopy(pruned)            # control: the same training without masks fills the zeros in
    _fine_tune(free, calib)
    assert all((free.get_submodule(n).weight[zeros[n]] != 0).any() for n in zeros)

    model = copy.deepcopy(pruned)
    assert osbc.freeze_sparsity(model) == ["fc1", "fc2"]
    assert osbc.freeze_sparsity(model) == []          # already masked
    _fine_tune(model, calib)
    trained = {}
    for n, z in zeros.items():
        layer = model.get_submodule(n)
        # layer.weight is recomputed by the next forward pass; after the last step it lags behind
        w = trained[n] = (layer.weight_orig * layer.weight_mask).detach()
        assert torch.count_nonzero(w[z]) == 0                       # exactly zero
        moved = (w[~z] != before[n][~z]).float().mean()
        assert moved > 0.9                                          # the others trained

    assert osbc.unfreeze_sparsity(model) == ["fc1", "fc2"]
    assert set(model.state_dict()) == keys                          # plain weights again
    for n, w in trained.items():
        layer = model.get_submodule(n)
        assert isinstance(layer.weight, torch.nn.Parameter) and torch.equal(layer.weight, w)
        assert not is_frozen(layer)
    tensors, meta = storage.encode_state_dict(model.state_dict())
    back = storage.decode_state_dict(tensors, meta)
    assert all(torch.equal(back[k], v) for k, v in model.state_dict().items())
    assert osbc.unfreeze_sparsity(model) == []


def test_freeze_skips_dense_layers():
    m = MLP(d_in=8, hidden=5, out=3)
    with torch.no_grad():
        m.fc2.weight[0, 0] = 0
    assert osbc.freeze_sparsity(m) == ["fc2"]
    assert not is_frozen(m.fc1) and is_frozen(m.fc2)


# ---- integer codes -----------------------------------------------------------------------------------

def _conv_calib():
    return spikes(32, 5, 2, 8, 8, rate=0.2, dead=0.1)


def _quantized(calib, **kw):
    torch.manual_seed(0)
    m = MLP(d_in=D, hidden=HID, out=OUT)
    return osbc.quantize(m, calib, bits=4, verbose=False, **kw).model


def _check_codes(layer, bits):
    q = osbc.quantized_codes(layer)
    w = layer.weight.detach()
    assert q.codes.dtype == torch.int8 and q.codes.shape == w.shape
    assert torch.equal(q.dequantize(), w)                          # codes * scale == weight, exactly
    assert torch.equal(q.codes.float() * q.scale.reshape(-1, *[1] * (w.dim() - 1)), w)
    qmax = 2 ** (bits - 1) - 1                                      # quant.Grid's symmetric range
    assert int(q.codes.min()) >= -qmax and int(q.codes.max()) <= qmax
    assert 2 <= q.bits <= bits and int(q.codes.abs().max()) <= 2 ** (q.bits - 1) - 1
    assert torch.equal(q.codes == 0, w == 0)
    return q


@pytest.mark.parametrize("bits", [4, 3])
def test_codes_per_channel(calib, bits):
    torch.manual_seed(0)
    m = osbc.quantize(MLP(d_in=D, hidden=HID, out=OUT), calib, bits=bits, verbose=False).model
    for layer in (m.fc1, m.fc2):
        q = _check_codes(layer, bits)
        assert q.per in ("channel", "layer")
    assert osbc.quantized_codes(m.fc1).scale.shape == (HID,)       # per-row maxima differ


def test_codes_per_layer_and_pow2(calib):
    m = _quantized(calib, per="layer")
    for layer in (m.fc1, m.fc2):
        q = _check_codes(layer, 4)
        assert q.per == "layer" and q.scale.shape == (1,)
    m = _quantized(calib, pow2=True)
    for layer in (m.fc1, m.fc2):
        q = _check_codes(layer, 4)
        assert torch.all(torch.frexp(q.scale)[0] == 0.5)           # powers of two


def test_codes_of_a_pruned_quantized_conv_net():
    x = _conv_calib()
    torch.manual_seed(0)
    m = osbc.prune(ConvNet(size=8), x, sparsity=0.5, method="magnitude", verbose=False).model
    pruned = m.conv.m.weight == 0
    m = osbc.quantize(m, x, bits=4, verbose=False).model
    conv = m.conv.m
    q = _check_codes(conv, 4)
    assert pruned.any() and torch.all(q.codes[pruned] == 0)
    _check_codes(m.fc, 4)
    wq = osbc.quantized_codes(conv.weight)                          # a tensor works the same
    assert torch.equal(wq.codes, q.codes) and torch.equal(wq.scale, q.scale) and wq.bits == q.bits


def test_codes_errors_and_edge_cases():
    torch.manual_seed(0)
    lin = torch.nn.Linear(10, 4)
    with pytest.raises(OsbcError, match=r"Linear weight \(4, 10\).*not on an integer grid.*osbc.quantize"):
        osbc.quantized_codes(lin)
    with pytest.raises(OsbcError, match="ReLU is not a Linear/Conv layer"):
        osbc.quantized_codes(torch.nn.ReLU())
    with pytest.raises(OsbcError, match="got list"):
        osbc.quantized_codes([1.0, 2.0])
    with pytest.raises(OsbcError, match="not on an integer grid"):
        osbc.quantized_codes(torch.tensor([[1.0, float("nan")]]))
    q = osbc.quantized_codes(torch.zeros(3, 5))
    assert torch.equal(q.codes, torch.zeros(3, 5, dtype=torch.int8)) and q.bits == 2
    # hand-made grids: scales 0.25 and 0.375 (no common scale with small codes) -> one per row
    w = torch.tensor([[0.25, -1.25, 0.0], [0.375, 0.75, -1.875]])
    q = osbc.quantized_codes(w)
    assert q.per == "channel" and torch.equal(q.scale, torch.tensor([0.25, 0.375]))
    assert torch.equal(q.codes, torch.tensor([[1, -5, 0], [1, 2, -5]], dtype=torch.int8))
    assert q.bits == 4 and torch.equal(q.dequantize(), w)
    # rows on 0.25 and 0.5: one scale for the layer, even though it needs a wider code (10 -> 5 bits)
    w = torch.tensor([[0.25, -1.25, 0.0], [0.5, 1.0, -2.5]])
    q = osbc.quantized_codes(w)
    assert q.per == "layer" and torch.equal(q.scale, torch.tensor([0.25]))
    assert torch.equal(q.codes, torch.tensor([[1, -5, 0], [2, 4, -10]], dtype=torch.int8))
    assert q.bits == 5 and torch.equal(q.dequantize(), w)
