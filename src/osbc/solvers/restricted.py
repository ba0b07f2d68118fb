"""Restricted exact greedy: forward selection finds a candidate support, the exact OBS path prunes it.

Per output row w (d inputs) and damped Hessian H, pruning w to v costs 1/2 (w - v)^T H (w - v).
With g = H w and a kept support S, the best kept weights are v_S = H_SS^-1 g_S, at loss
1/2 (w^T H w - g_S^T H_SS^-1 g_S): choosing S is sparse regression with Gram matrix H and target g.
For a candidate set C that contains S, let v_C = H_CC^-1 g_C (the best row on C); then

    loss(v) = loss(v_C) + 1/2 (v_C - v)^T H_CC (v_C - v)      for every v supported inside C,

so choosing S inside C is the same OBS problem on the small pair (v_C, H_CC): the exact backward
greedy (``obs.obs_path``) on it costs O(m^3) per row for |C| = m, not O(d^3).

``prune_restricted``:

1. C per row, ``widen`` times the layer's kept count in all: forward selection (orthogonal least
   squares, ``_forward``: grow S by the input with the largest loss decrease r_j^2 / s_j, O(d |S|)
   per step), its gains made non-increasing per row and the layer's largest taken, so C's size
   follows each row's need (rows that take all their computed steps are extended). Or
   (``candidates="sparsegpt"``) the kept mask of a SparseGPT sweep at ``widen`` times the kept
   density. Dead inputs (zero diagonal of H) are free to remove and never enter C; every input
   outside C is removed.
2. Per row, the exact greedy removal path of (v_C, H_CC), rows padded to their chunk's largest C
   with decoupled zero inputs, which the path removes first at zero loss and which are then dropped.
3. The layer budget as in ``prune_exact``: the layer still has to remove sum_r |C_r| - kept; these
   are the smallest path losses over all rows (each row's path non-decreasing, times
   ``row_scale``), i.e. a prefix of every row's path (``budget_counts``). The kept weights are then
   v_S = H_SS^-1 g_S (what ``solve_on_support`` computes; here from g, with the small H_SS only).

``widen=1`` is plain forward selection (no backward pass). When C would hold half a row's live
inputs anyway (low sparsity) or with an N:M pattern (whose groups keep at least N of every M
inputs), the exact greedy is about as cheap and is used as is. ``H`` is one shared [d, d] Hessian
or a list of ``(rows, H)`` groups (rows with different neuron kernels have different Hessians);
the budget is shared by all groups' rows.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..errors import OsbcError
from .engine.greedy import _jit_module
from .engine.workers import _chunks as _worker_chunks, _map, _workers
from .obs import PrunePath, budget_counts, obs_path, prune_exact
from .options import DEFAULT_OPTIONS
from .pattern import _budget
from .sweep import prune_sparsegpt

__all__ = ["prune_restricted", "DEFAULT_WIDEN"]

DEFAULT_WIDEN = 1.25             # candidate set = this many times the kept support (1.5: ~1% lower error, ~1.3x the time)
_DEFAULT_MAX_MEMORY = 384 * 2 ** 20
_FORWARD_CACHE = 16 * 2 ** 20    # bytes of a forward-selection chunk's factor
# the per-row subproblems run in chunks of this share of max_memory: on the digits layer at 90%,
# quarter-budget chunks were 15% faster than full-budget ones (cache) and peaked at half the memory
_CHUNK_SHARE = 4
_EXACT_SHARE = 0.5               # above this share of live inputs in C, run the exact greedy instead


def _groups(H, R: int, d: int) -> list[tuple[Tensor, Tensor]]:
    if isinstance(H, Tensor):
        if H.shape != (d, d):
            raise OsbcError(f"H must be a shared [{d}, {d}] Hessian or a list of (rows, H) groups, "
                            f"got a tensor of shape {tuple(H.shape)}")
        return [(torch.arange(R), H)]
    groups = [(torch.as_tensor(rows, dtype=torch.int64).reshape(-1), Hg) for rows, Hg in H]
    seen = torch.zeros(R, dtype=torch.int64)
    for rows, Hg in groups:
        if Hg.shape != (d, d):
            raise OsbcError(f"every group's H must be [{d}, {d}], got {tuple(Hg.shape)}")
        seen.index_add_(0, rows.cpu(), torch.ones_like(rows.cpu()))
    if not bool((seen == 1).all()):
        raise OsbcError(f"the (rows, H) groups must cover each of the {R} rows exactly once")
    return groups


def _damped(H: Tensor, damp: float, device) -> tuple[Tensor, Tensor, float]:
    """Float64 H + lambda I (lambda = damp * mean live diagonal) with dead inputs decoupled (unit
    diagonal), the dead mask and lambda: the matrix the other solvers' losses are measured in."""
    H = torch.nan_to_num(H.detach().to(device=device, dtype=torch.float64))
    H = 0.5 * (H + H.mT)
    dead = H.diagonal() <= 0
    H[dead] = 0.0
    H[:, dead] = 0.0
    live = H.diagonal()[~dead]
    lam = damp * (float(live.mean()) if live.numel() else 1.0)
    H.diagonal().add_(lam).masked_fill_(dead, 1.0 + lam)
    return H, dead, lam


