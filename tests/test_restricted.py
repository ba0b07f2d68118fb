"""The restricted greedy (osbc.solvers.restricted) against brute force, the exact greedy and the SparseGPT sweep."""

import itertools

import numpy as np
import pytest
import torch

from osbc import solvers as S
from osbc.solvers import restricted as support
from osbc.errors import OsbcError
from osbc.solvers import prune_restricted


def np_damped(H, damp=0.01):
    """The documented damping: dead inputs decoupled with unit diagonal, + damp * mean live diagonal."""
    H = 0.5 * (np.array(H, dtype=np.float64) + np.array(H, dtype=np.float64).T)
    dead = np.diag(H) <= 0
    H[dead, :] = 0
    H[:, dead] = 0
    H[dead, dead] = 1.0
    return H + damp * np.diag(H)[~dead].mean() * np.eye(len(H))


def best_loss(w, Hd, keep):
    """min over v supported on ``keep`` of 1/2 (w - v)^T Hd (w - v), by a plain solve."""
    g = Hd @ w
    S_ = np.flatnonzero(keep)
    vs = np.linalg.solve(Hd[np.ix_(S_, S_)], g[S_]) if len(S_) else np.zeros(0)
    return 0.5 * (w @ g - g[S_] @ vs)


def damped_loss(W, W1, H):
    Hd = np_damped(H.numpy())
    dw = (W1 - W).double().numpy()
    return 0.5 * np.einsum("ri,ij,rj->", dw, Hd, dw)


def spike_H(d, seed, n=64, T=12, dead=0.2):
    """2/N sum (K X)^T (K X) for sparse random spike trains X, K a LIF membrane filter (tau = 2)."""
    g = torch.Generator().manual_seed(seed)
    rate = (torch.exp(torch.randn(d, generator=g)) * 0.08).clamp(max=0.9)
    rate[torch.rand(d, generator=g) < dead] = 0
    X = (torch.rand(n, T, d, generator=g) < rate).double()
    u, Y = torch.zeros(n, d, dtype=torch.float64), []
    for t in range(T):
        u = 0.5 * u + 0.5 * X[:, t]
        Y.append(u)
    Y = torch.stack(Y, 1).reshape(-1, d)
    return 2.0 / n * Y.T @ Y


def random_H(d, seed):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(2 * d, d, generator=g, dtype=torch.float64)
    return A.T @ A / d


