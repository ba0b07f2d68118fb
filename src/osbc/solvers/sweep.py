"""Fast column sweeps: SparseGPT (pruning) and GPTQ (quantization).

All rows share one column order; columns are fixed left to right, each one's error spread over
the later columns with the Cholesky factor of H^-1 (GPTQ's form of the OBS downdates), the rest
of the matrix updated once per block of columns. Each needs a shared H per group of rows: ``H``
is [d, d] or a list of ``(rows, H)`` groups, each group solved on its own.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ..errors import OsbcError
from ..quant import Grid
from .baselines import _finish_q, _smallest_mask
from .damping import _block, _cdtype, _damped
from .groups import layer_groups, per_group, take
from .pattern import _budget, _nm_groups, pow2_row_scale

__all__ = ["prune_sparsegpt", "quantize_gptq"]


# ---- fast column sweeps (SparseGPT, GPTQ) -----------------------------------------------------------

def _hinv_upper(Lf: Tensor) -> Tensor:
    """Upper Cholesky factor U of H^-1 (H^-1 = U^T U) from Lf = chol(J H J), J the order reversal:
    H^-1 = (J Lf^-1 J)^T (J Lf^-1 J) and J Lf^-1 J is upper triangular. Row i of U holds the
    error-spreading coefficients of column i once columns < i are fixed (GPTQ's form of the OBS
    downdates); one triangular inverse, no explicit H^-1."""
    Li = torch.eye(Lf.shape[-1], dtype=Lf.dtype, device=Lf.device)
    return torch.linalg.solve_triangular(Lf, Li, upper=False, out=Li).flip(0, 1)


def _sweep(w: Tensor, Uc: Tensor, blocksize: int, target):
    """In place: columns left to right, column i := target(i, W1, U1, il) (W1 the current block,
    il the column inside it), its error spread over the later columns; blocks of ``blocksize``
    columns, the rest of the matrix updated once per block (lazy batch)."""
    R, n = w.shape
    for i1 in range(0, n, blocksize):
        i2 = min(i1 + blocksize, n)
        W1 = w[:, i1:i2].clone()
        U1 = Uc[i1:i2, i1:i2]
        Err = torch.empty_like(W1)
        for il in range(i2 - i1):
            q = target(i1 + il, W1, U1, il)
            err = (W1[:, il] - q) / U1[il, il]
            W1[:, il:].addr_(err, U1[il, il:], alpha=-1)
            W1[:, il] = q
            Err[:, il] = err
        w[:, i1:i2] = W1
        if i2 < n:
            w[:, i2:].addmm_(Err, Uc[i1:i2, i2:], alpha=-1)


def _quotas(k: int, weights: list[int]) -> list[int]:
    """Split k over parts by cumulative rounding of k * (cumulative weight share): sums to k,
    part i gets at most weights[i] when k <= sum(weights)."""
    tot = sum(weights)
    out, acc, prev = [], 0, 0
    for wgt in weights:
        acc += wgt
        cur = int(math.floor(k * acc / tot + 0.5)) if tot else 0
        out.append(cur - prev)
        prev = cur
    return out


def prune_sparsegpt(W: Tensor, H, sparsity, *, nm=None, blocksize: int = 128, damp: float = 0.01):
    """SparseGPT: the column sweep with the mask chosen per block of ``blocksize`` columns by
    w^2 / [chol(H^-1)]_jj^2 (current, compensated weights), each block's share of the budget
    fixed up front so each Hessian group hits round(sparsity * rows * d) exactly. ``nm=(n, m)``:
    per group of m columns, each row's m - n lowest scores (the group's share of the budget;
    ``sparsity=None``: the full pattern). Dead inputs go first. Shared H [d, d] (or groups of rows
    sharing one). Returns (W_new, keep_mask)."""
    return per_group(W, layer_groups(W, H, "prune_sparsegpt"), lambda Wg, Hg, rows: _sparsegpt(Wg, Hg.to(W.device), sparsity, nm, blocksize, damp))


def _sparsegpt(W: Tensor, H: Tensor, sparsity, nm, blocksize: int, damp: float):
    if H.dim() != 2:
        raise OsbcError("prune_sparsegpt needs a shared H [d, d]; group rows that share a Hessian")
    R, d = W.shape
    dev, cdt = W.device, _cdtype(W)
    k = _budget(sparsity, R, d, nm)
    _, Lf, dead = _damped(H.to(dev), damp, flip=True)
    f = pow2_row_scale(W, per_layer=True)     # one factor: the budget ranks scores across rows
    w = W.detach().to(cdt).clone() if f is None else (W.detach().double() / f[0]).to(cdt)
    prune = torch.zeros(R, d, dtype=torch.bool, device=dev)
    if nm is None:
        dcols = torch.nonzero(dead)[:, 0]
        nd = R * int(dcols.numel())
        if k <= nd:   # only free weights go: any k of them, the smallest first
            prune[:, dcols] = _smallest_mask(w[:, dcols].abs(), k)
            return _unscale(w * ~prune, f, W.dtype), ~prune
        prune[:, dcols] = True
        a = torch.nonzero(~dead)[:, 0]
        # dead inputs are decoupled: the live block of the factor is the live block's factor
        fa = (d - 1 - a).flip(0)
        Lf = _block(Lf, fa)
        Uc = _hinv_upper(Lf).to(cdt)
        del Lf
        wa = w[:, a].contiguous()
        da = int(a.numel())
        bounds = list(range(0, da, blocksize))
        quota = _quotas(k - nd, [min(blocksize, da - b) for b in bounds])
        pa = torch.zeros(R, da, dtype=torch.bool, device=dev)
        dg = Uc.diagonal()

        def target(i, W1, U1, il):
            if il == 0:
                b = i // blocksize
                pa[:, i:i + W1.shape[1]] = _smallest_mask(W1 ** 2 / dg[i:i + W1.shape[1]] ** 2, quota[b])
            return W1[:, il] * ~pa[:, i]
        _sweep(wa, Uc, blocksize, target)
        w[:, a] = wa
        prune[:, a] = pa
    else:
        gid, G, cap, tot, _ = _nm_groups(d, nm, dev)
        m = nm[1]
        bs = max(m, blocksize // m * m)
        sizes = [min(m, d - g * m) for g in range(G)]
        quota = _quotas(k, [R * max(0, s_ - nm[0]) for s_ in sizes])   # a partial group: padded
        Uc = _hinv_upper(Lf).to(cdt)
        del Lf
        dg = Uc.diagonal()

        def target(i, W1, U1, il):
            if i % m == 0:
                g = i // m
                cols = slice(il, il + sizes[g])
                sc = W1[:, cols] ** 2 / dg[i:i + sizes[g]] ** 2
                sc = sc.masked_fill(dead[i:i + sizes[g]], -float("inf"))
                cand = torch.zeros_like(sc, dtype=torch.bool).scatter_(
                    1, torch.sort(sc, dim=1, stable=True).indices[:, :max(0, sizes[g] - nm[0])], True)
                if quota[g] < R * max(0, sizes[g] - nm[0]):   # a partial pattern: the cheapest candidates
                    cand = _smallest_mask(sc.masked_fill(~cand, float("inf")), quota[g])
                prune[:, i:i + sizes[g]] = cand
            return W1[:, il] * ~prune[:, i]
        _sweep(w, Uc, bs, target)
    w.masked_fill_(prune, 0.0)
    return _unscale(w, f, W.dtype), ~prune


def _unscale(w: Tensor, f: Tensor | None, dtype) -> Tensor:
    return w.to(dtype) if f is None else (w.double() * f[0]).to(dtype)



def quantize_gptq(W: Tensor, H, grid: Grid, *, keep_mask: Tensor | None = None, blocksize: int = 128,
                  act_order: bool = False, damp: float = 0.01) -> Tensor:
    """GPTQ: one column order for all rows (natural, or decreasing diag(H) with ``act_order``),
    each column rounded and its error spread with the Cholesky factor of H^-1, lazy block updates.
    Pruned weights (keep_mask False) are held at 0 and their error compensated. Shared H (or
    groups of rows sharing one)."""
    return per_group(W, layer_groups(W, H, "quantize_gptq", grid), lambda Wg, Hg, rows: _gptq(
        Wg, Hg.to(W.device), grid.select(rows), take(keep_mask, rows), blocksize, act_order, damp))


def _gptq(W: Tensor, H: Tensor, grid: Grid, keep_mask, blocksize: int, act_order: bool, damp: float) -> Tensor:
    if H.dim() != 2:
        raise OsbcError("quantize_gptq needs a shared H [d, d]; group rows that share a Hessian")
    R, d = W.shape
    dev, cdt = W.device, _cdtype(W)
    keep = None if keep_mask is None else keep_mask.to(device=dev, dtype=torch.bool)
    if act_order:
        perm = torch.sort(-torch.nan_to_num(H.diagonal().to(device=dev, dtype=torch.float64)), stable=True).indices
        Hp = H.to(dev)[perm][:, perm]
    else:
        perm, Hp = torch.arange(d, device=dev), H.to(dev)
    _, Lf, _ = _damped(Hp, damp, flip=True)
    del Hp
    Uc = _hinv_upper(Lf).to(cdt)
    del Lf
    w = W.detach().to(cdt)[:, perm].contiguous()
    kp = None if keep is None else keep[:, perm]
    s = grid.scale.to(device=dev, dtype=cdt)
    qmin, qmax = grid.qmin, grid.qmax

    def target(i, W1, U1, il):
        q = torch.round(W1[:, il] / s).clamp_(qmin, qmax).mul_(s)
        return q if kp is None else q * kp[:, i]
    _sweep(w, Uc, blocksize, target)
    out = torch.empty_like(w)
    out[:, perm] = w
    return _finish_q(out, grid, keep, W.dtype)

