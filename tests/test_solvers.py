"""Solvers against independent computations (numpy, brute force, a plain greedy written here)."""

import importlib.util

import numpy as np
import pytest
import torch

from osbc import solvers as S
from osbc.errors import OsbcError
from osbc.quant import fit_grid
from osbc.solvers import reference
from osbc.solvers.engine import greedy as engine_greedy
from osbc.solvers.damping import _damped as damped_factor
from osbc.solvers.engine.lazy import _Lazy
from osbc.solvers.obs import _keep_from_counts as keep_from_counts
from osbc.solvers.sweep import _hinv_upper as hinv_upper


# ---- independent references -------------------------------------------------------------------

np_damped = reference.damped      # the documented damping


def plain_greedy(w, H, damp=0.01, nm=None, block=1, steps=None):
    """OBS written plainly: explicit inverse, one rank-1 (or rank-k) downdate per step.
    Returns order, running-max loss, and the weights after each step."""
    w = np.array(w, dtype=np.float64).copy()
    d = len(w)
    Hd, dead = np_damped(H, damp)
    Hinv = np.linalg.inv(Hd)
    removed = np.zeros(d, bool)
    order, loss, states = [], [], []
    if nm:
        n, m = nm
        cap = m - n
        cnt = np.zeros((d + m - 1) // m, int)
        cnt[-1] = -d % m            # a partial last group: its padding counts as removed
    for i in np.nonzero(dead)[0]:
        if nm and cnt[i // m] >= cap:
            continue
        order.append(i), loss.append(0.0)
        removed[i] = True
        w[i] = 0
        states.append(w.copy())
        if nm:
            cnt[i // m] += 1
    while True:
        elig = ~removed
        if nm:
            elig &= cnt[np.arange(d) // m] < cap
        if not elig.any() or (steps is not None and len(order) >= steps):
            break
        with np.errstate(divide="ignore", invalid="ignore"):
            sc = np.where(elig, w ** 2 / np.diag(Hinv), np.inf)
        P = []
        taken = {}
        for i in np.argsort(sc, kind="stable"):
            if not np.isfinite(sc[i]) or len(P) == block:
                break
            if nm:
                g = i // m
                if cnt[g] + taken.get(g, 0) >= cap:
                    continue
                taken[g] = taken.get(g, 0) + 1
            P.append(i)
        P = np.array(P)
        A = Hinv[np.ix_(P, P)]
        o = np.argsort(sc[P], kind="stable")
        order += list(P[o])
        loss += list((w[P] ** 2 / (2 * np.diag(A)))[o])
        w -= Hinv[:, P] @ np.linalg.solve(A, w[P])
        w[P] = 0
        Hinv = Hinv - Hinv[:, P] @ np.linalg.solve(A, Hinv[P, :])
        removed[P] = True
        if nm:
            for i in P:
                cnt[i // m] += 1
        states.append(w.copy())
    return np.array(order), np.maximum.accumulate(np.array(loss)), states


def constrained_lstsq(w0, H, keep, damp=0.01):
    """min (w - w0)^T Hd (w - w0) with w = 0 off `keep`, as a least-squares problem in numpy."""
    Hd, _ = np_damped(H, damp)
    Lt = np.linalg.cholesky(Hd).T          # Hd = Lt^T Lt, so the loss is |Lt (w - w0)|^2
    S_ = np.nonzero(keep)[0]
    w = np.zeros_like(w0)
    if len(S_):
        x, *_ = np.linalg.lstsq(Lt[:, S_], Lt @ w0, rcond=None)
        w[S_] = x
    return w


def spike_H(d, n=None, p=0.3, dead=(), seed=0, rank=None):
    g = torch.Generator().manual_seed(seed)
    X = (torch.rand(n or 3 * d, d, generator=g) < p).double()
    X[:, list(dead)] = 0
    if rank is not None:
        X = X[:rank]
    return X.T @ X


def herr(W0, W1, H):
    dw = (W1 - W0).double()
    return float(((dw @ H.double()) * dw).sum())


STEPS = ["jit", "torch"] if importlib.util.find_spec("numba") else ["torch"]


@pytest.fixture(params=[(w, st) for st in STEPS for w in (1, 2)], ids=lambda p: f"{p[0]}worker-{p[1]}")
def small_lazy(request):
    """Engine options with a tiny lazy batch and flush panel, so short paths exercise many flushes,
    compactions, panel boundaries and mirrors; with one worker and with two concurrent ones; with
    the compiled steps (engine.jit) and with the torch ones."""
    workers, steps = request.param
    threads = torch.get_num_threads()
    if workers > threads:           # the engine runs at most one worker per intra-op thread
        torch.set_num_threads(workers)
    yield S.EngineOptions(lazy=3, lazy_jit=3, panel=5, workers=workers, jit=steps == "jit")
    torch.set_num_threads(threads)


# ---- damping ---------------------------------------------------------------------------------

def test_damp_inverse_shared_and_per_row():
    H = spike_H(9, dead=(3,))
    Hinv, dead = S.damp_inverse(H)
    Hd, dead_np = np_damped(H.numpy())
    np.testing.assert_allclose(Hinv.numpy(), np.linalg.inv(Hd), rtol=1e-10, atol=1e-12)
    assert dead.tolist() == dead_np.tolist()
    Hs = torch.stack([spike_H(9, seed=s) for s in range(3)])
    Hinv, dead = S.damp_inverse(Hs)
    for r in range(3):
        np.testing.assert_allclose(Hinv[r].numpy(), np.linalg.inv(np_damped(Hs[r].numpy())[0]), rtol=1e-9)


@pytest.mark.parametrize("H", [torch.zeros(6, 6), -torch.eye(6), torch.ones(6, 6),
                               torch.full((6, 6), float("nan"))])
def test_damp_inverse_never_fails(H):
    Hinv, dead = S.damp_inverse(H, damp=0.0)
    assert torch.isfinite(Hinv).all()


# ---- exact path ------------------------------------------------------------------------------

def test_first_pick_is_brute_force_best():
    torch.manual_seed(0)
    d = 8
    H = spike_H(d, p=0.5)
    Hd, _ = np_damped(H.numpy())
    W = torch.randn(5, d, dtype=torch.float64)
    p = S.obs_path(W, H)
    for r in range(5):
        w0 = W[r].numpy()
        costs = []
        for q in range(d):                      # every single removal with optimal compensation
            keep = np.ones(d, bool)
            keep[q] = False
            w = constrained_lstsq(w0, H.numpy(), keep)
            costs.append(0.5 * (w - w0) @ Hd @ (w - w0))
        assert int(p.order[r, 0]) == int(np.argmin(costs))
        assert p.loss[r, 0].item() == pytest.approx(min(costs), rel=1e-9)


def test_greedy_weights_are_lstsq_optimum_on_support():
    torch.manual_seed(1)
    d = 10
    H = spike_H(d, p=0.4)
    W = torch.randn(4, d, dtype=torch.float64)
    p = S.obs_path(W, H)
    for r in range(4):
        _, _, states = plain_greedy(W[r].numpy(), H.numpy())
        for k in (1, 4, 7, 9):
            keep = np.ones(d, bool)
            keep[p.order[r, :k].numpy()] = False
            ref = constrained_lstsq(W[r].numpy(), H.numpy(), keep)
            np.testing.assert_allclose(states[k - 1], ref, atol=1e-9)
            got = S.solve_on_support(W[r:r + 1], H, torch.tensor(keep)[None])[0].numpy()
            np.testing.assert_allclose(got, ref, atol=1e-9)


@pytest.mark.parametrize("frac", [0.1, 0.5, 0.9])
def test_solve_on_support_brute_force(frac):
    torch.manual_seed(2)
    R, d = 6, 10
    H = spike_H(d, p=0.4, dead=(4,))
    W = torch.randn(R, d, dtype=torch.float64)
    keep = torch.rand(R, d) > frac
    keep[0] = True
    keep[1] = False
    out = S.solve_on_support(W, H, keep)
    for r in range(R):
        np.testing.assert_allclose(out[r].numpy(), constrained_lstsq(W[r].numpy(), H.numpy(), keep[r].numpy()),
                                   atol=1e-9)
    Hs = torch.stack([spike_H(d, seed=s) for s in range(R)])       # per-row H, tiny chunks
    out = S.solve_on_support(W, Hs, keep, max_memory=4000)
    for r in range(R):
        np.testing.assert_allclose(out[r].numpy(), constrained_lstsq(W[r].numpy(), Hs[r].numpy(), keep[r].numpy()),
                                   atol=1e-9)


@pytest.mark.parametrize("kw", [dict(), dict(nm=(2, 4)), dict(nm=(1, 3)), dict(block=3), dict(block=4, nm=(1, 4))])
def test_lazy_path_equals_plain_greedy(small_lazy, kw):
    torch.manual_seed(3)
    R, d = 7, 26                                      # d % 4 != 0: a partial N:M group
    H = spike_H(d, dead=(2, 5, 11), p=0.35)
    W = torch.randn(R, d, dtype=torch.float64)
    W[0, 7] = 0.0
    p = S.obs_path(W, H, max_memory=8 * (d * d + 3 * d + 16 * d) * 3, options=small_lazy, **kw)   # chunks of 3 rows
    for r in range(R):
        o, l, _ = plain_greedy(W[r].numpy(), H.numpy(), nm=kw.get("nm"), block=kw.get("block", 1))
        assert p.order[r].tolist() == o.tolist()
        np.testing.assert_allclose(p.loss[r].numpy(), l, rtol=1e-8, atol=1e-14)


def test_lazy_path_per_row_hessian(small_lazy):
    torch.manual_seed(4)
    R, d = 5, 20
    Hs = torch.stack([spike_H(d, seed=s, dead=(1, 9)) for s in range(R)])
    W = torch.randn(R, d, dtype=torch.float64)
    p = S.obs_path(W, Hs, max_memory=1, options=small_lazy)                # one row per chunk
    for r in range(R):
        o, l, _ = reference.greedy_path(W[r].numpy(), Hs[r].numpy())
        assert p.order[r].tolist() == o.tolist()
        np.testing.assert_allclose(p.loss[r].numpy(), l, rtol=1e-8)


def test_per_row_dead_inputs_first(small_lazy):
    R, d = 3, 12
    Hs = torch.stack([spike_H(d, seed=s, dead=dd) for s, dd in enumerate([(0, 5), (5,), (3, 7, 8)])])
    W = torch.randn(R, d, dtype=torch.float64)
    p = S.obs_path(W, Hs, options=small_lazy)
    for r, dd in enumerate([(0, 5), (5,), (3, 7, 8)]):
        assert sorted(p.order[r, :len(dd)].tolist()) == list(dd)
        assert (p.loss[r, :len(dd)] == 0).all()
        o, l, _ = reference.greedy_path(W[r].numpy(), Hs[r].numpy())
        assert p.order[r, len(dd):].tolist() == o[len(dd):].tolist()


def test_block_engine_with_k1_equals_exact(small_lazy):
    """The k-per-step engine with k = 1 takes the one-per-step engine's steps."""
    torch.manual_seed(5)
    c, d = 6, 18
    W = torch.randn(c, d, dtype=torch.float64)
    Hinv = S.damp_inverse(spike_H(d))[0]
    out = []
    for block in (False, True):
        lz = _Lazy(Hinv.expand(c, d, d).clone(), small_lazy.lazy, panel=small_lazy.panel)
        args = (lz, W.clone(), torch.zeros(c, d, dtype=W.dtype), torch.arange(d).expand(c, d).contiguous(), d)
        if block:
            out.append(engine_greedy._greedy_block(*args, 1))
        else:
            out.append(engine_greedy._greedy(*args, small_lazy)[:3])
    (q0, e0, d0), (q1, e1, d1) = out
    assert torch.equal(q0, q1)
    torch.testing.assert_close(e0 ** 2 / d0, e1 ** 2 / d1, rtol=1e-10, atol=1e-14)


def test_float32_path_matches_float64():
    torch.manual_seed(6)
    W = torch.randn(8, 40, dtype=torch.float64)
    H = spike_H(40, dead=(0, 1), p=0.3)
    p64 = S.obs_path(W, H)
    p32 = S.obs_path(W.float(), H.float())
    assert (p32.order == p64.order).float().mean() > 0.95
    torch.testing.assert_close(p32.loss, p64.loss, rtol=1e-3, atol=1e-6)


def test_max_steps_is_prefix():
    torch.manual_seed(7)
    W = torch.randn(5, 30)
    H = spike_H(30, dead=(4, 6))
    full = S.obs_path(W, H)
    part = S.obs_path(W, H, max_steps=11)
    assert part.order.shape == (5, 11)
    assert torch.equal(part.order, full.order[:, :11])


# ---- budgets, pruning ------------------------------------------------------------------------

def test_budget_counts_brute_force():
    g = torch.Generator().manual_seed(8)
    R, Sn = 6, 9
    loss = torch.rand(R, Sn, generator=g, dtype=torch.float64).cummax(1).values
    loss[2] = 0.5                                  # ties inside a row and across rows
    scale = torch.rand(R, generator=g, dtype=torch.float64) + 0.5
    path = S.PrunePath(torch.arange(Sn).repeat(R, 1), loss)
    for k in range(R * Sn + 1):
        c = S.budget_counts(path, k, scale)
        assert int(c.sum()) == k
        vals = sorted(((loss[r, s] * scale[r]).item(), r, s) for r in range(R) for s in range(Sn))
        ref = torch.zeros(R, dtype=torch.int64)
        for _, r, _s in vals[:k]:
            ref[r] += 1
        # same multiset of selected values (ties may be broken differently) and each row a prefix
        chosen = sorted((loss[r, s] * scale[r]).item() for r in range(R) for s in range(int(c[r])))
        assert chosen == pytest.approx([v for v, _, _ in vals[:k]])
        if len({v for v, _, _ in vals}) == len(vals):
            assert torch.equal(c, ref)
    with pytest.raises(ValueError):
        S.budget_counts(path, R * Sn + 1)


@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.5, 0.83, 0.97, 1.0])
def test_achieved_sparsity_is_exact(sparsity):
    torch.manual_seed(9)
    R, d = 12, 37
    H = spike_H(d, dead=(0, 3, 30))
    W = torch.randn(R, d)
    k = round(sparsity * R * d)
    for fn in (lambda: S.prune_exact(W, H, sparsity)[1], lambda: S.prune_exact(W, H, sparsity, block=5)[1],
               lambda: S.prune_sparsegpt(W, H, sparsity, blocksize=8)[1], lambda: S.prune_magnitude(W, sparsity)[1]):
        keep = fn()
        assert int((~keep).sum()) == k


def test_prune_exact_matches_full_path_budget():
    """prune_exact computes only part of the path (and extends rows that need more): the result must
    equal budgeting on the full path."""
    torch.manual_seed(10)
    R, d = 16, 40
    H = spike_H(d, dead=(1,))
    W = torch.randn(R, d, dtype=torch.float64)
    W[3] *= 0.01                                   # a row that wants far more than the average budget
    scale = torch.rand(R, dtype=torch.float64) + 0.1
    for sp in (0.2, 0.5):
        Wn, keep, rl = S.prune_exact(W, H, sp, row_scale=scale)
        full = S.obs_path(W, H)
        c = S.budget_counts(full, round(sp * R * d), scale)
        ref_keep = keep_from_counts(full.order, c, d)
        assert torch.equal(keep, ref_keep)
        torch.testing.assert_close(Wn, S.solve_on_support(W, H, ref_keep))
        dw = Wn - W
        torch.testing.assert_close(rl, 0.5 * ((dw @ H) * dw).sum(1) * scale)


def test_dead_inputs_go_first():
    torch.manual_seed(11)
    R, d = 6, 15
    dead = (2, 7, 8)
    H = spike_H(d, dead=dead)
    W = torch.randn(R, d)
    p = S.obs_path(W, H)
    assert (p.order[:, :3] == torch.tensor(dead)).all() and (p.loss[:, :3] == 0).all()
    for keep in (S.prune_exact(W, H, 3 / d)[1], S.prune_sparsegpt(W, H, 3 / d)[1]):
        assert (~keep[:, list(dead)]).all() and int((~keep).sum()) == 3 * R
    keep = S.prune_sparsegpt(W, H, 1 / d)[1]      # fewer than the dead weights: only dead ones go
    assert (~keep).sum() == R and (keep[:, [i for i in range(d) if i not in dead]]).all()


@pytest.mark.parametrize("nm", [(2, 4), (1, 4), (3, 8)])
def test_nm_pattern(nm):
    torch.manual_seed(12)
    R, d = 8, 26
    n, m = nm
    H = spike_H(d, dead=(0, 1, 2, 9))
    W = torch.randn(R, d)
    for keep in (S.prune_exact(W, H, None, nm=nm)[1], S.prune_exact(W, H, None, nm=nm, block=3)[1],
                 S.prune_sparsegpt(W, H, None, nm=nm, blocksize=8)[1], S.prune_magnitude(W, None, nm=nm)[1],
                 S.prune_exact(W, H, 0.3, nm=nm)[1], S.prune_sparsegpt(W, H, 0.3, nm=nm, blocksize=8)[1],
                 S.prune_magnitude(W, 0.3, nm=nm)[1]):
        pad = torch.ones(R, (d + m - 1) // m * m, dtype=torch.bool)
        pad[:, :d] = keep
        removed = (~pad).view(R, -1, m).sum(2)
        assert (removed <= m - n).all()
    for keep in (S.prune_exact(W, H, 0.3, nm=nm)[1], S.prune_sparsegpt(W, H, 0.3, nm=nm)[1],
                 S.prune_magnitude(W, 0.3, nm=nm)[1]):
        assert int((~keep).sum()) == round(0.3 * R * d)
    # the full pattern: every group of m keeps exactly n, a partial last one min(its size, n)
    sizes = torch.tensor([min(m, d - g) for g in range(0, d, m)])
    for full in (S.prune_exact(W, H, None, nm=nm)[1], S.prune_exact(W, H, None, nm=nm, block=3)[1],
                 S.prune_sparsegpt(W, H, None, nm=nm, blocksize=8)[1], S.prune_magnitude(W, None, nm=nm)[1]):
        pad = torch.zeros(R, (d + m - 1) // m * m, dtype=torch.bool)
        pad[:, :d] = full
        assert (pad.view(R, -1, m).sum(2) == sizes.clamp(max=n)).all()
    with pytest.raises(ValueError):
        S.prune_exact(W, H, 0.99, nm=nm)


def test_sparsegpt_beats_magnitude():
    torch.manual_seed(13)
    R, d = 32, 96
    H = spike_H(d, dead=(5,), p=0.2)
    tot_s = tot_m = 0.0
    for t in range(3):
        W = torch.randn(R, d)
        for sp in (0.5, 0.9):
            Ws, ks = S.prune_sparsegpt(W, H, sp, blocksize=32)
            Wm, km = S.prune_magnitude(W, sp)
            assert int((~ks).sum()) == round(sp * R * d) and (Ws[~ks] == 0).all()
            tot_s += herr(W, Ws, H)
            tot_m += herr(W, Wm, H)
    assert tot_s < tot_m


def test_exact_beats_sparsegpt():
    torch.manual_seed(14)
    R, d = 16, 64
    H = spike_H(d, p=0.25)
    W = torch.randn(R, d)
    We = S.prune_exact(W, H, 0.8)[0]
    Ws = S.prune_sparsegpt(W, H, 0.8)[0]
    assert herr(W, We, H) < herr(W, Ws, H)


# ---- robustness ------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["zero", "rank2", "dup"])
def test_singular_hessians_give_finite_results(kind):
    torch.manual_seed(15)
    R, d = 5, 12
    if kind == "zero":
        H = torch.zeros(d, d)
    elif kind == "rank2":
        H = spike_H(d, rank=2)
    else:
        x = torch.rand(30, 1)
        H = (x.repeat(1, d).T @ x.repeat(1, d)).double()
    W = torch.randn(R, d)
    g = fit_grid(W, 3)
    outs = [S.obs_path(W, H).loss, S.prune_exact(W, H, 0.7)[0], S.prune_exact(W, H, 0.7, block=3)[0],
            S.prune_sparsegpt(W, H, 0.7)[0], S.prune_exact(W, H, None, nm=(2, 4))[0],
            S.quantize_obq(W, H, g), S.quantize_gptq(W, H, g), S.quantize_gptq(W, H, g, act_order=True),
            S.solve_on_support(W, H, torch.rand(R, d) > 0.5),
            S.prune_exact(W, torch.stack([H] * R), 0.5)[0]]
    for o in outs:
        assert torch.isfinite(o).all()


def test_deterministic():
    torch.manual_seed(16)
    R, d = 10, 30
    H = spike_H(d, dead=(3,))
    W = torch.randn(R, d)
    g = fit_grid(W, 4)
    keep = S.prune_exact(W, H, 0.5)[1]
    fns = [lambda: S.obs_path(W, H).loss, lambda: S.prune_exact(W, H, 0.9)[0],
           lambda: S.prune_exact(W, H, 0.9, block=4)[0], lambda: S.prune_sparsegpt(W, H, 0.9)[0],
           lambda: S.quantize_obq(W, H, g), lambda: S.quantize_obq(W, H, g, keep_mask=keep),
           lambda: S.quantize_gptq(W, H, g, act_order=True)]
    for f in fns:
        assert torch.equal(f(), f())


def test_progress_bar_shows_and_changes_nothing(capsys):
    W = torch.randn(4, 20)
    H = spike_H(20)
    p_on, p_off = S.obs_path(W, H, progress=True), S.obs_path(W, H, progress=False)
    q_on = S.quantize_obq(W, H, fit_grid(W, 4), progress=True)
    err = capsys.readouterr().err
    assert "it/s" in err or "%" in err          # tqdm drew a bar on stderr
    assert torch.equal(p_on.order, p_off.order) and torch.equal(p_on.loss, p_off.loss)
    assert torch.equal(q_on, S.quantize_obq(W, H, fit_grid(W, 4), progress=False))


# ---- quantization solvers --------------------------------------------------------------------

def np_obq(w, H, s, qmin, qmax, damp=0.01):
    """OBQ written plainly (dead inputs rounded)."""
    w = w.copy()
    Hd, dead = np_damped(H, damp)
    Hinv = np.linalg.inv(Hd)
    done = dead.copy()
    out = np.clip(np.round(w / s), qmin, qmax) * s
    while not done.all():
        e = w - np.clip(np.round(w / s), qmin, qmax) * s
        with np.errstate(divide="ignore", invalid="ignore"):
            sc = np.where(done, np.inf, e ** 2 / np.diag(Hinv))
        q = int(np.argmin(sc))
        out[q] = w[q] - e[q]
        w -= e[q] / Hinv[q, q] * Hinv[:, q]
        Hinv = Hinv - np.outer(Hinv[:, q], Hinv[q]) / Hinv[q, q]
        done[q] = True
    return out


def test_obq_equals_plain(small_lazy):
    torch.manual_seed(17)
    R, d = 6, 20
    H = spike_H(d, dead=(4,), p=0.4)
    W = torch.randn(R, d, dtype=torch.float64)
    g = fit_grid(W, 3)
    out = S.quantize_obq(W, H, g, max_memory=8 * 3 * (d * d + 3 * d + 16 * d), options=small_lazy)
    for r in range(R):
        np.testing.assert_allclose(out[r].numpy(), np_obq(W[r].numpy(), H.numpy(), g.scale[r].item(), g.qmin, g.qmax))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_quantizers_on_grid_and_better_than_rtn(bits):
    torch.manual_seed(18)
    R, d = 24, 48
    H = spike_H(d, dead=(0,), p=0.3)
    e = {"rtn": 0.0, "obq": 0.0, "gptq": 0.0, "gptq_act": 0.0}
    for t in range(3):
        W = torch.randn(R, d)
        g = fit_grid(W, bits)
        outs = {"rtn": S.quantize_rtn(W, g), "obq": S.quantize_obq(W, H, g), "gptq": S.quantize_gptq(W, H, g),
                "gptq_act": S.quantize_gptq(W, H, g, act_order=True)}
        for k, o in outs.items():
            assert torch.equal(g.quantize(o), o) and o.dtype == W.dtype
            e[k] += herr(W, o, H)
    assert e["obq"] <= e["rtn"] and e["gptq"] <= e["rtn"] and e["gptq_act"] <= e["rtn"]


def test_joint_compression_keeps_zeros():
    torch.manual_seed(19)
    R, d = 12, 40
    H = spike_H(d, dead=(2, 3))
    W = torch.randn(R, d)
    Wp, keep, _ = S.prune_exact(W, H, 0.75)
    g = fit_grid(Wp, 4)
    Hs = torch.stack([H] * R)
    for o in (S.quantize_obq(Wp, H, g, keep_mask=keep), S.quantize_gptq(Wp, H, g, keep_mask=keep),
              S.quantize_rtn(Wp, g, keep_mask=keep), S.quantize_obq(Wp, Hs, g, keep_mask=keep)):
        assert (o[~keep] == 0).all() and torch.equal(g.quantize(o), o)
    a = herr(Wp, S.quantize_obq(Wp, H, g, keep_mask=keep), H)
    b = herr(Wp, S.quantize_rtn(Wp, g, keep_mask=keep), H)
    assert a <= b
    # support-restricted OBQ equals the plain greedy on the kept inputs
    for r in range(3):
        sup = keep[r].numpy()
        ref = np_obq(Wp[r].double().numpy()[sup], np_damped(H.numpy())[0][np.ix_(sup, sup)], g.scale[r].item(),
                     g.qmin, g.qmax, damp=0.0)
        got = S.quantize_obq(Wp[r:r + 1].double(), H, fit_grid(Wp[r:r + 1], 4), keep_mask=keep[r:r + 1])[0]
        np.testing.assert_allclose(got.numpy()[sup], ref, atol=1e-6)


def np_gptq(W, H, scale, qmin, qmax, damp=0.01):
    """GPTQ written plainly: explicit Cholesky of the inverse, one column at a time, no blocks."""
    Hd, _ = np_damped(H, damp)
    U = np.linalg.cholesky(np.linalg.inv(Hd)).T
    W = W.copy()
    Q = np.zeros_like(W)
    for i in range(W.shape[1]):
        q = np.clip(np.round(W[:, i] / scale), qmin, qmax) * scale
        err = (W[:, i] - q) / U[i, i]
        W[:, i:] -= np.outer(err, U[i, i:])
        Q[:, i] = q
    return Q


def test_gptq_equals_plain():
    torch.manual_seed(20)
    R, d = 6, 21
    H = spike_H(d, dead=(3,), p=0.4)
    W = torch.randn(R, d, dtype=torch.float64)
    g = fit_grid(W, 3)
    got = S.quantize_gptq(W, H, g, blocksize=4)
    ref = np_gptq(W.numpy(), H.numpy(), g.scale.double().numpy(), g.qmin, g.qmax)
    np.testing.assert_allclose(got.numpy(), ref, atol=1e-9)
    # the factor of H^-1 from the reversed Cholesky
    _, Lf, dead = damped_factor(H, 0.01, flip=True)
    Hd, dead_np = np_damped(H.numpy())
    assert dead.tolist() == dead_np.tolist()
    np.testing.assert_allclose(hinv_upper(Lf).numpy(), np.linalg.cholesky(np.linalg.inv(Hd)).T,
                               rtol=1e-9, atol=1e-12)


def test_sparsegpt_equals_plain_sweep():
    """SparseGPT with the mask fixed up front per block (one block) equals the plain sweep that
    zeroes the masked weights and spreads their error."""
    torch.manual_seed(21)
    R, d, sp = 5, 16, 0.5
    H = spike_H(d, p=0.4)
    W = torch.randn(R, d, dtype=torch.float64)
    Wn, keep = S.prune_sparsegpt(W, H, sp, blocksize=d)
    Hd, _ = np_damped(H.numpy())
    U = np.linalg.cholesky(np.linalg.inv(Hd)).T
    score = W.numpy() ** 2 / np.diag(U)[None] ** 2
    mask = np.zeros(R * d, bool)
    mask[np.argsort(score.reshape(-1), kind="stable")[:round(sp * R * d)]] = True
    mask = mask.reshape(R, d)
    assert (mask == ~keep.numpy()).all()
    Wp = W.numpy().copy()
    for i in range(d):
        q = np.where(mask[:, i], 0.0, Wp[:, i])
        err = (Wp[:, i] - q) / U[i, i]
        Wp[:, i:] -= np.outer(err, U[i, i:])
        Wp[:, i] = q
    np.testing.assert_allclose(Wn.numpy(), Wp, atol=1e-9)


def test_lazy_batch_resizing_equals_plain():
    """Real-size lazy batches that grow as the active set shrinks (16 -> 128), torch steps."""
    torch.manual_seed(22)
    R, d = 4, 300
    H = spike_H(d, p=0.1, dead=(0, 10))
    W = torch.randn(R, d, dtype=torch.float64)
    p = S.obs_path(W, H, options=S.EngineOptions(ucache=8 * R * 300 * 16, jit=False))
    for r in range(R):
        o, l, _ = reference.greedy_path(W[r].numpy(), H.numpy())
        assert p.order[r].tolist() == o.tolist()
        np.testing.assert_allclose(p.loss[r].numpy(), l, rtol=1e-7, atol=1e-13)


def test_workers_leave_the_callers_thread_count():
    n = torch.get_num_threads()
    W = torch.randn(6, 30)
    H = spike_H(30)
    opts = S.EngineOptions(workers=2)
    S.obs_path(W, H, options=opts)
    S.quantize_obq(W, H, fit_grid(W, 4), options=opts)
    assert torch.get_num_threads() == n


def test_torch_steps_when_numba_is_missing(monkeypatch):
    """Without numba the greedy falls back to the torch steps, with the same path."""
    import sys
    import osbc
    torch.manual_seed(8)
    W = torch.randn(4, 16, dtype=torch.float64)
    H = spike_H(16, dead=(2,))
    ref = S.obs_path(W, H)
    monkeypatch.setitem(sys.modules, "numba", None)
    monkeypatch.delitem(sys.modules, "osbc.solvers.engine.jit", raising=False)
    monkeypatch.delattr(osbc.solvers.engine, "jit", raising=False)
    monkeypatch.setattr(engine_greedy, "_JIT_MOD", None)      # the import cache, not a setting
    got = S.obs_path(W, H)
    assert engine_greedy._JIT_MOD is False
    assert torch.equal(got.order, ref.order)
    torch.testing.assert_close(got.loss, ref.loss, rtol=1e-9, atol=1e-14)


@pytest.mark.skipif("jit" not in STEPS, reason="numba not installed")
def test_jit_steps_equal_torch_steps_at_default_batches():
    """Compiled and torch steps on a few hundred inputs with the default lazy batches (several
    flushes and compactions): the same pruning path and the same OBQ result."""
    torch.manual_seed(9)
    d = 600
    H = spike_H(d, dead=(4, 100), p=0.2)
    W = torch.randn(5, d, dtype=torch.float64)
    g = fit_grid(W, 3)
    out = {}
    for jit in (True, False):
        opts = S.EngineOptions(jit=jit)
        out[jit] = S.obs_path(W, H, options=opts), S.quantize_obq(W, H, g, options=opts)
    assert torch.equal(out[True][0].order, out[False][0].order)
    torch.testing.assert_close(out[True][0].loss, out[False][0].loss, rtol=1e-9, atol=1e-14)
    torch.testing.assert_close(out[True][1], out[False][1], rtol=1e-9, atol=1e-12)


def test_weights_that_require_grad():
    """A layer's weight passed as is (a Parameter) gives the same results as its detached copy."""
    lin = torch.nn.Linear(20, 4, bias=False)
    H = spike_H(20)
    W = lin.weight.detach().clone()
    assert torch.equal(S.obs_path(lin.weight, H).order, S.obs_path(W, H).order)
    torch.testing.assert_close(S.prune_exact(lin.weight, H, 0.5)[0], S.prune_exact(W, H, 0.5)[0])
    g = fit_grid(W, 4)
    torch.testing.assert_close(S.quantize_obq(lin.weight, H, g), S.quantize_obq(W, H, g))


@pytest.mark.parametrize("scale", [2.0 ** 70, 2.0 ** 100, 2.0 ** -70, 2.0 ** -100])
def test_huge_and_tiny_weights_prune_and_quantize_like_normal_ones(scale):
    """Weights of 1e20 and more, or 1e-21 and less: float32 scores w^2 / [H^-1]_qq would overflow
    (the greedy re-picked removed weights) or underflow to 0, where every weight ties (1e-30
    weights took 1.8x the membrane error of the same layer at scale 1). The solvers work at a
    power-of-two scale, so such rows take the unscaled rows' decisions, to the bit."""
    torch.manual_seed(30)
    R, d = 6, 40
    H = spike_H(d, dead=(3,))
    W = torch.randn(R, d)
    mixed = W.clone()
    mixed[:3] *= scale                               # some rows scaled, some normal
    for blk in (1, 4):
        p, ref = S.obs_path(mixed, H, block=blk), S.obs_path(W, H, block=blk)
        assert torch.equal(p.order, ref.order)
        torch.testing.assert_close(p.loss[:3], ref.loss[:3] * scale ** 2)
        Wn, keep, _ = S.prune_exact(W * scale, H, 0.9, block=blk)
        Wr, keep_r, _ = S.prune_exact(W, H, 0.9, block=blk)
        assert torch.equal(keep, keep_r) and torch.equal(Wn, Wr * scale)
    keep = S.prune_sparsegpt(W * scale, H, 0.9)[1]
    assert torch.equal(keep, S.prune_sparsegpt(W, H, 0.9)[1])
    scaled, g, gs = W * scale, fit_grid(W, 3), fit_grid(W * scale, 3)
    for fn in (S.quantize_gptq, S.quantize_obq, S.quantize_refined):
        assert torch.equal(fn(scaled, H, gs), fn(W, H, g) * scale), fn.__name__
    with pytest.raises(ValueError, match="NaN or Inf"):
        S.obs_path(torch.full((2, 4), float("inf")), torch.eye(4))


_SOLVERS = ["obs_path", "prune_exact", "prune_restricted", "prune_sparsegpt", "prune_magnitude", "solve_on_support",
            "quantize_gptq", "quantize_obq", "quantize_exact", "quantize_refined", "refine_on_grid", "quantize_rtn"]


def _call(name, W, H, g, **kw):
    """Solver ``name`` on W, H (and grid g): the arguments each takes, and ``kw``."""
    keep = torch.ones(4, 12, dtype=torch.bool)
    return {"obs_path": lambda: S.obs_path(W, H, **kw), "prune_exact": lambda: S.prune_exact(W, H, 0.5, **kw),
            "prune_restricted": lambda: S.prune_restricted(W, H, 0.9, **kw),
            "prune_sparsegpt": lambda: S.prune_sparsegpt(W, H, 0.5, **kw),
            "prune_magnitude": lambda: S.prune_magnitude(W, 0.5, **kw),
            "solve_on_support": lambda: S.solve_on_support(W, H, keep, **kw),
            "quantize_gptq": lambda: S.quantize_gptq(W, H, g, **kw),
            "quantize_obq": lambda: S.quantize_obq(W, H, g, **kw), "quantize_exact": lambda: S.quantize_exact(W, H, g, **kw),
            "quantize_refined": lambda: S.quantize_refined(W, H, g, **kw),
            "refine_on_grid": lambda: S.refine_on_grid(W, H, g, torch.zeros(4, 12), **kw),
            "quantize_rtn": lambda: S.quantize_rtn(W, g, **kw)}[name]()


_CHUNKED = ["obs_path", "prune_exact", "prune_restricted", "solve_on_support", "quantize_obq", "quantize_exact",
            "quantize_refined", "refine_on_grid"]


@pytest.mark.parametrize("name", _CHUNKED)
def test_max_memory_default_and_bad_values(name):
    """``max_memory`` None is the device's default (384 MiB on CPU); a budget under one row gives
    chunks of one row and the same result; anything but a positive int is a one-line OsbcError
    naming the solver."""
    assert S.memory_budget(None, "cpu") == S.DEFAULT_MAX_MEMORY
    assert S.memory_budget(1234, "cpu") == 1234 and S.memory_budget(np.int64(1234), "cpu") == 1234
    W, H, g = torch.randn(4, 12, generator=torch.Generator().manual_seed(0)), spike_H(12), fit_grid(torch.randn(4, 12), 4)
    ref = _call(name, W, H, g)
    one_row = _call(name, W, H, g, max_memory=1)
    parts = lambda x: (x,) if isinstance(x, torch.Tensor) else (x.order, x.loss) if isinstance(x, S.PrunePath) \
        else tuple(x)  # noqa: E731
    for a, b in zip(parts(ref), parts(one_row)):
        assert torch.equal(a, b)
    for bad in (0, -5, 1.5, True, "big"):
        with pytest.raises(OsbcError, match=f"^{name}: max_memory must be a positive int"):
            _call(name, W, H, g, max_memory=bad)


@pytest.mark.parametrize("name", _SOLVERS)
def test_every_solver_refuses_bad_layers(name):
    """A NaN weight (no pruning loss or grid point; it would spread through its row's
    compensations), a W or H that is not a torch tensor of the right shape and kind, a grid fitted
    on other rows: each public solver raises a one-line OsbcError naming itself (numpy arrays,
    1-D weights and wrong shapes used to end in TypeErrors and IndexErrors deep inside)."""
    W, H, g = torch.randn(4, 12), spike_H(12), fit_grid(torch.randn(4, 12), 4)
    nan = W.clone()
    nan[1, 3] = float("nan")
    bad = [(nan, H, g, "W holds NaN or Inf"), (W.numpy(), H, g, "W must be a torch tensor"),
           (W[0], H, g, "W must be a 2-D floating tensor"), (W.long(), H, g, "W must be a 2-D floating tensor")]
    if name not in ("prune_magnitude", "quantize_rtn"):
        bad += [(W, H.numpy(), g, "H must be a torch tensor"), (W, H[:11, :11], g, r"H must be \[12, 12\]")]
    if name.startswith("quantize") or name == "refine_on_grid":
        bad.append((W, H, fit_grid(torch.randn(3, 12), 4), "the grid has scales of shape"))
    for Wb, Hb, gb, msg in bad:
        with pytest.raises(OsbcError, match=f"^{name}: {msg}"):
            _call(name, Wb, Hb, gb)


def test_restricted_takes_half_precision_weights():
    """float16 / bfloat16 weights are solved in float32 and returned in their own dtype."""
    W, H = torch.randn(8, 60), spike_H(60)
    ref = S.prune_restricted(W.half().float(), H, 0.9)
    for dt in (torch.float16, torch.bfloat16):
        Wn, keep, _ = S.prune_restricted(W.to(dt), H, 0.9)
        assert Wn.dtype == dt and int((~keep).sum()) == round(0.9 * 8 * 60)
        if dt == torch.float16:
            assert torch.equal(keep, ref[1]) and torch.equal(Wn, ref[0].half())
