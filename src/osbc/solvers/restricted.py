"""Restricted exact greedy: forward selection finds a candidate support, the exact OBS path prunes it.

Per output row w (d inputs) and damped Hessian H, pruning w to v costs 1/2 (w - v)^T H (w - v).
With g = H w and a kept support S, the best kept weights are v_S = H_SS^-1 g_S, at loss
1/2 (w^T H w - g_S^T H_SS^-1 g_S): choosing S is sparse regression with Gram matrix H and target g.
For a candidate set C that contains S, let v_C = H_CC^-1 g_C (the best row on C); then

    loss(v) = loss(v_C) + 1/2 (v_C - v)^T H_CC (v_C - v)      for every v supported inside C,

so choosing S inside C is the same OBS problem on the small pair (v_C, H_CC): the exact backward
greedy (as ``obs.obs_path``) on it costs O(m^3) per row for |C| = m, not O(d^3).

``prune_restricted``:

1. C per row, ``widen`` times the layer's kept count in all: forward selection (orthogonal least
   squares, ``_forward``: grow S by the input with the largest loss decrease r_j^2 / s_j, O(d |S|)
   per step; at low sparsity the later steps only among pools, narrowing in stages, of the inputs
   that score best after the first ones, ``_POOL_*``), its gains made non-increasing per row and the layer's largest taken, so C's size
   follows each row's need (``_select``: a sample of rows estimates the layer's gain threshold,
   the other rows stop a margin under it; rows that take all their computed steps go again). Or
   (``candidates="sparsegpt"``) the kept mask of a SparseGPT sweep at ``widen`` times the kept
   density. Dead inputs (zero diagonal of H) are free to remove and never enter C; every input
   outside C is removed.
2. Per row, the exact greedy removal path of (v_C, H_CC) (``obs.path_from_inverse``), rows padded
   to their chunk's largest C with decoupled zero inputs, which the path removes first at zero
   loss and which are then dropped. The budget removes about (widen - 1) / widen of C, so each
   path is computed only about twice as far as a row's average share (rows that take all of it
   go again, longer): past the inverse, a path's cost grows with its length.
3. The layer budget as in ``prune_exact``: the layer still has to remove sum_r |C_r| - kept; these
   are the smallest path losses over all rows (each row's path non-decreasing, times
   ``row_scale``), i.e. a prefix of every row's path (``budget_counts``). The kept weights are then
   v_S = H_SS^-1 g_S (what ``solve_on_support`` computes; here from g, with the small H_SS only).

``widen=1`` is plain forward selection (no backward pass). When C would hold half a row's live
inputs anyway (low sparsity) or with an N:M pattern (whose groups keep at least N of every M
inputs), the exact greedy is about as cheap and is used as is. ``H`` is one shared [d, d] Hessian
or a list of ``(rows, H)`` groups (rows with different neuron kernels have different Hessians);
the budget is shared by all groups' rows.

Rows of huge or tiny weights (``pattern.pow2_row_scale``) and each group's H (to a mean live
diagonal in [1/4, 4)) are solved at power-of-two scales, which keep the float32 scores in range
and change nothing else; the budget compares the true losses. An H with an infinite entry, or one
no damping makes positive definite on some candidate block, goes to the exact greedy, whose
damping repairs it.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from ..errors import OsbcError
from .engine.greedy import _jit_module
from .engine.workers import _chunks as _worker_chunks, _map, _workers
from .damping import _chol_inverse, _symmetrize_
from .obs import PrunePath, budget_counts, path_from_inverse, prune_exact
from .options import DEFAULT_OPTIONS, memory_budget
from .groups import layer_groups
from .pattern import _budget, pow2_row_scale
from .sweep import prune_sparsegpt

__all__ = ["prune_restricted", "DEFAULT_WIDEN"]

DEFAULT_WIDEN = 1.25             # candidate set = this many times the kept support (1.5: ~1% lower error, ~1.3x the time)
_FORWARD_CACHE = 16 * 2 ** 20    # bytes of a forward-selection chunk's factor
# the per-row subproblems run in chunks of this share of max_memory: on the digits layer at 90%,
# quarter-budget chunks were 15% faster than full-budget ones (cache) and peaked at half the memory
_CHUNK_SHARE = 4
# forward selection: rows sampled to estimate the layer's gain threshold, and the share of it
# under which the other rows stop (a margin for the sample's error)
_SAMPLE_ROWS = 16
_STOP_SAFETY = 0.9
_SAMPLE_REACH = 1.25              # the sampled rows' steps: this many times the average share (more: re-run)
# a forward step's pass over its row's factor streams it from memory past this size (two workers
# sharing a 32 MB L3): it then computes three speculated columns instead of one (4608 inputs at 90%:
# no change; 8192: 14% faster per row; smaller factors: slower)
_WIDE_PASS = 16 * 2 ** 20
# at low sparsity (candidates over _POOL_FROM of the live inputs per row) a row's selection goes on
# among fewer inputs as it proceeds: for each (at, times) of _POOL_STAGES, after at x the average
# candidate count of steps, among the times x (steps left) + 8 inputs that score best at that
# point; most of the arithmetic of the late steps is on inputs that are never picked. The first
# stage cut the selection's time by about a tenth at 90% (one stage at 0.64x before); on the
# trained digits layer at 90% a first stage at 0.2-0.3x lost 0.2-0.3%, stages from 0.1x 2.6-12%,
# and a last width of 1x 1.3%.
_POOL_FROM = 0.1
_POOL_STAGES = ((0.4, 3.0), (0.64, 2.0))
_PATH_REACH = 2.0                # first path length: this many times the average share removed
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


def _damped(H: Tensor, damp: float, device) -> tuple[Tensor, Tensor, float, float]:
    """Float64 c H + lambda I (lambda = damp * mean live diagonal of c H) with dead inputs
    decoupled (unit diagonal), the dead mask, lambda and c: the matrix the other solvers' losses
    are measured in, at a power-of-four scale c that brings its mean live diagonal into [1/4, 4).
    The forward selection's float32 scores r^2 / s overflow from about |g| ~ 1e19 and underflow
    under 1e-19; on c H every loss is c times H's, and a power of four keeps every product and
    the Cholesky factors' square roots exact: the result is that of the unscaled problem."""
    H = H.detach().to(device=device, dtype=torch.float64, copy=True)
    _symmetrize_(torch.nan_to_num_(H))                   # in place: H can be large
    dead = H.diagonal() <= 0
    H.masked_fill_(dead[:, None], 0.0).masked_fill_(dead[None, :], 0.0)
    live = H.diagonal()[~dead]
    mean = float(live.mean()) if live.numel() else 1.0
    c = 1.0
    if 0 < mean < float("inf"):
        c = 2.0 ** (-2 * (int(torch.frexp(torch.tensor(mean, dtype=torch.float64)).exponent) // 2))
        H.mul_(c)
    lam = damp * mean * c
    H.diagonal().add_(lam).masked_fill_(dead, 1.0 + lam)
    return H, dead, lam, c


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


class _NotPositiveDefinite(Exception):
    """A candidate block of H that float64 cannot factor: H is not positive definite after the
    damping (a user-supplied indefinite matrix). ``prune_restricted`` then runs the exact greedy,
    whose damping repairs such an H."""


def _subproblem(Hd: Tensor, g: Tensor, mask: Tensor, dtype=torch.float64):
    """Per row, the pair (v, H_CC) on C = mask: positions [c, m], validity, v = H_CC^-1 g_C [c, m]
    (the best row supported on C, float64) and the Cholesky factor of H_CC [c, m, m] with identity
    on the padding, in ``dtype``: a float32 factor takes half the time, and two refinement steps in
    float64 (residual g_C - H_CC v; each shrinks v's error by about cond(H_CC) * 6e-8) bring v back
    to about float64's accuracy. A chunk whose blocks float32 cannot factor is factored in float64."""
    pos, valid = _positions(mask)
    jit = _jit_module(Hd.device, DEFAULT_OPTIONS)
    if jit is not None:
        Hc = Hd.new_empty(pos.shape + pos.shape[1:])
        jit.principal_blocks(Hd.numpy(), pos.numpy(), mask.sum(1).numpy(), Hc.numpy())
    else:
        both = valid[:, :, None] & valid[:, None, :]
        Hc = Hd[pos[:, :, None], pos[:, None, :]].masked_fill_(~both, 0.0)
        Hc.diagonal(dim1=1, dim2=2).add_(~valid)         # identity on the padding
    b = g.gather(1, pos) * valid
    L, info = torch.linalg.cholesky_ex(Hc.to(dtype))
    if dtype != torch.float64 and bool((info != 0).any()):
        # a block too ill-conditioned for a float32 factor (nearly equal inputs, little damping)
        dtype = torch.float64
        L, info = torch.linalg.cholesky_ex(Hc)
    if bool((info != 0).any()):
        raise _NotPositiveDefinite
    v = torch.cholesky_solve(b[..., None].to(dtype), L)[..., 0].double() * valid
    for _ in range(2 if dtype != torch.float64 else 0):
        res = b - (Hc @ v[..., None])[..., 0]
        v += torch.cholesky_solve(res[..., None].to(dtype), L)[..., 0].double() * valid
    del Hc
    return pos, valid, v, L


def _restricted_paths(W: Tensor, Hd: Tensor, g: Tensor, cand: Tensor, need: Tensor, max_memory: int, bar):
    """The exact greedy path of (v_C, H_CC) of every row, at least need[r] steps of it (steps as
    input indices of W, losses non-decreasing, +inf past the computed steps), and how many steps
    of each row were computed (a row's cap, or its |C|)."""
    R, d = W.shape
    size = cand.sum(1)
    M = max(int(size.max()), 1)
    order = torch.zeros(R, M, dtype=torch.int64, device=W.device)
    loss = torch.full((R, M), float("inf"), dtype=torch.float64, device=W.device)
    done = torch.zeros(R, dtype=torch.int64, device=W.device)
    workers = _workers(W.device, DEFAULT_OPTIONS)

    def one(rr):
        pos, valid, v, L = _subproblem(Hd, g[rr], cand[rr], W.dtype)
        m = pos.shape[1]
        npad = (~valid).sum(1)
        # the padding is forced out first; only the prefix the budget can reach is computed: the
        # path's cost past the inverse grows with its length
        steps = min(m, int((npad + need[rr]).max()))
        # scaled to a unit mean diagonal of H_CC (as obs_path does): well inside float32's range.
        # The factor and the inverse are in the path's precision (float32 halves their time; v is
        # refined to float64 accuracy in _subproblem)
        sigma = (Hd.diagonal()[pos] * valid).sum(1) / valid.sum(1).clamp_min(1)
        sigma = torch.where(sigma > 0, sigma, 1.0)       # a row with no candidates: all padding
        Hi = _chol_inverse(L / sigma[:, None, None].sqrt().to(L.dtype)).to(W.dtype)
        del L
        path = path_from_inverse(v.to(W.dtype), Hi, ~valid, steps)
        real = torch.arange(steps, device=W.device)[None] < (steps - npad)[:, None]
        k = torch.arange(steps, device=W.device)[None] + npad[:, None]
        k = k.clamp_max(steps - 1)
        order[rr, :steps] = pos.gather(1, path.order.gather(1, k))
        loss[rr, :steps] = torch.where(real, path.loss.gather(1, k) * sigma[:, None], float("inf"))
        done[rr] = steps - npad
        if bar is not None:
            bar.update(len(rr))
    # the inverse and the path hold ~6 m x m float64 per row
    _on_workers(one, _chunks(size, max_memory // _CHUNK_SHARE, 48, workers), W.device)
    return order, loss, done


def _live_gram(Hd: Tensor, dead: Tensor, dtype) -> tuple[Tensor, Tensor]:
    """(live input indices a, H[a][:, a] in the forward selection's precision)."""
    a = torch.nonzero(~dead)[:, 0]
    return a, Hd[a][:, a].to(dtype)


def _forward(Hd: Tensor, g: Tensor, dead: Tensor, steps: int, max_memory: int, dtype, stop: Tensor | None = None,
             gram: tuple[Tensor, Tensor] | None = None, bar=None, pools: tuple[tuple[int, int], ...] = ()):
    """Forward selection (orthogonal least squares) of up to ``steps`` inputs per row: grow S one
    input at a time, taking j = argmax r_j^2 / s_j with r = g - H_:S H_SS^-1 g_S (the gradient of
    the loss at the best row on S) and s = diag(H - H_:S H_SS^-1 H_S:) (the Schur complement). Each
    step adds one column of a pivoted Cholesky factor, c = (H_:j - C C_j:^T) / sqrt(s_j); then
    r -= c r_j / sqrt(s_j), s -= c^2, and the loss falls by 1/2 r_j^2 / s_j. O(d t) per step.
    ``stop`` [r]: a row may stop once the least of its gains so far is under stop[r] (the compiled
    steps do; the batched torch steps run every row to the end). ``gram``: ``_live_gram``'s
    result, when the caller runs several selections on one H. ``bar``: a progress bar, advanced by
    the rows done. ``pools``: (t, width) stages, t ascending and width descending (``_pool_plan``):
    after t steps each row goes on among the width inputs that then score best of those it still
    scores (their scores exact, the others no longer updated: a step then costs width / n of a
    full one), in position order, a width never under the steps left; empty: every step over all
    inputs.
    Returns (order [r, steps] input indices, gain [r, steps] loss decreases made non-increasing,
    -inf past the computed steps, ran [r] steps computed). On CPU with numba the steps run
    compiled (``engine.jit``), a row at a time, the rows shared by the worker threads; otherwise
    as batched torch ops."""
    R, d = g.shape
    a, Ha = gram if gram is not None else _live_gram(Hd, dead, dtype)
    n = int(a.numel())
    t_max = min(steps, n)
    G = g[:, a].to(dtype)
    order = torch.zeros(R, steps, dtype=torch.int64, device=g.device)
    gain = torch.full((R, steps), -float("inf"), dtype=torch.float64, device=g.device)
    ran = torch.full((R,), t_max, dtype=torch.int64, device=g.device)
    splits = [min(int(t), t_max) for t, _ in pools]
    # a pool never narrower than the steps left: a row that ran out of inputs would take one twice
    widths = [min(max(int(w), t_max - t, 1), n) for t, (_, w) in zip(splits, pools)]
    jit = _jit_module(g.device, DEFAULT_OPTIONS)
    if jit is not None:
        stop = torch.full((R,), -float("inf"), dtype=torch.float64) if stop is None else stop.to(torch.float64)
        Hn, Gn, sn, on, gn, rn = Ha.numpy(), G.numpy(), stop.numpy(), order.numpy(), gain.numpy(), ran.numpy()
        # each worker holds one row's factor [t_max, n] (a pool is gathered into it): no more
        # workers than max_memory holds (a single row's factor is the least the selection needs)
        per_worker = Ha.element_size() * t_max * n
        workers = max(1, min(_workers(g.device, DEFAULT_OPTIONS), max_memory // max(per_worker, 1)))

        def one(rr):
            jit.forward_select(Hn, Gn[rr], t_max, sn[rr], on[rr], gn[rr], rn[rr], _WIDE_PASS,
                               np.array(splits, np.int64), np.array(widths, np.int64))
            if bar is not None:
                bar.update(rr.stop - rr.start)
        # several chunks per worker: the progress bar moves (the chunks' size does not change the time)
        _map(one, _worker_chunks(R, -(-R // (8 * workers)), workers), workers)
    else:
        _forward_torch(Ha, G, t_max, order, gain, max_memory, dict(zip(splits, widths)))
        if bar is not None:
            bar.update(R)
    order[:, :t_max] = a[order[:, :t_max]]
    return order, gain.cummin(1).values, ran


def _forward_torch(Ha: Tensor, G: Tensor, t_max: int, order: Tensor, gain: Tensor, max_memory: int,
                   pools: dict[int, int]) -> None:
    """``_forward``'s steps as batched torch ops over row chunks (CUDA, or CPU without numba);
    fills order (positions among the live inputs) and gain. After t steps (each key of
    ``pools``) each row goes on among its pools[t] best-scoring free inputs (as the compiled steps)."""
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
        dg = diag.expand(c, n)
        free = torch.ones(c, n, dtype=torch.bool, device=G.device)
        C = torch.empty(c, t_max, n, dtype=G.dtype, device=G.device)
        ar = torch.arange(c, device=G.device)
        P = None                 # the pool's positions [c, pool] once the row goes on among them
        for t in range(t_max):
            if pools.get(t, r.shape[1]) < r.shape[1]:
                score = torch.where(free & (s > 1e-6 * dg), r * r / s.clamp_min(1e-30), torch.where(free, -1.0, -2.0))
                # the best (ties: the lower position first), kept in position order: the compiled steps' pool
                Q = torch.sort(score, dim=1, descending=True, stable=True).indices[:, :pools[t]].sort(dim=1).values
                r, s, free, dg = r.gather(1, Q), s.gather(1, Q), free.gather(1, Q), dg.gather(1, Q)
                C = C.gather(2, Q[:, None, :].expand(c, t_max, Q.shape[1])).contiguous()
                P = Q if P is None else P.gather(1, Q)
            # a nearly dependent input (tiny Schur complement) lowers the loss by nothing that can
            # be trusted: such inputs come last, at zero gain, and leave r and s as they are
            ok = free & (s > 1e-6 * dg)
            j = torch.where(ok, r * r / s.clamp_min(1e-30), torch.where(free, -1.0, -2.0)).argmax(1)
            okj = ok[ar, j]
            sj = torch.where(okj, s[ar, j], 1.0).clamp_min(1e-30).sqrt()
            jg = j if P is None else P[ar, j]
            col = Ha[jg] if P is None else Ha[jg].gather(1, P)
            if t:
                col = col - torch.bmm(C[ar, :t, j][:, None], C[:, :t])[:, 0]
            col = col * (okj / sj)[:, None]
            C[:, t] = col
            at = r[ar, j] / sj * okj
            r -= col * at[:, None]
            s -= col * col
            free[ar, j] = False
            order[rr, t] = jg
            gain[rr, t] = 0.5 * at.double() ** 2


def _pool_plan(avg: float, n_live: int, length: int) -> tuple[tuple[int, int], ...]:
    """``_forward``'s pools for a selection of up to ``length`` steps, ``avg`` candidates per row on
    average among ``n_live`` inputs: where the candidates exceed _POOL_FROM of the inputs, a
    (t, width) stage for each of _POOL_STAGES narrower than the inputs and the stage before; else none."""
    if avg <= _POOL_FROM * n_live:
        return ()
    stages, left = [], n_live
    for at, times in _POOL_STAGES:
        t = round(at * avg)
        width = round(times * max(0, length - t)) + 8
        if width < left:
            stages.append((t, width))
            left = width
    return tuple(stages)


def _select(groups, W: Tensor, n_cand: int, row_scale, max_memory: int, dtype, bar=None) -> Tensor:
    """[R, d] candidate mask: the layer's n_cand largest forward-selection gains (times
    row_scale), a prefix of every row's selection.

    A row's selection costs its steps squared, and rows need from under one to over 1.5 times the
    average share, so no single length fits all rows. A sample of rows, selected to
    _SAMPLE_REACH times the average (a sampled row that needs more is run again like any other),
    estimates the layer's least taken gain tau; every other row stops once its gains fall under
    _STOP_SAFETY * tau. A row that took every step it computed (tau was overestimated, or it
    reached the step cap) starts again, stopping under _STOP_SAFETY times the threshold of all
    rows so far, with 1.5x the steps where it hit the cap. The result is that of one run of every
    row to the end, with the pools (``_pool_plan``) of the first length for every row whose
    steps never grew (tested); on the benchmark layers at 90% the steps computed cost 1.09-1.19x
    (sum of squared steps) what the rows take, where one length for all cost 1.7-2.1x."""
    R, d = W.shape
    dev = W.device
    scale = torch.ones(R, dtype=torch.float64, device=dev) if row_scale is None else \
        row_scale.to(device=dev, dtype=torch.float64).reshape(-1).clamp_min(0)
    n_live = torch.zeros(R, dtype=torch.int64, device=dev)
    for rows, _, dead, *_ in groups:
        n_live[rows] = int((~dead).sum())
    steps = min(d, 3 * -(-n_cand // R) // 2 + 16)
    nominal = steps
    order = torch.zeros(R, steps, dtype=torch.int64, device=dev)
    gain = torch.full((R, steps), -float("inf"), dtype=torch.float64, device=dev)
    ran = torch.zeros(R, dtype=torch.int64, device=dev)
    stop = torch.full((R,), -float("inf"), dtype=torch.float64, device=dev)

    # one shared H: its live Gram matrix once for all runs (with many groups, e.g. a kernel per
    # neuron, holding all of theirs could take more memory than the layer is worth)
    grams = [_live_gram(Hd, dead, dtype) for _, Hd, dead, *_ in groups] if len(groups) == 1 else [None] * len(groups)

    def run(todo: Tensor, length: int):
        # every row's pool as wide as a run to the nominal length gives it (the sample's shorter runs
        # too): a row's candidates do not depend on whether it was sampled
        pools = _pool_plan(n_cand / R, int(n_live.min()), max(length, nominal))
        for (rows, Hd, dead, _, g, _), gram in zip(groups, grams):
            sel = rows[todo[rows]]
            if len(sel):
                order[sel, :length], gain[sel, :length], ran[sel] = _forward(
                    Hd, g[todo[rows]], dead, length, max_memory, dtype, stop[sel], gram, bar, pools)

    def threshold(rows: Tensor, k: int) -> tuple[Tensor, float]:
        """Each row's count of the k largest scaled gains among ``rows``, and the least of those."""
        taken = (gain * scale[:, None]).masked_fill_(~rows[:, None], -float("inf"))
        counts = budget_counts(PrunePath(order, -taken), k, None)
        at = taken.gather(1, (counts - 1).clamp_min(0)[:, None])[:, 0]
        return counts, float(torch.where(counts > 0, at, float("inf")).min())

    sample = torch.zeros(R, dtype=torch.bool, device=dev)
    sample[torch.linspace(0, R - 1, min(R, max(_SAMPLE_ROWS, R // 32)), device=dev).round().long()] = True
    run(sample, min(steps, round(_SAMPLE_REACH * n_cand / R) + 16))
    _, tau = threshold(sample, round(n_cand * int(sample.sum()) / R))
    stop = torch.where(sample, stop, _STOP_SAFETY * tau / scale)
    run(~sample, steps)
    everyone = torch.ones(R, dtype=torch.bool, device=dev)
    while True:
        counts, tau = threshold(everyone, n_cand)
        todo = (counts >= ran) & (ran < n_live)
        if not bool(todo.any()):
            return _prefix(order, counts, d)
        # a lower stop than last time, else none (a row with row_scale 0 has an infinite one)
        lower = _STOP_SAFETY * tau / scale
        stop = torch.where(todo, torch.where(lower < stop, lower, -float("inf")), stop)
        if bool((todo & (ran >= steps)).any()) and steps < d:
            steps = min(d, 3 * steps // 2)
            order = torch.cat([order, order.new_zeros(R, steps - order.shape[1])], 1)
            gain = torch.cat([gain, gain.new_full((R, steps - gain.shape[1]), -float("inf"))], 1)
        if bar is not None:
            bar.total += int(todo.sum())
            bar.refresh()
        run(todo, steps)


def _solve_kept(W: Tensor, Hd: Tensor, dead: Tensor, lam: float, g: Tensor, keep: Tensor, max_memory: int):
    """Closed-form kept weights v_S = H_SS^-1 g_S per row and its loss 1/2 dw^T H dw on the
    undamped H: dw^T H_damped dw = w^T g - g_S^T v_S at the optimum, less the damping's share."""
    out = torch.zeros_like(W, dtype=torch.float64)
    energy = torch.zeros(W.shape[0], dtype=torch.float64, device=W.device)

    def one(rr):
        pos, valid, v, _ = _subproblem(Hd, g[rr], keep[rr], W.dtype)
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
                     max_memory: int | None = None):
    """Prune round(sparsity * R * d) weights of W [R, d]: the exact greedy restricted to a
    candidate support ``widen`` times the kept one, found by forward selection (``candidates=
    "forward"``) or a SparseGPT sweep (``"sparsegpt"``); see the module docstring.

    ``H``: shared [d, d] or a list of (rows, H [d, d]) groups; ``row_scale`` [R]: per-row loss
    weights (e.g. BatchNorm gain^2) in the layer budget; ``nm=(n, m)`` (``sparsity=None``: the full
    pattern) and low sparsity (C over half the live inputs) run the exact greedy. Returns (W_new,
    keep_mask, row_losses = row_scale * 1/2 dw^T H dw per row, H symmetrised), as prune_exact."""
    layer_groups(W, H, "prune_restricted")
    max_memory = memory_budget(max_memory, W.device, "prune_restricted")
    if W.dtype not in (torch.float32, torch.float64):         # half, bfloat16: solved in float32
        W_new, keep, losses = prune_restricted(W.float(), H, sparsity, widen=widen, candidates=candidates, nm=nm,
                                               row_scale=row_scale, damp=damp, progress=progress, max_memory=max_memory)
        return W_new.to(W.dtype), keep, losses
    W = W.detach()
    R, d = W.shape
    if not widen >= 1:                  # NaN too
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
    parts = _groups(H, R, d)
    if any(bool(torch.isinf(Hg).any()) for _, Hg in parts):
        return _exact(W, H, sparsity, None, row_scale, damp, progress, max_memory)   # as exact treats it
    kept = R * d - k
    dens = widen * kept / (R * d)
    # rows of huge or tiny weights are solved at a power-of-two scale f, each group's H at 4^-e
    # (both exact); the budget compares the true losses: each row's times f^2 / c
    f = pow2_row_scale(W)
    Ws = W if f is None else (W.double() / f[:, None]).to(W.dtype)
    scale = None if row_scale is None else row_scale.to(device=W.device, dtype=torch.float64).reshape(-1)
    if f is not None:
        scale = (torch.ones(R, dtype=torch.float64, device=W.device) if scale is None else scale) * f.to(W.device) ** 2
    groups, live = [], 0
    for rows, Hg in parts:
        rows = rows.to(W.device)
        Hd, dead, lam, c = _damped(Hg, damp, W.device)
        n_live = int((~dead).sum())
        if dens * d >= _EXACT_SHARE * n_live or n_live == 0:
            return _exact(W, H, sparsity, None, row_scale, damp, progress, max_memory)
        if c != 1.0:
            scale = torch.ones(R, dtype=torch.float64, device=W.device) if scale is None else scale.clone()
            scale[rows] /= c
        live += len(rows) * n_live
        groups.append((rows, Hd, dead, lam, Ws[rows].to(torch.float64) @ Hd, Hg))
    if kept > live:                      # some dead inputs must be kept: only at low sparsity
        return _exact(W, H, sparsity, None, row_scale, damp, progress, max_memory)
    try:
        W_new, keep, losses = _restricted(Ws, groups, kept, widen, candidates, scale, damp, progress, max_memory)
    except _NotPositiveDefinite:
        return _exact(W, H, sparsity, None, row_scale, damp, progress, max_memory)
    if f is not None:
        W_new = (W_new.double() * f[:, None]).to(W.dtype)
    return W_new, keep, losses


def _restricted(W: Tensor, groups, kept: int, widen: float, candidates: str, row_scale, damp: float,
                progress: bool, max_memory: int):
    """``prune_restricted``'s steps 1-3 on prepared groups (rows, damped H, dead, lambda, g, H);
    ``row_scale``: each row's loss weight in the budget, in the scaled problem's units."""
    R, d = W.shape
    dens = widen * kept / (R * d)
    bars = []

    def new_bar(desc):
        if not progress:
            return None
        from tqdm.auto import tqdm
        bars.append(tqdm(total=R, desc=desc, unit="row", leave=False))
        return bars[-1]
    try:
        cand = torch.zeros(R, d, dtype=torch.bool, device=W.device)
        if candidates == "sparsegpt":
            for rows, _, dead, _, _, Hg in groups:
                cand[rows] = prune_sparsegpt(W[rows], Hg.to(W.device), max(0.0, 1.0 - dens), damp=damp)[1] & ~dead
        else:
            live = sum(len(rows) * int((~dead).sum()) for rows, _, dead, *_ in groups)
            n_cand = min(round(widen * kept), live)
            cdt = torch.float64 if W.dtype == torch.float64 else torch.float32
            cand = _select(groups, W, n_cand, row_scale, max_memory, cdt, new_bar("forward selection"))
        if kept > int(cand.sum()):
            raise RuntimeError(f"candidate set of {int(cand.sum())} inputs under the {kept} to keep")
        bar = new_bar("restricted OBS")
        rest = int(cand.sum()) - kept        # everything outside C goes; the rest comes off the paths
        size = cand.sum(1)
        order = torch.zeros(R, max(int(size.max()), 1) if rest else 1, dtype=torch.int64, device=W.device)
        loss = torch.full(order.shape, float("inf"), dtype=torch.float64, device=W.device)
        # each row's path only as far as the budget can reach: _PATH_REACH times the layer's average
        # share of C to start; a row that takes every computed step is computed again 2x longer
        need = (size * (_PATH_REACH * rest / max(int(size.sum()), 1))).ceil().long() + 8
        todo = torch.ones(R, dtype=torch.bool, device=W.device) if rest else torch.zeros(R, dtype=torch.bool)
        done = torch.zeros(R, dtype=torch.int64, device=W.device)
        while bool(todo.any()):
            for rows, Hd, _, _, g, _ in groups:
                sel = rows[todo[rows]]
                if len(sel):
                    o, lo, dn = _restricted_paths(W[sel], Hd, g[todo[rows]], cand[sel], need[sel], max_memory, bar)
                    order[sel, :o.shape[1]], loss[sel, :o.shape[1]], done[sel] = o, lo, dn
            counts = budget_counts(PrunePath(order, loss), rest, row_scale)
            todo = (counts >= done) & (done < size)
            need = torch.where(todo, 2 * need, need)
            if bar is not None:
                bar.total += int(todo.sum())
                bar.refresh()
        return _finish(W, groups, order, loss, cand, rest, row_scale, max_memory)
    finally:
        for b in bars:
            b.close()
