"""solver="refined": GPTQ followed by exact coordinate descent on the grid (osbc.solvers.refine)."""

import itertools

import pytest
import torch

import osbc
from osbc import solvers as S
from osbc.cli import build_parser
from osbc.config import PruneConfig, QuantConfig
from osbc.errors import OsbcError
from osbc.quant import fit_grid

from helpers import MLP, spikes


def spd(d, seed, p=0.3):
    """A spike-count Hessian X^T X (positive definite for 3d samples at this rate)."""
    g = torch.Generator().manual_seed(seed)
    X = (torch.rand(3 * d, d, generator=g) < p).double()
    return X.T @ X


def layer(R, d, seed=0):
    return torch.randn(R, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64), spd(d, seed + 1)


def row_loss(Q, W, H):
    dw = (Q - W).double()
    return ((dw @ H.double()) * dw).sum(1)


def test_tiny_rows_between_the_optimum_and_gptq():
    """2 bits (codes -1, 0, 1), d = 6: every one of the 3^6 grid assignments enumerated."""
    W, H = layer(5, 6)
    g = fit_grid(W, 2)
    Q = S.quantize_refined(W, H, g, damp=0.0, passes=50)
    gptq = S.quantize_gptq(W, H, g, damp=0.0)
    codes = torch.tensor(list(itertools.product((-1.0, 0.0, 1.0), repeat=6)), dtype=torch.float64)
    for r in range(W.shape[0]):
        cand = codes * g.scale[r].double()
        best = float(row_loss(cand, W[r].expand_as(cand), H).min())
        got = float(row_loss(Q[r:r + 1], W[r:r + 1], H))
        assert best - 1e-9 <= got <= float(row_loss(gptq[r:r + 1], W[r:r + 1], H)) + 1e-12


def test_converged_result_is_coordinatewise_optimal():
    """After enough passes no single weight can move to another grid point and lower its row's loss."""
    W, H = layer(6, 12, seed=3)
    g = fit_grid(W, 3)
    Q = S.quantize_refined(W, H, g, damp=0.0, passes=100)
    base = row_loss(Q, W, H)
    for j in range(W.shape[1]):
        for c in range(g.qmin, g.qmax + 1):
            Q2 = Q.clone()
            Q2[:, j] = c * g.scale.double()
            assert bool((row_loss(Q2, W, H) >= base - 1e-9 * base.abs().clamp_min(1)).all())


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_never_worse_than_gptq_row_by_row_and_on_the_grid(bits, dtype):
    W, H = layer(24, 40, seed=bits)
    W = W.to(dtype)
    g = fit_grid(W, bits)
    Q = S.quantize_refined(W, H, g)
    assert Q.dtype == dtype
    assert torch.equal(g.quantize(Q), Q)
    Hd = H + 0.01 * H.diagonal().mean() * torch.eye(H.shape[0], dtype=H.dtype)   # the damped objective
    ref, got = row_loss(S.quantize_gptq(W, H, g), W, Hd), row_loss(Q, W, Hd)
    assert bool((got <= ref * (1 + 1e-5)).all())
    assert float(got.sum()) < float(ref.sum())      # and it does improve on it


