"""Exact greedy OBS pruning (OBC): removal paths, the layer budget, the weights on the kept support.

``W`` is [R, d] (R output rows, d inputs); ``H`` the Hessian of the per-row loss: [d, d] shared,
[R, d, d] per row, or a list of ``(rows, H)`` groups (see ``groups``). Losses are 1/2 dw^T H dw:
removing w_q alone, optimally compensated, costs w_q^2 / (2 [H^-1]_qq). ``solvers.reference``
states the greedy in plain numpy; this is the same algorithm, vectorised over rows (see
``engine``).
"""
from __future__ import annotations

import math
import queue
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import OsbcError
from .damping import _block, _cdtype, _chol_inverse, _damped
from .engine.greedy import _greedy, _greedy_block, _lazy_batch
from .engine.lazy import _Lazy
from .engine.workers import _chunks, _map, _pooled, _progress, _rows_per_chunk, _step_threads, _workers
from .fixed_support import solve_on_support
from .groups import layer_groups, per_group, restrict, take
from .options import DEFAULT_OPTIONS, EngineOptions, EngineStats, memory_budget
from .pattern import _budget, _nm_groups, pow2_row_scale

__all__ = ["PrunePath", "obs_path", "path_from_inverse", "budget_counts", "prune_exact"]


@dataclass
class PrunePath:
    """Greedy removal path of each row.

    order [R, S] int64: input removed at step s; loss [R, S] float64: that step's loss increase
    (w_q^2 / (2 [H^-1]_qq), 0 for dead inputs), made non-decreasing along each row by a running
    max, so a layer's k smallest losses form a prefix of every row."""
    order: Tensor
    loss: Tensor


def obs_path(W: Tensor, H, *, max_steps: int | None = None, block: int = 1, nm=None, damp: float = 0.01,
             row_scale: Tensor | None = None, progress: bool = False, max_memory: int | None = None,
             options: EngineOptions | None = None, stats: EngineStats | None = None) -> PrunePath:
    """Greedy OBS (OBC) removal path of every row of W [R, d], up to ``max_steps`` steps.

    Step: q = argmin w_q^2 / [H^-1]_qq over the eligible weights; w -= w_q / [H^-1]_qq H^-1[:, q];
    H^-1 -= H^-1[:, q] H^-1[q, :] / [H^-1]_qq. ``block=k`` removes the k best per step with the
    group update. ``nm=(n, m)``: at most m - n removed per group of m consecutive inputs (the path
    ends when every group is full; a partial last group counts as padded with removed zeros).
    Dead inputs come first, at loss 0. ``row_scale`` [R]: each row's losses times row_scale[r]
    (e.g. a BatchNorm gain^2). ``H``: one Hessian or ``(rows, H)`` groups."""
    opts = options or DEFAULT_OPTIONS
    gs = layer_groups(W, H, "obs_path")
    max_memory = memory_budget(max_memory, W.device, "obs_path")

    def one(Wg, Hg, rows):
        p = _obs_path(Wg, Hg.to(W.device), max_steps, block, nm, damp, progress, max_memory, opts, stats)
        return p.order, p.loss
    path = PrunePath(*per_group(W, gs, one))
    if row_scale is not None:
        path = PrunePath(path.order, path.loss * row_scale.to(path.loss.device)[:, None])
    return path


