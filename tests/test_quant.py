"""Quantization grids."""

import pytest
import torch

from osbc.quant import Grid, fit_grid


def test_bits_range():
    W = torch.randn(3, 5)
    for b in (0, 1, 9, 16, 2.5, True, "4"):
        with pytest.raises(ValueError):
            fit_grid(W, b)
        with pytest.raises(ValueError):
            Grid(b, torch.ones(3))
    for b in range(2, 9):
        fit_grid(W, b)
    with pytest.raises(ValueError):
        fit_grid(W, 4, per="tensor")


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("full_range", [False, True])
def test_grid_values_and_codes(bits, full_range):
    torch.manual_seed(0)
    W = torch.randn(6, 50) * torch.rand(6, 1) * 3
    g = fit_grid(W, bits, full_range=full_range)
    q = g.quantize(W)
    c = g.codes(W)
    assert c.dtype == torch.int8
    assert int(c.max()) <= 2 ** (bits - 1) - 1
    assert int(c.min()) >= (-(2 ** (bits - 1)) if full_range else -(2 ** (bits - 1) - 1))
    torch.testing.assert_close(q, c.float() * g.scale[:, None], rtol=0, atol=0)
    assert torch.equal(g.quantize(q), q)                          # idempotent, bit for bit
    # nearest grid value: no other code is closer
    s = g.scale[:, None]
    for dc in (-1, 1):
        alt = (c.float() + dc).clamp(g.qmin, g.qmax) * s
        assert ((alt - W).abs() >= (q - W).abs() - 1e-6).all()
    # the row maximum is on the grid's end
    assert torch.allclose(q.abs().amax(1), W.abs().amax(1), rtol=1e-6)


def test_quantize_rows_and_shapes():
    W = torch.randn(5, 3, 4)
    g = fit_grid(W.reshape(5, -1), 4)
    q = g.quantize(W)
    assert q.shape == W.shape
    rows = torch.tensor([1, 3])
    assert torch.equal(g.quantize(W[rows], rows), q[rows])
    assert torch.equal(g.quantize(W.double()).float(), q)


def test_zero_rows_and_per_layer():
    W = torch.randn(4, 10)
    W[2] = 0
    for kw in (dict(), dict(mse=True), dict(pow2=True), dict(mse=True, pow2=True)):
        g = fit_grid(W, 3, **kw)
        assert torch.isfinite(g.scale).all() and (g.scale > 0).all()
        assert (g.quantize(W)[2] == 0).all()
    g = fit_grid(torch.zeros(3, 4), 4)
    assert (g.scale > 0).all()
    g = fit_grid(W, 4, per="layer")
    assert (g.scale == g.scale[0]).all() and g.scale[0] == pytest.approx(W.abs().max().item() / 7)


def _err(W, g, h=None):
    e = (g.quantize(W.double()) - W.double()) ** 2
    return float((e if h is None else e * h).sum())


@pytest.mark.parametrize("bits", [2, 3, 4, 6])
@pytest.mark.parametrize("per", ["channel", "layer"])
def test_mse_grid_not_worse(bits, per):
    torch.manual_seed(1)
    W = torch.randn(16, 64) ** 3                      # heavy tails: clipping pays off
    h = torch.rand(64, dtype=torch.float64)
    for pow2 in (False, True):
        plain = fit_grid(W, bits, per=per, pow2=pow2)
        mse = fit_grid(W, bits, per=per, pow2=pow2, mse=True)
        assert _err(W, mse) <= _err(W, plain) * (1 + 1e-12)
        weighted = fit_grid(W, bits, per=per, pow2=pow2, mse=True, H=h)
        assert _err(W, weighted, h) <= _err(W, plain, h) * (1 + 1e-12)
        Hm = torch.diag(h)                               # a full matrix: its diagonal is used
        assert torch.equal(fit_grid(W, bits, per=per, pow2=pow2, mse=True, H=Hm).scale, weighted.scale)
    assert _err(W, fit_grid(W, bits, per=per, mse=True)) < _err(W, fit_grid(W, bits, per=per))


def test_pow2_scales():
    torch.manual_seed(2)
    W = torch.randn(8, 30) * torch.logspace(-3, 2, 8)[:, None]
    for mse in (False, True):
        g = fit_grid(W, 4, pow2=True, mse=mse)
        e = torch.log2(g.scale.double())
        assert torch.equal(e, torch.round(e))
        q = g.quantize(W)
        assert torch.equal(g.quantize(q), q)