def weights(R, d, seed, dtype=torch.float32):
    return torch.randn(R, d, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.fixture
def always_restricted(monkeypatch):
    """Never hand over to the exact greedy, however large the candidate set (tiny layers)."""
    monkeypatch.setattr(support, "_EXACT_SHARE", float("inf"))


@pytest.mark.parametrize("cands", ["forward", "sparsegpt"])
@pytest.mark.parametrize("seed", range(4))
def test_brute_force_tiny_rows(seed, cands, always_restricted):
    """One row, d <= 10: the restricted greedy's loss is at least the optimum over all supports,
    and with a candidate set twice the kept one it is within a small factor of it and of the
    exact greedy."""
    d, R = 10, 1
    H = spike_H(d, seed, dead=0.0) if seed % 2 else random_H(d, seed)
    W = weights(R, d, seed, torch.float64)
    Hd = np_damped(H.numpy())
    for sp in (0.5, 0.7, 0.8):
        keep_n = d - round(sp * d)
        opt = min(best_loss(W[0].numpy(), Hd, np.isin(np.arange(d), c))
                  for c in itertools.combinations(range(d), keep_n))
        W1, keep, _ = prune_restricted(W, H, sp, widen=2, candidates=cands)
        W0, _, _ = S.prune_exact(W, H, sp)
        mine, exact = damped_loss(W, W1, H), damped_loss(W, W0, H)
        assert mine >= opt * (1 - 1e-9)
        assert int(keep.sum()) == keep_n
        assert mine <= 1.5 * max(opt, exact) + 1e-12
        # the kept weights are the optimum on the chosen support
        assert mine == pytest.approx(best_loss(W[0].numpy(), Hd, keep[0].numpy()), rel=1e-6)


def test_forward_selection_is_plain_greedy_regression(always_restricted):
    """widen=1 is forward selection: each step adds the input whose addition lowers the loss most,
    each loss from a plain solve on the grown support."""
    d = 12
    H = spike_H(d, 21, dead=0.25)
    W = weights(1, d, 21, torch.float64)
    Hd = np_damped(H.numpy())
    dead = np.diag(H.numpy()) <= 0
    w = W[0].numpy()
    chosen = np.zeros(d, bool)
    for n_keep in range(1, 6):
        cand = [j for j in range(d) if not chosen[j] and not dead[j]]
        j = min(cand, key=lambda j: best_loss(w, Hd, chosen | (np.arange(d) == j)))
        chosen[j] = True
        _, keep, _ = prune_restricted(W, H, 1 - n_keep / d, widen=1)
        assert keep[0].numpy().tolist() == chosen.tolist()


@pytest.mark.parametrize("cands", ["forward", "sparsegpt"])
@pytest.mark.parametrize("dead", [0.0, 0.3])
def test_whole_candidate_set_is_the_exact_greedy(dead, cands, always_restricted):
    """With C = every live input the restricted path is the exact greedy's path."""
    R, d = 6, 24
    H = spike_H(d, 3, dead=dead)
    W = weights(R, d, 3, torch.float64)
    for sp in (0.6, 0.85):
        W1, keep, loss = prune_restricted(W, H, sp, widen=100, candidates=cands)
        W0, keep0, loss0 = S.prune_exact(W, H, sp)
        assert torch.equal(keep, keep0)
        torch.testing.assert_close(W1, W0, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(loss, loss0, rtol=1e-7, atol=1e-12)


@pytest.mark.parametrize("cands", ["forward", "sparsegpt"])
@pytest.mark.parametrize("kind", ["random", "spike"])
def test_not_worse_than_the_sweep_and_close_to_exact(kind, cands):
    R, d = 32, 200
    H = random_H(d, 5) if kind == "random" else spike_H(d, 5)
    W = weights(R, d, 5)
    for sp in (0.9, 0.95, 0.97):
        e_fast = damped_loss(W, S.prune_sparsegpt(W, H, sp)[0], H)
        e_exact = damped_loss(W, S.prune_exact(W, H, sp)[0], H)
        W1, keep, _ = prune_restricted(W, H, sp, candidates=cands, widen=1.5 if cands == "forward" else 3)
        e = damped_loss(W, W1, H)
        assert e <= e_fast * (1 + 1e-6)
        assert e <= 1.05 * e_exact
        assert int((~keep).sum()) == round(sp * R * d)
        assert bool((W1[~keep] == 0).all())


def test_exact_count_and_losses_with_dead_inputs():
    R, d = 20, 150
    H = spike_H(d, 7, dead=0.4)
    W = weights(R, d, 7)
    for sp in (0.0, 0.1, 0.5, 0.9, 0.93, 0.99, 1.0):
        W1, keep, loss = prune_restricted(W, H, sp)
        assert int((~keep).sum()) == round(sp * R * d)
        assert bool((W1[~keep] == 0).all())
        dw = (W1 - W).double()
        ref = 0.5 * ((dw @ H) * dw).sum(1)     # on the undamped H
        torch.testing.assert_close(loss, ref, rtol=1e-4, atol=1e-8)


def test_row_scale():
    R, d = 16, 120
    H = spike_H(d, 9)
    W = weights(R, d, 9)
    base, keep0, loss0 = prune_restricted(W, H, 0.95)
    same, keep1, loss1 = prune_restricted(W, H, 0.95, row_scale=torch.full((R,), 3.0))
    assert torch.equal(keep0, keep1)                   # a uniform scale changes no choice
    torch.testing.assert_close(loss1, 3 * loss0)
    scale = torch.ones(R)
    scale[:4] = 1e4                                    # the first rows matter far more
    _, keep2, _ = prune_restricted(W, H, 0.95, row_scale=scale)
    assert int((~keep2).sum()) == int((~keep0).sum())
    assert int(keep2[:4].sum()) > int(keep0[:4].sum())
    with pytest.raises(OsbcError):
        prune_restricted(W, H, 0.95, row_scale=torch.ones(R + 1))
    with pytest.raises(OsbcError):
        prune_restricted(W, H, 0.95, candidates="magnitude")


def test_nm_pattern():
    R, d = 8, 64
    H = spike_H(d, 11)
    W = weights(R, d, 11)
    W1, keep, _ = prune_restricted(W, H, None, nm=(2, 4))
    assert bool((keep.reshape(R, -1, 4).sum(2) == 2).all())
    W0, keep0, _ = S.prune_exact(W, H, None, nm=(2, 4))
    assert torch.equal(keep, keep0)
    _, keep, _ = prune_restricted(W, [(torch.arange(4), H), (torch.arange(4, 8), spike_H(d, 12))], 0.4, nm=(2, 4))
    assert int((~keep).sum()) == round(0.4 * R * d)
    assert bool((keep.reshape(R, -1, 4).sum(2) >= 2).all())
    with pytest.raises(OsbcError):
        prune_restricted(W, H, 0.6, nm=(2, 4))


def test_nm_partial_last_group():
    """d = 66 with 2:4: the last group has 2 inputs, read as padded with zeros to 4, so it removes
    max(0, 2 - 2) = 0 of them; the full pattern removes 16 * 2 = 32 per row (not 33)."""
    R, d = 5, 66
    H = spike_H(d, 21)
    W = weights(R, d, 21)
    _, keep, _ = prune_restricted(W, H, None, nm=(2, 4))
    assert int((~keep).sum()) == R * 32
    assert bool(keep[:, 64:].all())
    assert torch.equal(keep, S.prune_exact(W, H, None, nm=(2, 4))[1])
    with pytest.raises(OsbcError):
        prune_restricted(W, H, 33 * R / (R * d) + 1e-3, nm=(2, 4))


def test_groups():
    """Per-row groups of Hessians share the layer budget; at low sparsity (the exact greedy) the
    result is the exact greedy's with each row's own H."""
    R, d = 12, 96
    Ha, Hb = spike_H(d, 13), random_H(d, 14)
    rows_b = torch.tensor([1, 4, 5, 9])
    rows_a = torch.tensor([r for r in range(R) if r not in rows_b.tolist()])
    W = weights(R, d, 13)
    per_row = torch.stack([Hb if r in rows_b.tolist() else Ha for r in range(R)])
    groups = [(rows_a, Ha), (rows_b, Hb)]
    _, keep, _ = prune_restricted(W, groups, 0.5)
    _, keep0, _ = S.prune_exact(W, per_row, 0.5)
    assert torch.equal(keep, keep0)
    W1, keep, loss = prune_restricted(W, groups, 0.95)
    assert int((~keep).sum()) == round(0.95 * R * d)
    for rows, Hg in groups:                            # each row's loss on its own H
        dw = (W1[rows] - W[rows]).double()
        torch.testing.assert_close(loss[rows], 0.5 * ((dw @ Hg) * dw).sum(1), rtol=1e-4, atol=1e-8)
    with pytest.raises(OsbcError):
        prune_restricted(W, [(rows_a, Ha)], 0.9)
    with pytest.raises(OsbcError):
        prune_restricted(W, per_row, 0.9)


def test_deterministic():
    R, d = 24, 160
    H = spike_H(d, 15)
    W = weights(R, d, 15)
    a = prune_restricted(W, H, 0.97)
    b = prune_restricted(W, H, 0.97)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    R, d = 32, 256
    H = spike_H(d, 17)
    W = weights(R, d, 17)
    W1, keep, loss = prune_restricted(W, H, 0.97)
    W2, keep2, loss2 = prune_restricted(W.cuda(), H.cuda(), 0.97)
    assert (keep2.cpu() != keep).float().mean() < 0.01
    torch.testing.assert_close(loss2.cpu().sum(), loss.sum(), rtol=1e-2, atol=1e-8)
    assert int((~keep2).sum()) == int((~keep).sum())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_compiled_forward_selection_equals_torch_steps(dtype, monkeypatch):
    """The compiled forward selection (CPU, numba) takes the torch loop's steps: the same inputs
    in the same order and the same gains, on a layer large enough for several worker chunks."""
    pytest.importorskip("numba")
    from osbc.solvers.engine import greedy as engine_greedy
    R, d, steps = 24, 300, 70
    H = spike_H(d, 8, dead=0.2)
    W = weights(R, d, 8, torch.float64)
    Hd, dead, _, _ = support._damped(H, 0.01, "cpu")
    g = W @ Hd
    o_jit, g_jit, _ = support._forward(Hd, g, dead, steps, 2 ** 26, dtype)
    assert engine_greedy._JIT_MOD not in (None, False)
    monkeypatch.setattr(engine_greedy, "_JIT_MOD", False)
    o_t, g_t, _ = support._forward(Hd, g, dead, steps, 2 ** 26, dtype)
    if dtype == torch.float64:
        assert torch.equal(o_jit, o_t)
        torch.testing.assert_close(g_jit, g_t, rtol=1e-9, atol=0.0)
    else:   # float32 rounding may swap near-ties late in the path: compare the early steps and the gains
        assert torch.equal(o_jit[:, :20], o_t[:, :20])
        torch.testing.assert_close(g_jit.sum(1), g_t.sum(1), rtol=1e-3, atol=0.0)
    # every row's chosen inputs are live and distinct
    assert not dead[o_jit].any()
    assert all(len(set(row.tolist())) == steps for row in o_jit)


def test_row_chunks_respect_the_memory_budget():
    """Rows sorted by candidate count and padded to their chunk's largest: every chunk of more
    than one row fits the budget, even when a few rows are far larger than the rest (a trained
    layer's heavy tail once put every row into one chunk padded to the largest)."""
    g = torch.Generator().manual_seed(0)
    size = torch.randint(5, 40, (300,), generator=g)
    size[:7] = torch.tensor([900, 700, 650, 600, 500, 480, 450])
    budget, per_entry, workers = 8 * 2 ** 20, 48, 2
    chunks = support._chunks(size, budget, per_entry, workers)
    assert torch.equal(torch.sort(torch.cat(chunks)).values, torch.arange(300))
    assert len(chunks) >= workers
    for c in chunks:
        if len(c) > 1:
            assert len(c) * per_entry * int(size[c].max()) ** 2 <= budget / workers


def test_rows_that_need_more_steps_are_extended(monkeypatch, always_restricted):
    """One row carries most of the layer's weight, so it takes far more than the average share of
    the candidates: its selection is restarted longer until it fits, and the candidate set equals
    that of one forward selection run to the end on every row."""
    from osbc.solvers.obs import PrunePath, budget_counts
    R, d, sp = 8, 200, 0.9
    H = spike_H(d, 4, dead=0.0)
    W = weights(R, d, 4, torch.float64)
    W[0] *= 30.0
    calls, seen = [], {}
    forward, paths = support._forward, support._restricted_paths

    def counted_forward(*a):
        calls.append(a[3])                      # the steps asked for
        return forward(*a)

    def recorded_paths(W_, Hd, g, cand, *a):
        seen["cand"] = cand.clone()
        return paths(W_, Hd, g, cand, *a)
    monkeypatch.setattr(support, "_forward", counted_forward)
    monkeypatch.setattr(support, "_restricted_paths", recorded_paths)
    prune_restricted(W, H, sp)
    assert len(calls) >= 3 and max(calls) > calls[0]
    Hd, dead, _, _ = support._damped(H, 0.01, "cpu")
    g = W @ Hd
    order, gain, _ = forward(Hd, g, dead, d, 2 ** 26, torch.float64)
    n_cand = round(support.DEFAULT_WIDEN * (R * d - round(sp * R * d)))
    ref = support._prefix(order, budget_counts(PrunePath(order, -gain), n_cand, None), d)
    assert torch.equal(seen["cand"], ref)


@pytest.mark.parametrize("scaled", [False, True])
def test_early_stopped_selection_equals_full_runs(monkeypatch, scaled):
    """Rows beyond the sample stop once their gains fall under a share of the sampled threshold;
    on a layer with rows of very different weight (some taking several times the average share,
    with row_scale one row at 0) the candidate set is exactly that of every row's selection run
    to the end, and some rows did stop early."""
    from osbc.solvers.obs import PrunePath, budget_counts
    R, d, sp = 96, 160, 0.9
    H = spike_H(d, 5, dead=0.1)
    W = weights(R, d, 5, torch.float64) * torch.exp(1.5 * torch.randn(R, 1, generator=torch.Generator().manual_seed(6), dtype=torch.float64))
    scale = torch.rand(R, generator=torch.Generator().manual_seed(7), dtype=torch.float64) + 0.5 if scaled else None
    if scaled:
        scale[3] = 0.0
    seen, early = {}, []
    forward, paths = support._forward, support._restricted_paths

    def watched_forward(Hd, g, dead, steps, *a):
        out = forward(Hd, g, dead, steps, *a)
        early.append(bool((out[2] < min(steps, int((~dead).sum()))).any()))
        return out

    def recorded_paths(W_, Hd, g, cand, *a):
        seen["cand"] = cand.clone()
        return paths(W_, Hd, g, cand, *a)
    monkeypatch.setattr(support, "_forward", watched_forward)
    monkeypatch.setattr(support, "_restricted_paths", recorded_paths)
    prune_restricted(W, H, sp, row_scale=scale)
    assert any(early)
    Hd, dead, _, _ = support._damped(H, 0.01, "cpu")
    order, gain, _ = forward(Hd, W @ Hd, dead, d, 2 ** 26, torch.float64)
    n_cand = round(support.DEFAULT_WIDEN * (R * d - round(sp * R * d)))
    ref = support._prefix(order, budget_counts(PrunePath(order, -gain), n_cand, scale), d)
    assert torch.equal(seen["cand"], ref)


def test_paths_cut_at_the_budget_give_the_full_paths_result(monkeypatch):
    """Each row's removal path is computed only as far as the layer's budget can reach (rows that
    take every computed step are computed again, longer): the same pruned layer as full paths,
    also when the first length is far too short and most rows go again."""
    R, d, sp = 64, 400, 0.85
    monkeypatch.setattr(support, "_PATH_REACH", 0.1)
    H = spike_H(d, 9, dead=0.1)
    W = weights(R, d, 9) * torch.exp(torch.randn(R, 1, generator=torch.Generator().manual_seed(10)))
    paths, calls = support._restricted_paths, []

    def counted(W_, Hd, g, cand, need, *a):
        calls.append(bool((need < cand.sum(1)).any()))
        return paths(W_, Hd, g, cand, need, *a)
    monkeypatch.setattr(support, "_restricted_paths", counted)
    W1, keep1, loss1 = prune_restricted(W, H, sp)
    assert calls[0] and len(calls) > 1                # cut short, and some rows computed again
    monkeypatch.setattr(support, "_restricted_paths",
                        lambda W_, Hd, g, cand, need, *a: paths(W_, Hd, g, cand, cand.sum(1), *a))
    W2, keep2, loss2 = prune_restricted(W, H, sp)
    assert torch.equal(keep1, keep2)
    torch.testing.assert_close(W1, W2)


def test_torch_steps_give_the_compiled_result(monkeypatch):
    """Without numba (and on CUDA) the forward selection runs as batched torch steps with no early
    stops and the submatrices are gathered by torch: the same pruned layer."""
    pytest.importorskip("numba")
    from osbc.solvers.engine import greedy as engine_greedy
    R, d, sp = 48, 300, 0.95
    H = spike_H(d, 11, dead=0.1)
    W = weights(R, d, 11, torch.float64) * torch.exp(torch.randn(R, 1, generator=torch.Generator().manual_seed(12), dtype=torch.float64))
    W1, keep1, loss1 = prune_restricted(W, H, sp)
    monkeypatch.setattr(engine_greedy, "_JIT_MOD", False)
    W2, keep2, loss2 = prune_restricted(W, H, sp)
    assert torch.equal(keep1, keep2)
    torch.testing.assert_close(W1, W2)
    torch.testing.assert_close(loss1, loss2)


def test_rows_with_nothing_to_keep(always_restricted):
    """A zero row and a row whose loss weight is 0 get no candidates (their subproblems are all
    padding): the layer still removes exactly its budget, with finite weights, and keeps nothing
    of those rows."""
    R, d = 40, 300
    H = random_H(d, 13).float()
    W = weights(R, d, 13)
    W[3] = 0.0
    W[7] *= 50.0
    scale = torch.rand(R, generator=torch.Generator().manual_seed(14)) + 0.5
    scale[5] = 0.0
    for sp in (0.9, 0.97):
        W1, keep, _ = prune_restricted(W, H, sp, row_scale=scale)
        assert int((~keep).sum()) == round(sp * R * d)
        assert bool(torch.isfinite(W1).all())
        assert int(keep[3].sum()) == 0 and int(keep[5].sum()) == 0


def test_compiled_first_max_is_numpys_argmax():
    """The compiled steps choose through block maxima: the first position of the maximum (numpy's
    argmax), on lengths around the block size, with many ties and infinities."""
    jit = pytest.importorskip("osbc.solvers.engine.jit")
    rng = np.random.default_rng(0)
    for n in (1, 7, 63, 64, 65, 130, 1000):
        for dtype in (np.float32, np.float64):
            for _ in range(25):
                x = rng.integers(-3, 4, n).astype(dtype)
                x[rng.random(n) < 0.1] = -np.inf
                x[rng.random(n) < 0.02] = np.inf
                bmax = np.empty(-(-n // jit._BLOCK), dtype)
                jit._block_maxima(x, bmax)
                j, best = jit._first_max(x, bmax)
                assert j == int(np.argmax(x)) and best == x.max()
    x = np.full(100, -np.inf, np.float32)          # nothing eligible: the first position
    bmax = np.empty(2, np.float32)
    jit._block_maxima(x, bmax)
    assert jit._first_max(x, bmax)[0] == 0


def test_float32_factor_with_refinement_gives_the_float64_solution():
    """The paths and the kept weights factor H_CC in the layer's float32 and refine v = H_CC^-1 g_C
    in float64: v matches the float64 solve, on an ill-conditioned spike Hessian."""
    R, d = 16, 240
    H = spike_H(d, 31, dead=0.1)
    W = weights(R, d, 31, torch.float64)
    Hd, dead, _, _ = support._damped(H, 0.001, "cpu")          # weak damping: cond(H_CC) ~ 1e4
    g = W @ Hd
    mask = torch.rand(R, d, generator=torch.Generator().manual_seed(3)) < 0.4
    mask &= ~dead
    pos, valid, v64, _ = support._subproblem(Hd, g, mask, torch.float64)
    pos32, _, v32, L32 = support._subproblem(Hd, g, mask, torch.float32)
    assert torch.equal(pos, pos32) and L32.dtype == torch.float32 and v32.dtype == torch.float64
    Hc = Hd[pos[:, :, None], pos[:, None, :]]
    assert float(torch.linalg.cond(Hc[0, :int(valid[0].sum()), :int(valid[0].sum())])) > 1e3
    torch.testing.assert_close(v32, v64, rtol=1e-9, atol=1e-9 * float(v64.abs().max()))


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_wide_speculation_takes_the_same_steps(dtype):
    """The compiled forward selection speculates three columns per pass once a row's factor is
    larger than ``wide`` bytes, one otherwise: the same inputs in the same order, the same gains."""
    jit = pytest.importorskip("osbc.solvers.engine.jit")
    R, d, steps = 6, 260, 90
    H = spike_H(d, 12, dead=0.0)
    Hd, _, _, _ = support._damped(H, 0.01, "cpu")
    G = (weights(R, d, 12, torch.float64) @ Hd).numpy().astype(dtype)
    Ha = Hd.numpy().astype(dtype)
    out = []
    for wide in (0, 2 ** 62, 40 * d * np.dtype(dtype).itemsize):     # always, never, from step 40
        order, gain = np.zeros((R, steps), np.int64), np.zeros((R, steps))
        ran = np.zeros(R, np.int64)
        jit.forward_select(Ha, G, steps, np.full(R, -np.inf), order, gain, ran, wide, np.zeros(0, np.int64),
                           np.zeros(0, np.int64))
        assert (ran == steps).all()
        out.append((order, gain))
    for order, gain in out[1:]:
        np.testing.assert_array_equal(order[:, :40], out[0][0][:, :40])
        if dtype == np.float64:
            np.testing.assert_array_equal(order, out[0][0])
            np.testing.assert_allclose(gain, out[0][1], rtol=1e-9)
        else:
            np.testing.assert_allclose(gain.sum(1), out[0][1].sum(1), rtol=1e-3)


def test_blocks_float32_cannot_factor_fall_back_to_float64():
    """Two inputs equal to float32's precision with almost no damping: the float32 factor fails,
    the chunk is factored in float64, and v is the float64 solve's."""
    d = 6
    A = torch.randn(40, d, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    A[:, 1] = A[:, 0] * (1 + 1e-9)
    Hd = A.T @ A + 1e-10 * torch.eye(d, dtype=torch.float64)
    assert int(torch.linalg.cholesky_ex(Hd.float())[1]) != 0
    g = torch.randn(2, d, generator=torch.Generator().manual_seed(1), dtype=torch.float64) @ Hd
    mask = torch.ones(2, d, dtype=torch.bool)
    _, _, v64, _ = support._subproblem(Hd, g, mask, torch.float64)
    _, _, v32, L = support._subproblem(Hd, g, mask, torch.float32)
    assert L.dtype == torch.float64 and bool(torch.isfinite(v32).all())
    torch.testing.assert_close(v32, v64)


def test_progress_bars_show_both_stages_and_change_nothing(capsys, always_restricted):
    """progress=True draws a bar for the forward selection and one for the paths (stderr) and
    gives the same result as progress=False."""
    R, d = 24, 200
    H = spike_H(d, 41)
    W = weights(R, d, 41)
    on = prune_restricted(W, H, 0.9, progress=True)
    err = capsys.readouterr().err
    assert "forward selection" in err and "restricted OBS" in err
    off = prune_restricted(W, H, 0.9, progress=False)
    assert torch.equal(on[0], off[0]) and torch.equal(on[1], off[1])


def _np_scores(Hd, g, S, live):
    """r_i^2 / s_i of every live input given the support S, by plain solves (the selection's score)."""
    S = list(S)
    Z = np.linalg.solve(Hd[np.ix_(S, S)], Hd[S])
    r = g - Z.T @ g[S]
    s = np.diag(Hd) - (Hd[S] * Z).sum(0)
    sc = np.where(s > 1e-6 * np.diag(Hd), r * r / np.maximum(s, 1e-30), -1.0)
    sc[S] = -2.0
    sc[~live] = -3.0
    return sc


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_pool_stages_pick_among_the_best_scorers_and_compiled_equals_torch(dtype, monkeypatch):
    """Pools in two stages: after t1 steps over all inputs a row goes on among the w1 inputs that
    then score best, after t2 among the w2 best of those: every later pick is one of them (scores
    from plain solves on the picks so far), and the compiled and the torch steps take the same
    inputs."""
    pytest.importorskip("numba")
    from osbc.solvers.engine import greedy as engine_greedy
    R, d, steps = 12, 260, 60
    (t1, w1), (t2, w2) = pools = ((15, 90), (30, 40))
    H = spike_H(d, 9, dead=0.2)
    W = weights(R, d, 9, torch.float64)
    Hd, dead, _, _ = support._damped(H, 0.01, "cpu")
    g = W @ Hd
    o_jit, g_jit, _ = support._forward(Hd, g, dead, steps, 2 ** 26, dtype, pools=pools)
    monkeypatch.setattr(engine_greedy, "_JIT_MOD", False)
    o_t, g_t, _ = support._forward(Hd, g, dead, steps, 2 ** 26, dtype, pools=pools)
    if dtype == torch.float64:
        assert torch.equal(o_jit, o_t)
        torch.testing.assert_close(g_jit, g_t, rtol=1e-9, atol=0.0)
    else:
        assert torch.equal(o_jit[:, :20], o_t[:, :20])
    Hn, live = Hd.numpy(), ~dead.numpy()
    full, _, _ = support._forward(Hd, g, dead, steps, 2 ** 26, dtype)
    differs = []
    for r in range(R):
        o = o_jit[r].tolist()
        assert len(set(o)) == steps and live[o].all()
        assert o[:t1] == full[r, :t1].tolist()          # the first t1 steps: plain selection
        sc = _np_scores(Hn, g[r].numpy(), o[:t1], live)
        first = np.argsort(-sc, kind="stable")[:w1]
        assert set(o[t1:]) <= set(first.tolist())
        sc = _np_scores(Hn, g[r].numpy(), o[:t2], live)
        inside = np.sort(first)          # the pool in position order: ties to the lower position
        second = inside[np.argsort(-sc[inside], kind="stable")[:w2]]
        assert set(o[t2:]) <= set(second.tolist())
        differs.append(o[t1:] != full[r, t1:].tolist())
    assert any(differs)          # the pools are narrow enough to change some row's later picks


@pytest.mark.parametrize("pools", [((3, 1),), ((0, 5), (0, 2)), ((2, 30), (4, 3), (9, 1))])
def test_pools_narrower_than_the_steps_left_never_repeat_an_input(pools, monkeypatch):
    """A pool is never narrower than the steps left (it is widened to them): every row takes
    distinct inputs, compiled and torch steps alike (a row that ran out of pool inputs took one
    twice)."""
    pytest.importorskip("numba")
    from osbc.solvers.engine import greedy as engine_greedy
    R, d, steps = 5, 40, 12
    H = spike_H(d, 21, dead=0.0)
    W = weights(R, d, 21, torch.float64)
    Hd, dead, _, _ = support._damped(H, 0.01, "cpu")
    g = W @ Hd
    o_jit, g_jit, _ = support._forward(Hd, g, dead, steps, 2 ** 26, torch.float64, pools=pools)
    monkeypatch.setattr(engine_greedy, "_JIT_MOD", False)
    o_t, g_t, _ = support._forward(Hd, g, dead, steps, 2 ** 26, torch.float64, pools=pools)
    assert torch.equal(o_jit, o_t)
    torch.testing.assert_close(g_jit, g_t, rtol=1e-9, atol=0.0)
    assert all(len(set(row.tolist())) == steps for row in o_jit)


def test_pool_only_at_low_sparsity(monkeypatch, always_restricted):
    """_select hands _forward pools only where the candidates exceed _POOL_FROM of the live inputs
    per row (low sparsity): there both stages, each narrower than the inputs and the one before."""
    R, d = 16, 400
    H = spike_H(d, 13, dead=0.0)
    W = weights(R, d, 13)
    seen = []
    real = support._forward

    def spy(*a, **kw):
        seen.append(kw.get("pools", a[9] if len(a) > 9 else ()))
        return real(*a, **kw)
    monkeypatch.setattr(support, "_forward", spy)
    prune_restricted(W, H, 0.97)
    assert seen and all(p == () for p in seen)
    seen.clear()
    prune_restricted(W, H, 0.85)
    assert seen and all(len(p) == len(support._POOL_STAGES) for p in seen)
    for (t1, w1), (t2, w2) in seen:
        assert t1 < t2 and w2 < w1 < d


def test_pooled_selection_equals_one_run_per_row(monkeypatch, always_restricted):
    """With the late pool (low sparsity), the candidates are those of one run of every row to the
    nominal length with one set of pool widths: a sampled row (run shorter first) gets the pool every
    other row gets, so its candidates do not depend on having been sampled."""
    from osbc.solvers.obs import PrunePath, budget_counts
    R, d, sp = 64, 400, 0.85
    H = spike_H(d, 17, dead=0.1)
    W = weights(R, d, 17, torch.float64)
    seen, lengths = {}, []
    forward, paths = support._forward, support._restricted_paths

    def watched(Hd, g, dead, steps, *a, **kw):
        lengths.append(steps)
        return forward(Hd, g, dead, steps, *a, **kw)

    def recorded_paths(W_, Hd, g, cand, *a):
        seen["cand"] = cand.clone()
        return paths(W_, Hd, g, cand, *a)
    monkeypatch.setattr(support, "_forward", watched)
    monkeypatch.setattr(support, "_restricted_paths", recorded_paths)
    prune_restricted(W, H, sp)
    Hd, dead, _, _ = support._damped(H, 0.01, "cpu")
    n_live = int((~dead).sum())
    n_cand = round(support.DEFAULT_WIDEN * (R * d - round(sp * R * d)))
    steps = min(d, 3 * -(-n_cand // R) // 2 + 16)
    assert lengths[0] < steps and max(lengths) == steps         # a shorter sample run, no row grew
    pools = support._pool_plan(n_cand / R, n_live, steps)
    assert pools
    order, gain, _ = forward(Hd, W @ Hd, dead, steps, 2 ** 26, torch.float64, pools=pools)
    ref = support._prefix(order, budget_counts(PrunePath(order, -gain), n_cand, None), d)
    assert torch.equal(seen["cand"], ref)


@pytest.mark.parametrize("a,b", [(2.0 ** -100, 1.0), (2.0 ** 100, 1.0), (1.0, 2.0 ** -80), (1.0, 2.0 ** 100),
                                 (2.0 ** -60, 2.0 ** -60), (2.0 ** 40, 2.0 ** 40)])
def test_any_scale_of_weights_and_hessian(a, b):
    """W a and H b (powers of two, so the answer is exactly the scaled one): the same mask, W_new
    a, row losses a^2 b, bit for bit. With groups, one group's H b is the same problem as that
    group's rows weighted by b (the budget compares true losses). The forward selection's float32
    scores r^2 / s would overflow or underflow past about 1e19 / 1e-19 (1e12 weights on a 1e12
    Hessian used to pick garbage; 1e30 weights missed the budget); the solver runs on rows and H
    rescaled by powers of two."""
    R, d = 40, 300
    H, H2 = random_H(d, 15).float(), random_H(d, 16).float() * 3
    W = weights(R, d, 15)
    rs = torch.rand(R, generator=torch.Generator().manual_seed(16)) + 0.5
    rows = [torch.arange(0, R, 2), torch.arange(1, R, 2)]
    for sp in (0.9, 0.97):
        W0, keep0, loss0 = prune_restricted(W, H, sp)
        W1, keep1, loss1 = prune_restricted(W * a, H * b, sp)
        assert torch.equal(keep1, keep0) and torch.equal(W1, W0 * a)
        torch.testing.assert_close(loss1, loss0 * (a * a * b), rtol=1e-12, atol=0)
        weighted = rs.double().clone()
        weighted[rows[0]] *= b
        G0 = prune_restricted(W, [(rows[0], H), (rows[1], H2)], sp, row_scale=weighted)
        G1 = prune_restricted(W * a, [(rows[0], H * b), (rows[1], H2)], sp, row_scale=rs)
        assert torch.equal(G1[1], G0[1]) and torch.equal(G1[0], G0[0] * a)
        torch.testing.assert_close(G1[2], G0[2] * (a * a), rtol=1e-12, atol=0)


def test_hessians_the_exact_greedy_repairs():
    """An indefinite H (no Cholesky factor for its candidate blocks, even damped) and one with an
    infinite entry: restricted hands the layer to the exact greedy, whose damping repairs such a
    matrix (it raised a LinAlgError, or missed the budget with non-finite weights); a NaN weight
    is a one-line OsbcError."""
    R, d = 16, 300
    g = torch.Generator().manual_seed(17)
    A = torch.randn(d, d, generator=g)
    indefinite = (A + A.T) / 2
    inf = random_H(d, 17).float()
    inf[3, 7] = inf[7, 3] = float("inf")
    inf_diagonal = random_H(d, 17).float()
    inf_diagonal[5, 5] = float("inf")
    W = weights(R, d, 17)
    for H in (indefinite, inf, inf_diagonal):
        for sp in (0.9, 0.97):
            W1, keep1, _ = prune_restricted(W, H, sp)
            W2, keep2, _ = S.prune_exact(W, H, sp)
            assert torch.equal(keep1, keep2) and torch.equal(W1, W2)
            assert int((~keep1).sum()) == round(sp * R * d)
    W[2, 5] = float("nan")
    with pytest.raises(OsbcError, match="^prune_restricted: W holds NaN or Inf"):
        prune_restricted(W, random_H(d, 17), 0.9)


def test_forward_selection_workers_fit_max_memory(monkeypatch):
    """Each compiled selection worker holds one row's factor [steps, n] (pools are gathered into
    it): under a max_memory that holds one, one worker runs (never none), with the same result as
    several, pools or not."""
    pytest.importorskip("osbc.solvers.engine.jit")
    R, d, steps = 24, 300, 70
    H = spike_H(d, 18, dead=0.2)
    W = weights(R, d, 18)
    Hd, dead, _, _ = support._damped(H, 0.01, "cpu")
    g = W.double() @ Hd
    seen = []
    real_map = support._map
    monkeypatch.setattr(support, "_map", lambda fn, items, workers: seen.append(workers) or real_map(fn, items, workers))
    monkeypatch.setattr(support, "_workers", lambda device, opts: 2)
    n = int((~dead).sum())
    one_row = 4 * steps * n
    wide = support._forward(Hd, g, dead, steps, 2 ** 30, torch.float32)
    small = support._forward(Hd, g, dead, steps, one_row + 1, torch.float32)
    tiny = support._forward(Hd, g, dead, steps, 1, torch.float32)
    pools = ((20, 120), (40, 60))
    pooled_wide = support._forward(Hd, g, dead, steps, 2 ** 30, torch.float32, pools=pools)
    pooled_small = support._forward(Hd, g, dead, steps, one_row + 1, torch.float32, pools=pools)
    assert seen == [2, 1, 1, 2, 1]
    for a, b in zip(wide, small):
        assert torch.equal(a, b)
    for a, b in zip(wide, tiny):
        assert torch.equal(a, b)
    for a, b in zip(pooled_wide, pooled_small):
        assert torch.equal(a, b)
    assert not torch.equal(pooled_wide[0], wide[0])
