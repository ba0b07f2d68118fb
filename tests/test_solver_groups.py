"""Grouped Hessians ((rows, H) pairs), the per-row OBQ/GPTQ choice and the engine's counters."""

import pytest
import torch

from osbc import solvers as S
from osbc.errors import OsbcError
from osbc.quant import fit_grid


def spike_H(d, seed, p=0.3):
    g = torch.Generator().manual_seed(seed)
    X = (torch.rand(3 * d, d, generator=g) < p).double()
    return X.T @ X


@pytest.fixture
def layer():
    torch.manual_seed(0)
    R, d = 9, 16
    W = torch.randn(R, d, dtype=torch.float64)
    rows = [torch.tensor([0, 3, 4, 8]), torch.tensor([1, 2, 5, 6, 7])]
    Hs = [spike_H(d, 1), spike_H(d, 2)]
    return W, list(zip(rows, Hs))


def test_grouped_equals_each_group_alone(layer):
    W, gs = layer
    p = S.obs_path(W, gs)
    keep = torch.rand(W.shape, generator=torch.Generator().manual_seed(3)) > 0.5
    sos = S.solve_on_support(W, gs, keep)
    g = fit_grid(W, 3)
    gptq, obq = S.quantize_gptq(W, gs, g), S.quantize_obq(W, gs, g)
    for rows, H in gs:
        ref = S.obs_path(W[rows], H)
        assert torch.equal(p.order[rows], ref.order) and torch.equal(p.loss[rows], ref.loss)
        assert torch.equal(sos[rows], S.solve_on_support(W[rows], H, keep[rows]))
        assert torch.equal(gptq[rows], S.quantize_gptq(W[rows], H, g.select(rows)))
        assert torch.equal(obq[rows], S.quantize_obq(W[rows], H, g.select(rows)))


def test_grouped_prune_exact_takes_the_layer_budget(layer):
    """One budget over all groups: the k cheapest steps of the merged paths (row scale included),
    then each group's closed form; the per-row [R, d, d] form of the same Hessians agrees."""
    W, gs = layer
    R, d = W.shape
    scale = torch.linspace(0.5, 2.0, R, dtype=torch.float64)
    for sp in (0.3, 0.8):                       # a truncated path (extended rows) and a full one
        Wn, keep, losses = S.prune_exact(W, gs, sp, row_scale=scale)
        assert int((~keep).sum()) == round(sp * R * d)
        Hr = torch.empty(R, d, d, dtype=torch.float64)
        for rows, H in gs:
            Hr[rows] = H
        Wr, keep_r, losses_r = S.prune_exact(W, Hr, sp, row_scale=scale)
        assert torch.equal(keep, keep_r)
        torch.testing.assert_close(Wn, Wr, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(losses, losses_r, rtol=1e-9, atol=1e-12)
    path = S.obs_path(W, gs, row_scale=scale)
    counts = S.budget_counts(path, 40)
    Wc, keep_c, _ = S.prune_exact(W, gs, None, path=path, counts=counts)
    assert torch.equal((~keep_c).sum(1), counts)
    with pytest.raises(OsbcError, match="path"):
        S.prune_exact(W, gs, None, counts=counts)


def test_quantize_exact_keeps_each_rows_better_solver(layer):
    W, gs = layer
    g = fit_grid(W, 2)
    best = S.quantize_exact(W, gs, g)
    for rows, H in gs:
        a, b = S.quantize_obq(W[rows], H, g.select(rows)), S.quantize_gptq(W[rows], H, g.select(rows))

        def err(q):
            dw = q - W[rows]
            return ((dw @ H) * dw).sum(1)
        e = err(best[rows])
        assert torch.all(e <= torch.minimum(err(a), err(b)) + 1e-12)
        assert all(torch.equal(best[r], a[i]) or torch.equal(best[r], b[i]) for i, r in enumerate(rows.tolist()))


def test_engine_stats_count_the_greedy_flops():
    torch.manual_seed(1)
    W, H = torch.randn(6, 30), spike_H(30, 4)
    counts = []
    for workers in (1, 2):
        st = S.EngineStats()
        S.obs_path(W, H, options=S.EngineOptions(workers=workers, ucache=1 << 40), stats=st)   # fixed batches
        counts.append(st.flops)
    assert counts[0] > 0 and counts[0] == counts[1]       # the same work however the chunks run
    st = S.EngineStats()
    S.quantize_obq(W, H, fit_grid(W, 4), stats=st)
    assert st.flops > 0
    with pytest.raises(ValueError, match="lazy"):
        S.EngineOptions(lazy=0)
