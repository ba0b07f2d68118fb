"""Quantization refined by exact cyclic coordinate descent on the grid (solvers "refined" and
"exact-refined").

The layer loss of a quantized row q (weights w, damped Hessian H) is L(q) = 1/2 (q - w)^T H (q - w).
Keep the residual G = (Q - W) H of all rows. Moving q_j by delta changes a row's loss by
delta G_j + 1/2 delta^2 H_jj: a parabola in delta, so the best grid point for coordinate j, the
others fixed, is the grid point nearest to its unconstrained optimum q_j - G_j / H_jj (clamped to
the grid's ends). One column is solved for all rows at once; the move is kept only where it
lowers the loss, so the loss never increases and the result is never worse than its start.
Columns are visited in blocks: inside a block G is kept exact with rank-1 updates, the rest of G
is updated once per block with one product (GPTQ's lazy batch), O(R d^2) per pass like GPTQ's
sweep. Passes stop when one moves no weight.

The descent stops at a point no single-weight move improves, which depends on the start: from
GPTQ (cheap) or from OBQ's greedy (better on the layers measured, at OBQ's cost).
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..errors import OsbcError
from ..quant import Grid
from .baselines import _finish_q
from .damping import _cdtype, _damped
from .engine.workers import _rows_per_chunk
from .groups import layer_groups, per_group, take
from .obq import _row_error, quantize_obq
from .options import EngineOptions, EngineStats, memory_budget
from .pattern import pow2_row_scale
from .sweep import quantize_gptq

__all__ = ["quantize_refined", "refine_on_grid", "STARTS"]

DEFAULT_PASSES = 4
STARTS = ("gptq", "exact")


def quantize_refined(W: Tensor, H, grid: Grid, *, start: str = "gptq", keep_mask: Tensor | None = None,
                     passes: int = DEFAULT_PASSES, blocksize: int = 128, damp: float = 0.01,
                     max_memory: int | None = None, progress: bool = False,
                     options: EngineOptions | None = None, stats: EngineStats | None = None) -> Tensor:
    """Up to ``passes`` passes of exact coordinate descent on the grid (:func:`refine_on_grid`)
    from ``start``: ``"gptq"`` (solver "refined"), or ``"exact"`` (solver "exact-refined"): both
    OBQ's and GPTQ's results refined, and per row the lowest error dw^T H dw of those two, OBQ's
    and GPTQ's, so never above :func:`~osbc.solvers.quantize_exact`'s row by row. Pruned weights
    (keep_mask False) stay 0. ``H``: [d, d] or ``(rows, H)`` groups, each sharing one H;
    ``progress``, ``options``, ``stats``: OBQ's (start "exact")."""
    if start not in STARTS:
        raise OsbcError(f"start must be one of {', '.join(map(repr, STARTS))}, got {start!r}")
    gs = layer_groups(W, H, "quantize_refined", grid)
    max_memory = memory_budget(max_memory, W.device, "quantize_refined")

    def solve(Wg, Hg, rows):
        Hg, sub, k = Hg.to(W.device), grid.select(rows), take(keep_mask, rows)
        q = quantize_gptq(Wg, Hg, sub, keep_mask=k, blocksize=blocksize, damp=damp)
        Hd = _damped_h(Hg, damp, Wg)
        if start == "gptq":
            return _refine(Wg, Hd, sub, q, k, passes, blocksize, max_memory)
        q_obq = quantize_obq(Wg, Hg, sub, keep_mask=k, damp=damp, progress=progress, max_memory=max_memory,
                             options=options, stats=stats)
        cands = [q, q_obq] + [_refine(Wg, Hd, sub, c, k, passes, blocksize, max_memory) for c in (q, q_obq)]
        err = torch.stack([_row_error(c - Wg, Hg) for c in cands])
        return torch.stack(cands)[err.argmin(0), torch.arange(Wg.shape[0], device=Wg.device)]
    return per_group(W, gs, solve)


def refine_on_grid(W: Tensor, H, grid: Grid, Q: Tensor, *, keep_mask: Tensor | None = None,
                   passes: int = DEFAULT_PASSES, blocksize: int = 128, damp: float = 0.01,
                   max_memory: int | None = None) -> Tensor:
    """Lower 1/2 (q - w)^T (H + lambda I) (q - w) of every row from the grid point ``Q`` by cyclic
    exact coordinate descent, each coordinate moved to its best grid point given the others
    (never up); at most ``passes`` passes over the columns. Pruned weights (keep_mask False) are 0
    from the start. ``H``: [d, d] or ``(rows, H)`` groups, each sharing one H."""
    gs = layer_groups(W, H, "refine_on_grid", grid)
    max_memory = memory_budget(max_memory, W.device, "refine_on_grid")
    if not isinstance(Q, Tensor) or Q.shape != W.shape:
        raise OsbcError(f"refine_on_grid: Q must be a tensor of W's shape {tuple(W.shape)}, "
                        f"got {tuple(Q.shape) if isinstance(Q, Tensor) else type(Q).__name__}")
    return per_group(W, gs, lambda Wg, Hg, rows: _refine(
        Wg, _damped_h(Hg, damp, Wg), grid.select(rows), take(Q, rows), take(keep_mask, rows), passes, blocksize,
        max_memory))