def _positions(mask: Tensor) -> tuple[Tensor, Tensor]:
    """[c, d] bool -> ([c, m] its True positions in ascending order, padded; [c, m] validity)."""
    cnt = mask.sum(1)
    m = max(int(cnt.max()), 1)
    pos = torch.sort((~mask).to(torch.int8), dim=1, stable=True).indices[:, :m]
    return pos, torch.arange(m, device=mask.device)[None] < cnt[:, None]


def _chunks(size: Tensor, max_memory: int, per_entry: int, workers: int = 1) -> list[Tensor]:
    """Row index chunks, rows sorted by ``size`` (padding stays small), each chunk's per_entry *
    c * m^2 bytes under max_memory / workers (sizes ascend: a chunk's last row bounds its m), and
    at least ``workers`` chunks where there are rows enough (so every worker gets one)."""
    srt = torch.sort(size, stable=True).indices
    m2 = size[srt].clamp_min(1).to(torch.float64).cpu() ** 2
    R, i, out = len(srt), 0, []
    cap = max(1, -(-R // workers))
    budget = max_memory / workers / per_entry
    while i < R:
        # rows i..i+c-1 padded to the last one's size: the cost (c m_last^2) grows with c
        cost = torch.arange(1, R - i + 1, dtype=torch.float64) * m2[i:]
        c = max(1, min(cap, int(torch.searchsorted(cost, torch.tensor([budget], dtype=torch.float64), right=True))))
        out.append(srt[i:i + c])
        i += c
    return out


def _on_workers(fn, chunks: list, device) -> None:
    """fn(chunk) for every chunk, on one worker thread per core (CPU), each with one intra-op
    thread: the chunks' batched small factorizations do not speed up with threads, and on a busy
    machine MKL's threaded batched Cholesky stalls (measured 6x slower on 2 threads than on 1)."""
    _map(fn, chunks, _workers(device, DEFAULT_OPTIONS))


def _subproblem(Hd: Tensor, g: Tensor, mask: Tensor):
    """Per row, the pair (v, H_CC) on C = mask: positions [c, m], validity, H_CC [c, m, m] (zero on
    the padding) and v = H_CC^-1 g_C [c, m] (the best row supported on C), in float64."""
    pos, valid = _positions(mask)
    both = valid[:, :, None] & valid[:, None, :]
    Hc = Hd[pos[:, :, None], pos[:, None, :]].masked_fill_(~both, 0.0)
    b = g.gather(1, pos) * valid
    pad = Hc.diagonal(dim1=1, dim2=2)
    pad.add_(~valid)                                     # identity on the padding for the solve
    v = torch.cholesky_solve(b[..., None], torch.linalg.cholesky(Hc))[..., 0] * valid
    pad.sub_((~valid).to(pad.dtype))
    return pos, valid, Hc, v


def _restricted_paths(W: Tensor, Hd: Tensor, g: Tensor, cand: Tensor, max_memory: int, bar):
    """The exact greedy path of (v_C, H_CC) of every row (steps as input indices of W, losses
    non-decreasing, +inf past the row's |C|)."""
    R, d = W.shape
    M = max(int(cand.sum(1).max()), 1)
    order = torch.zeros(R, M, dtype=torch.int64, device=W.device)
    loss = torch.full((R, M), float("inf"), dtype=torch.float64, device=W.device)
    workers = _workers(W.device, DEFAULT_OPTIONS)

    def one(rr):
        pos, valid, Hc, v = _subproblem(Hd, g[rr], cand[rr])
        m = pos.shape[1]
        # the padding has a zero diagonal: dead inputs, which the path removes first at zero loss
        path = obs_path(v.to(W.dtype), Hc, damp=0.0, max_memory=max_memory // workers)
        npad = (~valid).sum(1, keepdim=True)
        step = (npad + torch.arange(m, device=W.device)[None]).clamp_max(m - 1)
        real = torch.arange(m, device=W.device)[None] < (m - npad)
        order[rr, :m] = pos.gather(1, path.order.gather(1, step))
        loss[rr, :m] = torch.where(real, path.loss.to(torch.float64).gather(1, step), float("inf"))
        if bar is not None:
            bar.update(len(rr))
    # the path holds ~6 m x m float64 per row
    _on_workers(one, _chunks(cand.sum(1), max_memory // _CHUNK_SHARE, 48, workers), W.device)
    return order, loss


def _forward(Hd: Tensor, g: Tensor, dead: Tensor, steps: int, max_memory: int, dtype):
    """Forward selection (orthogonal least squares) of ``steps`` inputs per row: grow S one input
    at a time, taking j = argmax r_j^2 / s_j with r = g - H_:S H_SS^-1 g_S (the gradient of the
    loss at the best row on S) and s = diag(H - H_:S H_SS^-1 H_S:) (the Schur complement). Each
    step adds one column of a pivoted Cholesky factor, c = (H_:j - C C_j:^T) / sqrt(s_j); then
    r -= c r_j / sqrt(s_j), s -= c^2, and the loss falls by 1/2 r_j^2 / s_j. O(d t) per step.
    Returns (order [r, steps] input indices, gain [r, steps] loss decreases made non-increasing;
    -inf past the live inputs). On CPU with numba the steps run compiled (``engine.jit``), a row
    at a time, the rows shared by the worker threads; otherwise as batched torch ops."""
    R, d = g.shape
    a = torch.nonzero(~dead)[:, 0]
    n = int(a.numel())
    t_max = min(steps, n)
    Ha = Hd[a][:, a].to(dtype)
    G = g[:, a].to(dtype)
    order = torch.zeros(R, steps, dtype=torch.int64, device=g.device)
    gain = torch.full((R, steps), -float("inf"), dtype=torch.float64, device=g.device)
    jit = _jit_module(g.device, DEFAULT_OPTIONS)
    if jit is not None:
        Hn, Gn, on, gn = Ha.numpy(), G.numpy(), order.numpy(), gain.numpy()
        workers = _workers(g.device, DEFAULT_OPTIONS)
        _map(lambda rr: jit.forward_select(Hn, Gn[rr], t_max, on[rr], gn[rr]), _worker_chunks(R, -(-R // workers), workers), workers)
    else:
        _forward_torch(Ha, G, t_max, order, gain, max_memory)
    order[:, :t_max] = a[order[:, :t_max]]
    return order, gain.cummin(1).values


def _forward_torch(Ha: Tensor, G: Tensor, t_max: int, order: Tensor, gain: Tensor, max_memory: int) -> None:
    """``_forward``'s steps as batched torch ops over row chunks (CUDA, or CPU without numba);
    fills order (positions among the live inputs) and gain."""
    R, n = G.shape
    diag = Ha.diagonal()
    # a chunk's factor C is re-read at every step: on CPU keep it about cache-sized (2x faster than
    # large chunks); a GPU wants many rows per step instead
    cap = max_memory if G.is_cuda else min(max_memory, _FORWARD_CACHE)
    c_max = max(1, cap // (Ha.element_size() * n * (t_max + 8)))
    for r0 in range(0, R, c_max):
        rr = slice(r0, min(R, r0 + c_max))
        r = G[rr].clone()
        c = r.shape[0]
        s = diag.expand(c, n).clone()
        free = torch.ones(c, n, dtype=torch.bool, device=G.device)
        C = torch.empty(c, t_max, n, dtype=G.dtype, device=G.device)
        ar = torch.arange(c, device=G.device)
        for t in range(t_max):
            # a nearly dependent input (tiny Schur complement) lowers the loss by nothing that can
            # be trusted: such inputs come last, at zero gain, and leave r and s as they are
            ok = free & (s > 1e-6 * diag)
            j = torch.where(ok, r * r / s.clamp_min(1e-30), torch.where(free, -1.0, -2.0)).argmax(1)
            okj = ok[ar, j]
            sj = torch.where(okj, s[ar, j], 1.0).clamp_min(1e-30).sqrt()
            col = Ha[j]
            if t:
                col = col - torch.bmm(C[ar, :t, j][:, None], C[:, :t])[:, 0]
            col = col * (okj / sj)[:, None]
            C[:, t] = col
            at = r[ar, j] / sj * okj
            r -= col * at[:, None]
            s -= col * col
            free[ar, j] = False
            order[rr, t] = j
            gain[rr, t] = 0.5 * at.double() ** 2


def _solve_kept(W: Tensor, Hd: Tensor, dead: Tensor, lam: float, g: Tensor, keep: Tensor, max_memory: int):
    """Closed-form kept weights v_S = H_SS^-1 g_S per row and its loss 1/2 dw^T H dw on the
    undamped H: dw^T H_damped dw = w^T g - g_S^T v_S at the optimum, less the damping's share."""
    out = torch.zeros_like(W, dtype=torch.float64)
    energy = torch.zeros(W.shape[0], dtype=torch.float64, device=W.device)

    def one(rr):
        pos, valid, _, v = _subproblem(Hd, g[rr], keep[rr])
        out[rr] = out[rr].scatter_add_(1, pos, v)
        energy[rr] = (g[rr].gather(1, pos) * v).sum(1)
    _on_workers(one, _chunks(keep.sum(1), max_memory // _CHUNK_SHARE, 24, _workers(W.device, DEFAULT_OPTIONS)), W.device)
    w = W.to(torch.float64)
    dw = out - w
    # H_damped - H is lam on the diagonal, plus 1 on dead inputs (decoupled with a unit diagonal)
    loss = 0.5 * ((g * w).sum(1) - energy - (dw * dw * (lam + dead.to(dw.dtype))).sum(1))
    return out.to(W.dtype), loss


def _prefix(order: Tensor, counts: Tensor, d: int) -> Tensor:
    """[R, d] mask of the inputs in the first counts[r] steps of each row's ``order``."""
    R, S_ = order.shape
    first = torch.arange(S_, device=order.device)[None] < counts.to(order.device)[:, None]
    mask = torch.zeros(R, d + 1, dtype=torch.bool, device=order.device)    # column d: sink for the rest
    return mask.scatter_(1, torch.where(first, order, d), True)[:, :d]


def _finish(W: Tensor, groups, order: Tensor, loss: Tensor, keep: Tensor, k: int, row_scale, max_memory: int):
    """Remove the layer's k cheapest path steps from ``keep``, solve the kept weights in closed form."""
    R, d = W.shape
    keep = keep & ~_prefix(order, budget_counts(PrunePath(order, loss), k, row_scale), d)
    out = torch.empty_like(W)
    losses = torch.empty(R, dtype=torch.float64, device=W.device)
    for rows, Hd, dead, lam, g, *_ in groups:
        out[rows], losses[rows] = _solve_kept(W[rows], Hd, dead, lam, g, keep[rows], max_memory)
    if row_scale is not None:
        losses = losses * row_scale.to(device=W.device, dtype=torch.float64).reshape(-1)
    return out, keep, losses


def _exact(W: Tensor, H, sparsity, nm, row_scale, damp: float, progress: bool, max_memory: int):
    """The exact greedy (prune_exact takes a shared H and (rows, H) groups alike)."""
    H = H.to(W.device) if isinstance(H, Tensor) else H
    return prune_exact(W, H, sparsity, nm=nm, row_scale=row_scale, damp=damp, progress=progress,
                       max_memory=max_memory)


def prune_restricted(W: Tensor, H, sparsity, *, widen: float = DEFAULT_WIDEN, candidates: str = "forward", nm=None,
                     row_scale: Tensor | None = None, damp: float = 0.01, progress: bool = False,
                     max_memory: int = _DEFAULT_MAX_MEMORY):
    """Prune round(sparsity * R * d) weights of W [R, d]: the exact greedy restricted to a
    candidate support ``widen`` times the kept one, found by forward selection (``candidates=
    "forward"``) or a SparseGPT sweep (``"sparsegpt"``); see the module docstring.

    ``H``: shared [d, d] or a list of (rows, H [d, d]) groups; ``row_scale`` [R]: per-row loss
    weights (e.g. BatchNorm gain^2) in the layer budget; ``nm=(n, m)`` (``sparsity=None``: the full
    pattern) and low sparsity (C over half the live inputs) run the exact greedy. Returns (W_new,
    keep_mask, row_losses = row_scale * 1/2 dw^T H dw per row, H symmetrised), as prune_exact."""
    W = W.detach()
    R, d = W.shape
    if widen < 1:
        raise OsbcError(f"widen must be >= 1 (the candidate set holds the kept support), got {widen!r}")
    if candidates not in ("forward", "sparsegpt"):
        raise OsbcError(f"candidates must be 'forward' or 'sparsegpt', got {candidates!r}")
    if row_scale is not None and row_scale.numel() != R:
        raise OsbcError(f"row_scale must have one entry per row ({R}), got {row_scale.numel()}")
    # N:M (the pattern's budget and partial-last-group rule are prune_exact's): the exact greedy
    k = _budget(sparsity, R, d, nm)
    if nm is not None:
        _groups(H, R, d)
        return _exact(W, H, sparsity, nm, row_scale, damp, progress, max_memory)
    if k == 0:
        return W.clone(), torch.ones_like(W, dtype=torch.bool), torch.zeros(R, dtype=torch.float64, device=W.device)
    kept = R * d - k
    dens = widen * kept / (R * d)
    groups, live = [], 0
    for rows, Hg in _groups(H, R, d):
        rows = rows.to(W.device)
        Hd, dead, lam = _damped(Hg, damp, W.device)
        n_live = int((~dead).sum())
        if dens * d >= _EXACT_SHARE * n_live or n_live == 0:
            return _exact(W, H, sparsity, None, row_scale, damp, progress, max_memory)
        live += len(rows) * n_live
        groups.append((rows, Hd, dead, lam, W[rows].to(torch.float64) @ Hd, Hg))
    if kept > live:                      # some dead inputs must be kept: only at low sparsity
        return _exact(W, H, sparsity, None, row_scale, damp, progress, max_memory)
    cand = torch.zeros(R, d, dtype=torch.bool, device=W.device)
    if candidates == "sparsegpt":
        for rows, _, dead, _, _, Hg in groups:
            cand[rows] = prune_sparsegpt(W[rows], Hg.to(W.device), max(0.0, 1.0 - dens), damp=damp)[1] & ~dead
    else:
        n_cand = min(round(widen * kept), live)
        cdt = torch.float64 if W.dtype == torch.float64 else torch.float32
        steps = min(d, -(-n_cand // R) * 5 // 4 + 16)
        order = torch.zeros(R, steps, dtype=torch.int64, device=W.device)
        gain = torch.full((R, steps), -float("inf"), dtype=torch.float64, device=W.device)
        todo = torch.ones(R, dtype=torch.bool, device=W.device)
        while True:
            for rows, Hd, dead, _, g, _ in groups:
                sel = rows[todo[rows]]
                if len(sel):
                    order[sel], gain[sel] = _forward(Hd, g[todo[rows]], dead, steps, max_memory, cdt)
            # the layer's n_cand largest gains, a prefix of every row's selection
            counts = budget_counts(PrunePath(order, -gain), n_cand, row_scale)
            todo = (counts >= steps) & (gain[:, -1] > -float("inf"))
            if steps == d or not bool(todo.any()):
                break
            # rows that took every computed step may take more: their selection starts again,
            # 1.5x longer (a restart costs its steps squared; on a trained layer with a heavy tail of
            # rows, 1.5x steps took 17% less time than doubling)
            steps = min(d, 3 * steps // 2)
            order = torch.cat([order, order.new_zeros(R, steps - order.shape[1])], 1)
            gain = torch.cat([gain, gain.new_full((R, steps - gain.shape[1]), -float("inf"))], 1)
        cand = _prefix(order, counts, d)
    if kept > int(cand.sum()):
        raise RuntimeError(f"candidate set of {int(cand.sum())} inputs under the {kept} to keep")
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=R, desc="restricted OBS", unit="row", leave=False)
    rest = int(cand.sum()) - kept        # everything outside C goes; the rest comes off the paths
    order = torch.zeros(R, d if rest else 1, dtype=torch.int64, device=W.device)
    loss = torch.full(order.shape, float("inf"), dtype=torch.float64, device=W.device)
    for rows, Hd, _, _, g, _ in groups if rest else []:
        o, lo = _restricted_paths(W[rows], Hd, g, cand[rows], max_memory, bar)
        order[rows, :o.shape[1]], loss[rows, :o.shape[1]] = o, lo
    if bar is not None:
        bar.close()
    return _finish(W, groups, order, loss, cand, rest, row_scale, max_memory)
