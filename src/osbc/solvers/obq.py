"""Exact OBQ quantization (the greedy, one weight per step, each rounded and compensated), and the
per-row choice between it and GPTQ."""
from __future__ import annotations

import queue

import torch
from torch import Tensor

from ..quant import Grid
from .baselines import _finish_q
from .damping import _block, _cdtype, _chol_inverse, _damped
from .engine.greedy import _greedy, _lazy_batch
from .engine.lazy import _Lazy
from .engine.workers import _chunks, _map, _pooled, _progress, _rows_per_chunk, _step_threads, _workers
from .fixed_support import _padded, _sym_gather
from .groups import layer_groups, per_group, take
from .options import DEFAULT_OPTIONS, EngineOptions, EngineStats, memory_budget
from .pattern import pow2_row_scale
from .sweep import quantize_gptq

__all__ = ["quantize_obq", "quantize_exact"]


def quantize_exact(W: Tensor, H, grid: Grid, *, keep_mask: Tensor | None = None, damp: float = 0.01,
                   progress: bool = False, max_memory: int | None = None, options: EngineOptions | None = None,
                   stats: EngineStats | None = None) -> Tensor:
    """Each row from OBQ or GPTQ, whichever has the lower error dw^T H dw. OBQ's greedy order is not
    always better than GPTQ's fixed one (seen on layers with many silent inputs), and GPTQ is cheap
    next to OBQ. ``H``: [d, d] or ``(rows, H)`` groups, each sharing one H."""
    gs = layer_groups(W, H, "quantize_exact", grid)
    max_memory = memory_budget(max_memory, W.device, "quantize_exact")

    def best(Wg, Hg, rows):
        Hg, sub, k = Hg.to(W.device), grid.select(rows), take(keep_mask, rows)
        q = quantize_gptq(Wg, Hg, sub, keep_mask=k, damp=damp)
        q_obq = quantize_obq(Wg, Hg, sub, keep_mask=k, damp=damp, progress=progress, max_memory=max_memory,
                             options=options, stats=stats)
        better = _row_error(q_obq - Wg, Hg) <= _row_error(q - Wg, Hg)
        return torch.where(better[:, None], q_obq, q)
    return per_group(W, gs, best)


def _row_error(dw: Tensor, H: Tensor) -> Tensor:
    """dw_r^T H dw_r per row: each row's share of the layer-wise objective."""
    dw = dw.double()
    return ((dw @ H.double()) * dw).sum(1)


def quantize_obq(W: Tensor, H, grid: Grid, *, keep_mask: Tensor | None = None, damp: float = 0.01,
                 progress: bool = False, max_memory: int | None = None, options: EngineOptions | None = None,
                 stats: EngineStats | None = None) -> Tensor:
    """OBQ greedy per row: quantize first the weight with the smallest (w_q - quant(w_q))^2 / [H^-1]_qq,
    compensate the others, downdate H^-1, repeat. Pruned weights (keep_mask False) stay exactly 0:
    the greedy runs on each row's kept support with H^-1 of that support. Dead inputs: rounded.
    ``H``: [d, d], [R, d, d] or ``(rows, H)`` groups."""
    opts = options or DEFAULT_OPTIONS
    gs = layer_groups(W, H, "quantize_obq", grid)
    max_memory = memory_budget(max_memory, W.device, "quantize_obq")
    return per_group(W, gs, lambda Wg, Hg, rows: _obq(
        Wg, Hg, grid.select(rows), take(keep_mask, rows), damp, progress, max_memory, opts, stats))