def _obs_path(W: Tensor, H: Tensor, max_steps, block, nm, damp, progress, max_memory, opts, stats) -> PrunePath:
    """obs_path for one H ([d, d] or [R, d, d])."""
    W = W.detach()
    R, d = W.shape
    f = pow2_row_scale(W)
    dev, cdt = W.device, _cdtype(W)
    shared = H.dim() == 2
    if H.shape[-2:] != (d, d) or (not shared and H.shape[0] != R):
        raise OsbcError(f"H must be [{d}, {d}] or [{R}, {d}, {d}], got {tuple(H.shape)}")
    block = max(1, int(block))
    if nm is not None:
        gid_all, G, cap, total, pad = _nm_groups(d, nm, dev)
    else:
        total = d
    S = total if max_steps is None else max(0, min(int(max_steps), total))
    order = torch.empty(R, S, dtype=torch.int64, device=dev)
    loss = torch.zeros(R, S, dtype=torch.float64, device=dev)
    if S == 0 or R == 0:
        return PrunePath(order, loss)

    def split(dead_common: Tensor):
        """Inputs removed up front (dead in every row of the chunk: outside the greedy), the active
        ones, and (N:M) each group's removals so far."""
        if nm is None:
            return dead_common, ~dead_common, None
        # dead inputs count against their group's allowance (after a partial group's padding):
        # the first of each group go
        rank = torch.cumsum(dead_common.to(torch.int64), 0) - 1
        first = torch.zeros(G, dtype=torch.int64, device=dev).scatter_reduce_(
            0, gid_all, torch.where(dead_common, rank, torch.full_like(rank, 1 << 40)), "amin", include_self=False)
        pre = dead_common & ((rank - first[gid_all]) < (cap - pad)[gid_all])
        cnt0 = torch.bincount(gid_all[pre], minlength=G) + pad
        return pre, ~pre & (cnt0 < cap)[gid_all], cnt0

    es = torch.finfo(cdt).bits // 8
    workers = _workers(dev, opts)
    lazy, ucache = _lazy_batch(dev, workers, opts, block)
    if shared:
        Hd, L, dead_s = _damped(H.to(dev), damp)
        sigma_s = Hd.diagonal()[~dead_s].mean() if bool((~dead_s).any()) else Hd.new_tensor(1.0)
        del Hd
        pre_s, act_s, cnt0_s = split(dead_s)
        a_s = torch.nonzero(act_s)[:, 0]
        n_s = int(a_s.numel())
        Hi0 = None
        if n_s:
            # dead inputs are decoupled, so the live block of L is the Cholesky factor of the live
            # block of H; inputs kept by a full N:M group still compensate: H^-1 of all live ones
            live_s = torch.nonzero(~dead_s)[:, 0]
            sub = torch.searchsorted(live_s, a_s)
            Hi0 = (_block(_chol_inverse(_block(L, live_s)), sub) * sigma_s).to(cdt)
        del L
        per_row = es * (n_s * n_s + lazy * n_s + 16 * d)
    else:
        per_row = 8 * 3 * d * d + es * (d * d + lazy * d)
    chunks = _chunks(R, _rows_per_chunk(per_row, R, max_memory // workers), workers)
    bar = _progress(progress, R * S, "OBS path")
    bufs = queue.SimpleQueue()       # one H^-1 buffer per worker, reused (no re-faulting)

    def solve(rows: slice):
        c = rows.stop - rows.start
        if shared:
            dead, sigma = dead_s[None].expand(c, d), sigma_s.reshape(1)
            pre, act, cnt0, a_idx = pre_s, act_s, cnt0_s, a_s
        else:
            Hd_c, L_c, dead = _damped(H[rows].to(dev), damp)
            Hinv_c = _chol_inverse(L_c)
            live = (~dead).to(torch.float64)
            sigma = (Hd_c.diagonal(dim1=1, dim2=2) * live).sum(1) / live.sum(1).clamp_min(1)
            sigma = torch.where(sigma > 0, sigma, torch.ones_like(sigma))
            del Hd_c, L_c
            pre, act, cnt0 = split(dead.all(0))
            a_idx = torch.nonzero(act)[:, 0]
        pre_idx = torch.nonzero(pre)[:, 0]
        plen = min(int(pre_idx.numel()), S)
        flops = 0
        order[rows, :plen] = pre_idx[:plen]
        steps = S - plen
        if steps > 0:
            n = int(a_idx.numel())
            if shared:
                buf = _pooled(bufs, lambda: Hi0.new_empty(chunks[0].stop, n, n))
                lz = _Lazy(buf[:c], lazy, base=Hi0, ucache=ucache, panel=opts.panel)
            else:
                lz = _Lazy((Hinv_c[:, a_idx][:, :, a_idx] * sigma[:, None, None]).to(cdt), lazy, ucache=ucache,
                           panel=opts.panel)
            if f is None:
                w = W[rows][:, a_idx].to(cdt).clone()
            else:
                w = (W[rows][:, a_idx].double() / f[rows, None]).to(cdt)
            forced = dead[:, a_idx]
            pen = torch.zeros(c, n, dtype=cdt, device=dev).masked_fill_(forced, -float("inf"))
            idx = a_idx[None].expand(c, n).contiguous()
            nm_state = None
            if nm is not None:
                nm_state = (gid_all[a_idx][None].expand(c, n).contiguous(), cnt0[None].repeat(c, 1), cap)
            with _step_threads(workers, dev, opts):
                if block == 1:
                    q, e, dq, _ = _greedy(lz, w, pen, idx, steps, opts, nm=nm_state, bar=bar)
                else:
                    q, e, dq = _greedy_block(lz, w, pen, idx, steps, block, nm=nm_state, bar=bar)
            flops = lz.flops
            del lz
            if shared:
                bufs.put(buf)
            lo = e.double() ** 2 / (2 * dq.double()) * sigma.to(dev)[:, None]
            if f is not None:
                lo = lo * f[rows, None] ** 2
            lo = lo.masked_fill(dead[torch.arange(c, device=dev)[:, None], q], 0.0)
            order[rows, plen:] = q
            loss[rows, plen:] = lo
        if bar is not None:
            bar.update(c * plen)
        return flops

    flops = _map(solve, chunks, workers)
    if stats is not None:
        stats.add(sum(flops))
    if bar is not None:
        bar.close()
    loss = torch.nan_to_num(loss, nan=0.0, posinf=torch.finfo(torch.float64).max).cummax(1).values
    return PrunePath(order, loss)


def path_from_inverse(w: Tensor, Hinv: Tensor, forced: Tensor, steps: int,
                      options: EngineOptions | None = None) -> PrunePath:
    """The first ``steps`` steps of the greedy OBS path of rows w [c, n] given each row's own
    H^-1 [c, n, n] (taken over as the lazy engine's buffer: it is overwritten), ``forced`` [c, n]
    inputs first at zero loss. For callers that already hold the factor (``restricted``): it skips
    ``obs_path``'s damping, symmetrising and second factorisation. Runs in the calling thread."""
    opts = options or DEFAULT_OPTIONS
    c, n = w.shape
    lazy, ucache = _lazy_batch(w.device, 1, opts)
    lz = _Lazy(Hinv, lazy, ucache=ucache, panel=opts.panel)
    pen = torch.zeros(c, n, dtype=w.dtype, device=w.device).masked_fill_(forced, -float("inf"))
    idx = torch.arange(n, device=w.device)[None].expand(c, n).contiguous()
    q, e, dq, _ = _greedy(lz, w.clone(), pen, idx, min(int(steps), n), opts)
    lo = (e.double() ** 2 / (2 * dq.double())).masked_fill_(forced.gather(1, q), 0.0)
    lo = torch.nan_to_num(lo, nan=0.0, posinf=torch.finfo(torch.float64).max).cummax(1).values
    return PrunePath(q, lo)


def budget_counts(path: PrunePath, k: int, row_scale: Tensor | None = None) -> Tensor:
    """How many of its first path steps each row takes when the layer removes its k cheapest steps
    (each row's losses times row_scale[r], e.g. a BatchNorm gain^2). Ties: earlier rows first."""
    loss = path.loss.to(torch.float64)
    R, S = loss.shape
    k = int(k)
    if k < 0 or k > R * S:
        raise OsbcError(f"budget k={k} outside [0, {R * S}] (R={R} rows x {S} computed steps)")
    if row_scale is not None:
        loss = loss * row_scale.to(device=loss.device, dtype=torch.float64).clamp_min(0).reshape(R, 1)
    if k == 0:
        return torch.zeros(R, dtype=torch.int64, device=loss.device)
    flat = torch.nan_to_num(loss, nan=float("inf")).reshape(-1)
    pick = torch.sort(flat, stable=True).indices[:k]
    return torch.bincount(pick // S, minlength=R)


def _keep_from_counts(order: Tensor, counts: Tensor, d: int) -> Tensor:
    R, S = order.shape
    removed = torch.arange(S, device=order.device)[None] < counts.to(order.device)[:, None]
    keep = torch.ones(R, d + 1, dtype=torch.bool, device=order.device)   # column d: sink for the rest
    return keep.scatter_(1, torch.where(removed, order, d), False)[:, :d]


def _row_losses(W0: Tensor, W1: Tensor, H: Tensor, row_scale=None) -> Tensor:
    """row_scale[r] * 1/2 dw_r^T H dw_r, float64 [R]."""
    dw = (W1.to(torch.float64) - W0.to(torch.float64))
    Hh = torch.nan_to_num(H.to(device=dw.device, dtype=torch.float64))
    Hdw = dw @ Hh if Hh.dim() == 2 else torch.bmm(Hh, dw[:, :, None])[:, :, 0]
    l = 0.5 * (dw * Hdw).sum(1)
    if row_scale is not None:
        l = l * row_scale.to(device=l.device, dtype=torch.float64).reshape(-1)
    return l


def prune_exact(W: Tensor, H, sparsity, *, block: int = 1, nm=None, row_scale: Tensor | None = None,
                damp: float = 0.01, progress: bool = False, max_memory: int | None = None,
                path: PrunePath | None = None, counts: Tensor | None = None, options: EngineOptions | None = None,
                stats: EngineStats | None = None):
    """Prune the layer's round(sparsity * R * d) cheapest greedy steps (OBS path + layer budget),
    then the closed-form optimum on the kept support. ``sparsity=None`` with ``nm``: the full
    pattern. ``H``: one Hessian or ``(rows, H)`` groups; the budget is the layer's, over all groups.
    ``path`` and ``counts`` (each row's removals along it, e.g. from a network-wide allocation)
    replace the path and the budget. Returns (W_new, keep_mask, row_losses = row_scale * 1/2 dw^T
    H dw per row)."""
    gs = layer_groups(W, H, "prune_exact")
    max_memory = memory_budget(max_memory, W.device, "prune_exact")
    R, d = W.shape
    kw = dict(block=block, nm=nm, damp=damp, progress=progress, max_memory=max_memory, options=options, stats=stats)
    if counts is None:
        k = _budget(sparsity, R, d, nm)
        total = d if nm is None else _nm_groups(d, nm, "cpu")[3]
        if k == 0:
            keep = torch.ones(R, d, dtype=torch.bool, device=W.device)
            return W.clone(), keep, torch.zeros(R, dtype=torch.float64, device=W.device)
        # the path only as far as the budget can reach; rows that use all their computed steps are
        # extended (their unseen losses might still be under the layer's threshold)
        S0 = total if k > 0.6 * R * total else min(total, math.ceil(1.5 * k / R) + 32)
        path = obs_path(W, gs, max_steps=S0, **kw)
        counts = budget_counts(path, k, row_scale)
        need = (counts >= S0) & (S0 < total)
        if bool(need.any()):
            sel = torch.nonzero(need)[:, 0]
            ext = obs_path(W[sel], restrict(gs, sel), **kw)
            order = torch.zeros(R, total, dtype=torch.int64, device=W.device)
            loss = torch.full((R, total), float("inf"), dtype=torch.float64, device=W.device)
            order[:, :S0], loss[:, :S0] = path.order, path.loss
            # filler for unextended rows (never selected: +inf loss); any valid index will do
            order[:, S0:] = path.order[:, :1]
            order[sel], loss[sel] = ext.order, ext.loss
            path = PrunePath(order, loss)
            counts = budget_counts(path, k, row_scale)
    elif path is None:
        raise OsbcError("prune_exact: counts need the path they count along")
    keep = _keep_from_counts(path.order, counts, d)
    W_new = solve_on_support(W, gs, keep, damp, max_memory=max_memory)
    losses = per_group(W, gs, lambda Wg, Hg, rows: _row_losses(Wg, take(W_new, rows), Hg, take(row_scale, rows)))
    return W_new, keep, losses
