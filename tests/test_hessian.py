"""Streamed Hessians against brute-force ones built from explicit Toeplitz kernels."""

import torch
import torch.nn.functional as F
from torch import nn

from osbc import snn
from osbc.trace import Recorder, batches, find_modules
from osbc.hessian import HessianAccumulator, kernel_groups
from osbc.kernels import Kernel

from helpers import MLP, TB, ConvNet, LoopMLP, spikes


def stream(model, calib, target_name, kernel=None, bs=5, chunk=1 << 30):
    xs = list(batches(calib, bs))
    targets = {t.name: t for t in find_modules(model, xs[0])}
    t = targets[target_name]
    acc = HessianAccumulator(t, kernel or t.kernel, "cpu", max_chunk_bytes=chunk)
    with Recorder([t], lambda _, x: acc.add(x)) as rec:
        for x in xs:
            rec.run(model, x)
    return acc.hessians(), t


def brute(X, Km):
    """X: [N, T, d] rows of the layer input per sample; H = 2 mean over (sample, t) of (K X)^T (K X)."""
    KX = torch.einsum("ts,nsd->ntd", Km, X.double())
    M = KX.reshape(-1, X.shape[-1])
    return 2 * M.t() @ M / X.shape[0]


def test_linear_hessian_equals_brute_force():
    model = MLP(d_in=48, hidden=16)
    calib = spikes(13, 9, 48)
    (hs, t) = stream(model, calib, "fc1", chunk=2000)  # tiny chunks: several per batch
    [(rows, H)] = hs
    Km = t.kernel.toeplitz(9)
    assert torch.allclose(H, brute(calib, Km), rtol=1e-5, atol=1e-8)
    assert rows.tolist() == list(range(16))


def test_identity_kernel_is_obc_hessian():
    model = MLP(d_in=20, hidden=8)
    calib = spikes(7, 6, 20)
    [(_, H)], _ = stream(model, calib, "fc1", kernel=Kernel.identity())
    assert torch.allclose(H, brute(calib, torch.eye(6, dtype=torch.float64)), rtol=1e-5, atol=1e-8)


def test_second_layer_sees_first_layer_spikes():
    torch.manual_seed(1)
    model = MLP(d_in=30, hidden=12)
    with torch.no_grad():
        model.fc1.weight.mul_(4)
    calib = spikes(10, 8, 30, rate=0.4)
    [(_, H)], t = stream(model, calib, "fc2")
    snn.reset(model)
    with torch.no_grad():
        s1 = model.lif1(model.fc1(calib.transpose(0, 1)))  # [T, N, 12]
    snn.reset(model)
    assert s1.sum() > 0
    assert torch.allclose(H, brute(s1.transpose(0, 1), t.kernel.toeplitz(8)), rtol=1e-5, atol=1e-8)


def test_loop_model_gives_same_hessian():
    a, b = MLP(d_in=24, hidden=8), LoopMLP(d_in=24, hidden=8)
    b.load_state_dict(a.state_dict())
    calib = spikes(6, 7, 24)
    for name in ("fc1", "fc2"):
        [(_, Ha)], ta = stream(a, calib, name)
        [(_, Hb)], tb = stream(b, calib, name)
        assert tb.mode == "loop" and ta.mode == "tb"
        assert torch.allclose(Ha, Hb, rtol=1e-6, atol=1e-9)


def patches3x3(calib):
    """Brute-force rows of a 3x3, padding-1 conv's input: explicit zero padding and slicing, patch
    order (c, ki, kj) like weight.reshape(R, -1); every position of every sample is a sample."""
    N, T, _, Hh, Ww = calib.shape
    xp = F.pad(calib, (1, 1, 1, 1))
    rows = [xp[:, :, :, i:i + 3, j:j + 3].reshape(N, T, -1) for i in range(Hh) for j in range(Ww)]
    return torch.stack(rows, 1).reshape(N * Hh * Ww, T, -1)


def test_conv_hessian_equals_brute_force_patches():
    model = ConvNet(c_in=2, ch=4, size=6)
    calib = spikes(5, 5, 2, 6, 6)
    [(_, H)], t = stream(model, calib, "conv.m", bs=2, chunk=3000)
    assert torch.allclose(H, brute(patches3x3(calib), t.kernel.toeplitz(5)), rtol=1e-5, atol=1e-8)


def test_conv_before_max_pool_uses_the_neurons_kernel():
    """Conv -> MaxPool -> LIF(tau=4): the conv's Hessian applies the LIF's kernel at every conv
    output position, as if the pool were absent."""
    model = nn.Sequential(TB(nn.Conv2d(2, 3, 3, padding=1, bias=False)), TB(nn.MaxPool2d(2)), snn.LIF(4.0))
    calib = spikes(4, 6, 2, 4, 4)
    [(_, H)], t = stream(model, calib, "0.m", bs=3)
    h = 0.25 * 0.75 ** torch.arange(6, dtype=torch.float64)  # (1/tau)(1 - 1/tau)^n
    lag = torch.arange(6)[:, None] - torch.arange(6)[None, :]
    Km = torch.where(lag >= 0, h[lag.clamp(min=0)], torch.zeros((), dtype=torch.float64))
    assert torch.allclose(H, brute(patches3x3(calib), Km), rtol=1e-5, atol=1e-8)


def test_per_row_kernels_get_their_own_hessians():
    model = MLP(d_in=16, hidden=4)
    model.lif1 = snn.LIF(torch.tensor([2.0, 5.0, 2.0, 5.0]))
    calib = spikes(8, 6, 16)
    hs, t = stream(model, calib, "fc1")
    assert len(hs) == 2
    for rows, H in hs:
        tau = 2.0 if rows[0] == 0 else 5.0
        Km = snn_kernel(tau).toeplitz(6)
        assert torch.allclose(H, brute(calib, Km), rtol=1e-5, atol=1e-8)


def snn_kernel(tau):
    return Kernel.first_order(1 - 1 / tau, 1 / tau)


def test_too_many_kernels_are_clustered():
    k = Kernel.first_order(torch.linspace(0.1, 0.9, 40))
    groups, clustered = kernel_groups(k, 40, max_groups=4)
    assert clustered and len(groups) <= 4
    assert sorted(torch.cat([r for r, _ in groups]).tolist()) == list(range(40))


def test_released_hessians_equal_copies_and_spend_the_accumulator():
    import pytest
    model = MLP(d_in=48, hidden=16)
    calib = spikes(7, 5, 48)
    xs = list(batches(calib, 4))
    t = {t.name: t for t in find_modules(model, xs[0])}["fc1"]
    acc = HessianAccumulator(t, t.kernel, "cpu")
    with Recorder([t], lambda _, x: acc.add(x)) as rec:
        for x in xs:
            rec.run(model, x)
    [(_, copy)] = acc.hessians()
    [(_, released)] = acc.hessians(release=True)
    assert torch.equal(copy, released)
    with pytest.raises(RuntimeError, match="fc1.*released"):
        acc.hessians()