def _obq(W: Tensor, H: Tensor, grid: Grid, keep_mask, damp, progress, max_memory, opts, stats) -> Tensor:
    R, d = W.shape
    dev, cdt = W.device, _cdtype(W)
    keep = None if keep_mask is None else keep_mask.to(device=dev, dtype=torch.bool)
    shared = H.dim() == 2
    w0 = W.detach().to(cdt)
    out = grid.quantize(w0)                     # dead inputs (and the fallback) : round to nearest
    sc_all = grid.scale.to(device=dev, dtype=cdt)
    ws, f = w0, pow2_row_scale(W)      # rows of huge weights: solved at a power-of-two scale, exactly
    if f is not None:
        ws = (W.detach().double() / f[:, None]).to(cdt)
        sc_all = (grid.scale.to(device=dev, dtype=torch.float64) / f).to(cdt)
    qmin, qmax = grid.qmin, grid.qmax
    es = torch.finfo(cdt).bits // 8
    if shared:
        Hd, L, dead_s = _damped(H.to(dev), damp)
    workers = _workers(dev, opts)
    lazy, ucache = _lazy_batch(dev, workers, opts)
    if shared and (keep is None or bool(keep[:, ~dead_s].all())):
        # every row works on the same live inputs: one H^-1 for all
        a = torch.nonzero(~dead_s)[:, 0]
        n = int(a.numel())
        if n:
            Hinv = _chol_inverse(_block(L, a))
            Hinv = (Hinv * Hd.diagonal()[a].mean()).to(cdt)
            del L
            chunks = _chunks(R, _rows_per_chunk(es * (n * n + lazy * n + 16 * n), R, max_memory // workers), workers)
            bar = _progress(progress, R * n, "OBQ")
            bufs = queue.SimpleQueue()

            def solve(rows: slice):
                c = rows.stop - rows.start
                buf = _pooled(bufs, lambda: Hinv.new_empty(chunks[0].stop, n, n))
                lz = _Lazy(buf[:c], lazy, base=Hinv, ucache=ucache, panel=opts.panel)
                w = ws[rows][:, a].clone()
                pen = torch.zeros_like(w)
                idx = a[None].expand(c, n).contiguous()
                with _step_threads(workers, dev, opts):
                    q, _, _, t = _greedy(lz, w, pen, idx, n, opts, quant=(sc_all[rows, None], qmin, qmax), bar=bar)
                flops = lz.flops
                del lz
                bufs.put(buf)
                out[rows] = out[rows].scatter_(1, q, _unscale(t, f, rows))
                return flops

            _record(stats, _map(solve, chunks, workers))
            if bar is not None:
                bar.close()
        return _finish_q(out, grid, keep, W.dtype)

    # per-row supports (a pruned layer, or per-row H): H^-1 of each row's kept live inputs
    if shared:
        dead = dead_s[None].expand(R, d)
    else:
        dead = (torch.nan_to_num(H.diagonal(dim1=1, dim2=2).to(torch.float64)) <= 0).to(dev)
    supp = ~dead if keep is None else keep & ~dead
    nS = supp.sum(1)
    order_rows = torch.sort(nS, stable=True).indices
    bar = _progress(progress, int(nS.sum()), "OBQ")

    def per_row(m):
        return 8 * 3 * m * m + es * (m * m + lazy * m + 16 * m) + (0 if shared else 8 * 3 * d * d)

    # rows sorted by support size, so a chunk's padding stays small; its last row bounds its size
    chunks, i = [], 0
    while i < R:
        c0 = _rows_per_chunk(per_row(int(nS[order_rows[i]])), R - i, max_memory // workers)
        c = _rows_per_chunk(per_row(int(nS[order_rows[i + c0 - 1]])), R - i, max_memory // workers)
        chunks.append(order_rows[i:i + c])
        i += c

    def solve(rr: Tensor):
        pos, valid = _padded(supp[rr])
        m = pos.shape[1]
        if int(nS[rr].max()) == 0:
            return 0
        M = Hd if shared else _damped(H[rr.to(H.device)].to(dev), damp)[0]
        A = _sym_gather(M, pos, valid)
        del M
        Lc, info = torch.linalg.cholesky_ex(A)
        if bool((info != 0).any()):
            A = A + torch.diag_embed(A.diagonal(dim1=1, dim2=2) * 1e-8)
            Lc = torch.linalg.cholesky_ex(A)[0]
        sig = (A.diagonal(dim1=1, dim2=2) * valid).sum(1) / valid.sum(1).clamp_min(1)
        lz = _Lazy((_chol_inverse(Lc) * sig[:, None, None]).to(cdt), lazy, ucache=ucache, panel=opts.panel)
        del A, Lc
        w = ws[rr].gather(1, pos) * valid
        pen = torch.zeros_like(w).masked_fill_(~valid, 1e30)     # padding: picked last, a no-op
        idx = torch.where(valid, pos, torch.full_like(pos, d))
        with _step_threads(workers, dev, opts):
            q, _, _, t = _greedy(lz, w, pen, idx, m, opts, quant=(sc_all[rr, None], qmin, qmax), bar=bar)
        flops = lz.flops
        del lz
        o = torch.cat([out[rr], out.new_zeros(len(rr), 1)], 1)
        o.scatter_(1, q, _unscale(t, f, rr))
        out[rr] = o[:, :d]
        return flops

    _record(stats, _map(solve, chunks, workers))
    if bar is not None:
        bar.close()
    return _finish_q(out, grid, keep, W.dtype)



def _record(stats: EngineStats | None, flops: list[int]) -> None:
    if stats is not None:
        stats.add(sum(flops))


def _unscale(t: Tensor, f: Tensor | None, rows) -> Tensor:
    return t if f is None else (t.double() * f[rows, None]).to(t.dtype)