def _damped_h(H: Tensor, damp: float, W: Tensor) -> Tensor:
    """H + lambda I (dead inputs decoupled, see damping) on W's device in its compute dtype."""
    if H.dim() != 2:
        raise OsbcError("quantize_refined needs a shared H [d, d]; group rows that share a Hessian")
    return _damped(H.to(W.device), damp)[0].to(_cdtype(W))


def _refine(W: Tensor, Hd: Tensor, grid: Grid, Q: Tensor, keep_mask, passes: int, blocksize: int,
            max_memory: int) -> Tensor:
    if isinstance(passes, bool) or not isinstance(passes, int) or passes < 0:
        raise OsbcError(f"passes must be an integer >= 0, got {passes!r}")
    R, d = W.shape
    dev, cdt = W.device, _cdtype(W)
    keep = None if keep_mask is None else keep_mask.to(device=dev, dtype=torch.bool)
    out = Q.detach().to(device=dev, dtype=cdt).clone()
    if keep is not None:
        out.masked_fill_(~keep, 0.0)
    w = W.detach().to(cdt)
    s = grid.scale.to(device=dev, dtype=cdt)
    # rows of huge or tiny weights descend at a power-of-two scale (exact): a move's loss change
    # ~ w^2 h underflows float32 under |w| ~ 1e-19 (1e-30 weights: no move at all)
    f = pow2_row_scale(W)
    if f is not None:
        fc = f.to(device=dev, dtype=cdt)
        w, out, s = w / fc[:, None], out / fc[:, None], s / fc
    es = torch.finfo(cdt).bits // 8
    # per row: Q, its start, G and the residual (d each), the block's moves, column temporaries
    rows = _rows_per_chunk(es * (4 * d + 2 * blocksize + 16), R, max_memory)
    for r0 in range(0, R, rows):
        sl = slice(r0, min(r0 + rows, R))
        out[sl] = _descend(w[sl], Hd, out[sl], s[sl], grid.qmin, grid.qmax,
                           None if keep is None else keep[sl], passes, blocksize)
    if f is not None:
        out = out * fc[:, None]
    return _finish_q(out, grid, keep, W.dtype)


def _descend(w: Tensor, H: Tensor, q: Tensor, s: Tensor, qmin: int, qmax: int, keep, passes: int,
             blocksize: int) -> Tensor:
    """Coordinate descent of one chunk of rows, in place on q. G is recomputed exactly at the start
    of each pass (no drift from the rank-1 updates); a row that ends above its start loss (only
    through rounding in the updates) gets its start back, so no row gets worse."""
    q0, loss0 = q.clone(), None
    for p in range(passes + 1):
        E = q - w
        G = E @ H
        loss = (E * G).sum(1, dtype=torch.float64)
        del E
        if loss0 is None:
            loss0 = loss
        if p == passes or not _pass(w, H, q, G, s, qmin, qmax, keep, blocksize):
            break
    return torch.where((loss > loss0)[:, None], q0, q)


def _pass(w: Tensor, H: Tensor, q: Tensor, G: Tensor, s: Tensor, qmin: int, qmax: int, keep,
          blocksize: int) -> bool:
    """One pass over the columns, in place on q; G's columns ahead of the current one are kept
    exact (those behind are not read again before the next pass recomputes G). Whether a weight moved."""
    R, d = w.shape
    hd = H.diagonal()
    moved = torch.zeros((), dtype=torch.int64, device=q.device)    # one device sync per pass, not per column
    for i1 in range(0, d, blocksize):
        i2 = min(i1 + blocksize, d)
        G1 = G[:, i1:i2]
        H1 = H[i1:i2, i1:i2]
        D = torch.zeros(R, i2 - i1, dtype=q.dtype, device=q.device)
        for jl in range(i2 - i1):
            j = i1 + jl
            g, h, qj = G1[:, jl], hd[j], q[:, j]
            new = torch.round((qj - g / h) / s).clamp_(qmin, qmax).mul_(s)
            delta = new - qj
            ok = delta * (g + 0.5 * h * delta) < 0          # the row's loss change: moved only where it drops
            if keep is not None:
                ok &= keep[:, j]
            delta = delta * ok
            moved += ok.sum()
            q[:, j] = torch.where(ok, new, qj)
            G1.addr_(delta, H1[jl])
            D[:, jl] = delta
        if i2 < d:
            G[:, i2:].addmm_(D, H[i1:i2, i2:])
    return bool(moved)