def test_exact_start_never_above_exact_row_by_row():
    """Both starts refined, per row the best of four: never above quantize_exact (OBQ or GPTQ per
    row) in its own measure, and below it on the layer."""
    W = torch.randn(12, 24, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    H = spd(24, 9)
    keep = torch.rand(W.shape, generator=torch.Generator().manual_seed(5)) > 0.2
    W = W * keep
    g = fit_grid(W, 2)
    Q = S.quantize_refined(W, H, g, start="exact", keep_mask=keep)
    ex = S.quantize_exact(W, H, g, keep_mask=keep)
    assert bool((Q[~keep] == 0).all()) and torch.equal(g.quantize(Q), Q)
    assert bool((row_loss(Q, W, H) <= row_loss(ex, W, H)).all())
    assert float(row_loss(Q, W, H).sum()) < float(row_loss(ex, W, H).sum())
    assert bool((row_loss(Q, W, H) <= row_loss(S.quantize_refined(W, H, g, keep_mask=keep), W, H)).all())
    with pytest.raises(OsbcError, match="start"):
        S.quantize_refined(W, H, g, start="obq")


def test_zero_passes_is_gptq():
    W, H = layer(8, 20)
    g = fit_grid(W, 3)
    assert torch.equal(S.quantize_refined(W, H, g, passes=0), S.quantize_gptq(W, H, g))


def test_pruned_weights_stay_zero():
    W, H = layer(10, 30, seed=5)
    keep = torch.rand(W.shape, generator=torch.Generator().manual_seed(6)) > 0.4
    W = W * keep
    g = fit_grid(W, 2)
    Q = S.quantize_refined(W, H, g, keep_mask=keep)
    assert bool((Q[~keep] == 0).all())
    assert torch.equal(g.quantize(Q), Q)
    assert float(row_loss(Q, W, H).sum()) <= float(row_loss(S.quantize_gptq(W, H, g, keep_mask=keep), W, H).sum())


def test_refine_from_any_start_never_raises_the_loss():
    W, H = layer(7, 16, seed=8)
    g = fit_grid(W, 3)
    keep = torch.ones_like(W, dtype=torch.bool)
    keep[:, :4] = False
    Q0 = S.quantize_rtn(W, g, keep_mask=keep)
    Q = S.refine_on_grid(W, H, g, Q0, keep_mask=keep, damp=0.0)
    assert bool((Q[:, :4] == 0).all())
    assert bool((row_loss(Q, W, H) <= row_loss(Q0, W, H) + 1e-12).all())
    assert float(row_loss(Q, W, H).sum()) < float(row_loss(Q0, W, H).sum())
    with pytest.raises(OsbcError, match="shape"):
        S.refine_on_grid(W, H, g, Q0[:, :3])


def test_groups_equal_each_group_alone():
    W = torch.randn(9, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    rows = [torch.tensor([0, 3, 4, 8]), torch.tensor([1, 2, 5, 6, 7])]
    gs = list(zip(rows, [spd(16, 1), spd(16, 2)]))
    g = fit_grid(W, 3)
    for start in ("gptq", "exact"):
        Q = S.quantize_refined(W, gs, g, start=start)
        for r, H in gs:
            assert torch.equal(Q[r], S.quantize_refined(W[r], H, g.select(r), start=start))


def test_deterministic_and_chunking_does_not_change_the_result():
    W, H = layer(32, 48, seed=11)
    g = fit_grid(W, 2)
    a = S.quantize_refined(W, H, g)
    assert torch.equal(a, S.quantize_refined(W, H, g))
    small = S.quantize_refined(W, H, g, max_memory=5 * 8 * 48 * 8)     # chunks of a few rows
    assert torch.equal(small, a)


def test_per_row_hessians_are_refused():
    W, H = layer(3, 8)
    with pytest.raises(OsbcError, match="shared H"):
        S.quantize_refined(W, H.expand(3, 8, 8).clone(), fit_grid(W, 3))
    with pytest.raises(OsbcError, match="passes"):
        S.quantize_refined(W, H, fit_grid(W, 3), passes=-1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("start", ["gptq", "exact"])
def test_cuda_matches_cpu(start):
    W, H = layer(64, 96, seed=2)
    g = fit_grid(W, 2)
    cpu = S.quantize_refined(W, H, g, start=start)
    gpu = S.quantize_refined(W.cuda(), H.cuda(), g.to("cuda"), start=start)
    assert gpu.device.type == "cuda"
    lc, lg = row_loss(cpu, W, H), row_loss(gpu.cpu(), W, H)
    assert torch.allclose(lc, lg, rtol=1e-9)
    assert float((gpu.cpu() == cpu).double().mean()) > 0.999


def small_mlp(seed=0):
    torch.manual_seed(seed)
    m = MLP(d_in=120, hidden=48, out=10)
    with torch.no_grad():
        m.fc1.weight.mul_(3.0)
        m.fc2.weight.mul_(3.0)
    return m


@pytest.mark.parametrize("R, d, seconds, want", [
    (256, 2312, 60.0, "exact-refined"),       # the digits MLP's first layer: exact ~21 s
    (512, 4608, 60.0, "refined"),             # exact ~330 s
    (256, 2312, 10.0, "refined"),             # a tighter budget
])
def test_auto_rule_for_quantization(R, d, seconds, want):
    from osbc.compress import auto_solver
    assert auto_solver(R, d, 1.0, pruning=False, seconds=seconds) == want


def test_quantize_end_to_end_and_auto():
    calib = spikes(48, 8, 120, rate=0.15, dead=0.2)
    solvers = ("fast", "exact", "refined", "exact-refined", "auto")
    res = {s: osbc.quantize(small_mlp(), calib, bits=2, solver=s, verbose=False) for s in solvers}
    for s in ("refined", "exact-refined"):
        assert [l.solver for l in res[s].report] == [s, s]
    assert [l.solver for l in res["auto"].report] == ["exact-refined"] * 2     # small layers: exact affordable
    for name in ("fc1", "fc2"):
        for s in ("refined", "exact-refined"):
            w = getattr(res[s].model, name).weight.detach()
            g = fit_grid(getattr(small_mlp(), name).weight.detach(), 2)
            assert torch.equal(g.quantize(w), w)
        assert torch.equal(getattr(res["auto"].model, name).weight, getattr(res["exact-refined"].model, name).weight)
    # fc1 sees the dense inputs in every run, so its membrane error is the solvers' own objective
    err = {s: r.report.layers[0].membrane_error for s, r in res.items()}
    assert err["refined"] < err["fast"] and err["exact-refined"] < err["exact"]


def test_cli_offers_refined_for_quantize_only(capsys):
    p = build_parser()
    args = p.parse_args(["quantize", "--model", "m.safetensors", "--bits", "2", "--out", "q.safetensors",
                         "--solver", "refined"])
    assert args.solver == "refined"
    with pytest.raises(SystemExit):
        p.parse_args(["prune", "--model", "m.safetensors", "--sparsity", "0.9", "--out", "p.safetensors",
                      "--solver", "refined"])
    assert "invalid choice: 'refined'" in capsys.readouterr().err
    assert QuantConfig(solver="exact-refined").solver == "exact-refined"
    for s in ("refined", "exact-refined"):
        with pytest.raises(OsbcError, match="solver"):
            PruneConfig(solver=s)
