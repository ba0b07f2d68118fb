"""The best weights on a fixed support: argmin (w - w0)^T H (w - w0) with w = 0 off it, per row."""
from __future__ import annotations

import torch
from torch import Tensor

from .damping import _chol_inverse, _damped
from .engine.workers import _rows_per_chunk
from .groups import layer_groups, per_group, take
from .options import memory_budget

__all__ = ["solve_on_support"]


def _padded(mask: Tensor):
    """[c, d] bool -> ([c, m] positions of the True entries, ascending, padded; [c, m] validity)."""
    cnt = mask.sum(1)
    m = max(int(cnt.max()), 1) if mask.numel() else 1
    pos = torch.sort((~mask).to(torch.int8), dim=1, stable=True).indices[:, :m]
    valid = torch.arange(m, device=mask.device)[None] < cnt[:, None]
    return pos, valid


def _sym_gather(M: Tensor, pos: Tensor, valid: Tensor) -> Tensor:
    """M[pos][:, pos] per row (M [d, d] shared or [c, d, d]), identity on padding."""
    c, m = pos.shape
    if M.dim() == 2:
        A = M[pos[:, :, None], pos[:, None, :]]
    else:
        ar = torch.arange(c, device=M.device)[:, None, None]
        A = M[ar, pos[:, :, None], pos[:, None, :]]
    both = valid[:, :, None] & valid[:, None, :]
    eye = torch.eye(m, dtype=M.dtype, device=M.device).expand(c, m, m)
    return torch.where(both, A, eye)


def _spd_solve(A: Tensor, b: Tensor) -> Tensor:
    L, info = torch.linalg.cholesky_ex(A)
    if bool((info != 0).any()):
        bad = info != 0
        A = A.clone()
        A[bad] = A[bad] + torch.diag_embed(A[bad].diagonal(dim1=1, dim2=2).abs().amax(1, keepdim=True)
                                           .expand(-1, A.shape[-1]) * 1e-10)
        L, info = torch.linalg.cholesky_ex(A)
        if bool((info != 0).any()):
            return torch.linalg.lstsq(A, b[..., None]).solution[..., 0]
    return torch.cholesky_solve(b[..., None], L)[..., 0]


def solve_on_support(W: Tensor, H, keep_mask: Tensor, damp: float = 0.01,
                     max_memory: int | None = None) -> Tensor:
    """argmin (w - w0)^T H_damped (w - w0) subject to w = 0 off the kept support, per row.

    Kept support S, pruned P: w_S = w0_S + H_SS^-1 H_SP w0_P, or equivalently (cheaper when P is the
    smaller set) w = w0 - H^-1[:, P] ([H^-1]_PP)^-1 w0_P; each row uses the smaller system. Float64.
    ``H``: one Hessian or ``(rows, H)`` groups."""
    gs = layer_groups(W, H, "solve_on_support")
    max_memory = memory_budget(max_memory, W.device, "solve_on_support")
    return per_group(W, gs, lambda Wg, Hg, rows: _solve_one(Wg, Hg, take(keep_mask, rows), damp, max_memory))


def _solve_one(W: Tensor, H: Tensor, keep_mask: Tensor, damp: float, max_memory: int) -> Tensor:
    R, d = W.shape
    dev = W.device
    keep = keep_mask.to(device=dev, dtype=torch.bool)
    w0 = W.detach().to(torch.float64)
    out = w0 * keep
    if R == 0:
        return out.to(W.dtype)
    shared = H.dim() == 2
    nS = keep.sum(1)
    useS = nS <= d - nS
    Hd = L = None
    # rows grouped by form and sorted by system size so padding stays small
    for form in (True, False):
        sel = torch.nonzero(useS == form)[:, 0]
        if sel.numel() == 0:
            continue
        size = nS[sel] if form else d - nS[sel]
        srt = torch.sort(size, stable=True).indices
        sel, size = sel[srt], size[srt]
        if bool(((nS[sel] == 0) if form else (nS[sel] == d)).all()):
            continue  # nothing kept (already 0) / nothing pruned (already w0)
        if shared:
            if Hd is None:
                Hd, L, _ = _damped(H.to(dev), damp)
            M = Hd if form else _chol_inverse(L)
        i = 0
        while i < sel.numel():
            def per_row(m):
                return 8 * (3 * m * m + (0 if form else m * d) + 4 * d) + (0 if shared else 8 * 3 * d * d)
            # sizes ascend: a chunk's last row bounds its padded size
            c0 = _rows_per_chunk(per_row(int(size[i])), sel.numel() - i, max_memory)
            c = _rows_per_chunk(per_row(int(size[i + c0 - 1])), sel.numel() - i, max_memory)
            rr = sel[i:i + c]
            i += c
            if not shared:
                Hd_c, L_c, _ = _damped(H[rr.to(H.device)].to(dev), damp)
                M = Hd_c if form else _chol_inverse(L_c)
                del L_c
            kr = keep[rr]
            pos, valid = _padded(kr if form else ~kr)
            A = _sym_gather(M, pos, valid)
            if form:
                pruned_w = w0[rr] * ~kr
                v = pruned_w @ M if shared else torch.bmm(pruned_w[:, None], M)[:, 0]   # H P-columns
                b = v.gather(1, pos) * valid
                x = _spd_solve(A, b) * valid
                o = out[rr]
                o.scatter_add_(1, pos, x)
                out[rr] = o
            else:
                b = w0[rr].gather(1, pos) * valid
                y = _spd_solve(A, b) * valid
                if shared:
                    rowsP = M[pos]                                   # [c, m, d]
                else:
                    rowsP = M[torch.arange(len(rr), device=dev)[:, None], pos]
                dw = torch.bmm(y[:, None], rowsP)[:, 0]
                out[rr] = (w0[rr] - dw) * kr
    return out.to(W.dtype)


