"""The exact greedy's steps: one weight per row per step (OBS pruning or OBQ), or k per step.

A step needs only diag(H^-1) (to choose) and one row of it (to compensate); the downdates wait in
``_Lazy`` and are applied a batch at a time. On CPU the steps between two flushes run as one
compiled loop (``engine.jit``, numba) rather than ~20 torch ops per step.
"""
from __future__ import annotations

import warnings

import torch
from torch import Tensor

from ..options import EngineOptions
from .lazy import _FLOOR, _Lazy

_JIT_MOD = None      # engine.jit once imported, False when numba is missing (a cache, not a setting)
_NO_GROUPS = torch.zeros(1, 1, dtype=torch.int64)


_ARG_G = 64


class _Scores:
    """Score buffer [c, n0 rounded up to 64] padded with +inf, with a blocked first-occurrence
    argmin (per-block minima, then the first block holding the row minimum, then inside it):
    a plain row argmin is a scalar loop, the block minima are vectorised."""

    def __init__(self, c: int, n: int, like: Tensor):
        self.buf = torch.full((c, -(-n // _ARG_G) * _ARG_G), float("inf"), dtype=like.dtype, device=like.device)
        self.n = n
        self.ar = torch.arange(c, device=like.device)

    def view(self) -> Tensor:
        return self.buf[:, :self.n]

    def shrink(self, m: int):
        self.buf[:, m:self.n] = float("inf")
        self.n = m

    def argmin(self) -> Tensor:
        c = self.buf.shape[0]
        npad = -(-self.n // _ARG_G) * _ARG_G
        blocks = self.buf[:, :npad].view(c, -1, _ARG_G)
        b = blocks.amin(2).argmin(1)
        return b * _ARG_G + blocks[self.ar, b].argmin(1)


def _greedy(lz: _Lazy, w: Tensor, pen: Tensor, idx: Tensor, steps: int, opts: EngineOptions, *, quant=None,
            nm=None, bar=None):
    """One weight per step per row (OBS pruning if ``quant`` is None, else OBQ).

    pen [c, n]: 0 eligible, -inf forced first, +inf never, large finite = filler picked last.
    quant = (scale [c, 1], qmin, qmax); nm = (group id [c, n], removals per group [c, G], cap).
    Returns per step: original index, error e_q (w_q or w_q - quant(w_q)), [H^-1]_qq, target t_q.

    Runs lazy batch by batch: the steps up to the next flush (compiled on CPU when numba is
    installed, else torch ops), then the flush with compaction of the surviving positions."""
    c = w.shape[0]
    dev = w.device
    rq = torch.empty(c, steps, dtype=torch.int64, device=dev)
    re = torch.empty(c, steps, dtype=w.dtype, device=dev)
    rd = torch.empty_like(re)
    rt = torch.zeros_like(re) if quant is not None else None
    jit = _jit_module(w.device, opts)
    qbuf = torch.empty(c, steps, dtype=torch.int64) if jit is not None else None
    gid = nm[0] if nm is not None else None
    done = 0
    while done < steps:
        w = w.contiguous()
        pd = _pen_diag(lz, pen)
        if gid is not None:
            nm = (gid.contiguous(), nm[1], nm[2])
        k = min(lz.B - lz.j, steps - done)
        if jit is not None:
            q = _jit_steps(jit, lz, w, pd, k, quant, nm, (qbuf, re, rd, rt), done)
        else:
            q = _torch_steps(lz, w, pd, k, quant, nm, (re, rd, rt), done)
        rq[:, done:done + k] = idx.gather(1, q)
        done += k
        if bar is not None:
            bar.update(k * c)
        if done == steps:
            break
        pen = pd[0]
        if not opts.compact:
            lz.flush()
        elif gid is None:
            w, pen, idx = lz.compact(_live(pen), w, pen, idx)
        else:
            w, pen, idx, gid = lz.compact(_live(pen), w, pen, idx, gid)
    return rq, re, rd, rt


def _jit_module(device, opts: EngineOptions):
    """engine.jit when the compiled steps apply (CPU, numba installed, ``opts.jit``), else None."""
    global _JIT_MOD
    if not opts.jit or torch.device(device).type != "cpu":
        return None
    if _JIT_MOD is None:
        try:
            from . import jit as mod
        except ImportError:          # numba not installed (it is a dependency): torch steps
            mod = False
        except Exception as e:       # e.g. no writable cache directory for the compiled code
            warnings.warn(f"osbc: compiled greedy steps unavailable ({type(e).__name__}: {e}); using the "
                          "slower torch steps (set NUMBA_CACHE_DIR to a writable directory to fix a cache error)")
            mod = False
        _JIT_MOD = mod
    return _JIT_MOD or None


def _lazy_batch(device, workers: int, opts: EngineOptions, block: int = 1) -> tuple[int, int | None]:
    """(most steps per lazy batch, cache bound of the pending term) for ``_Lazy``: torch steps read
    the whole chunk's pending term at every step, so it stays cache-sized; compiled steps read one
    row's at a time and take longer batches (fewer flushes)."""
    if block == 1 and _jit_module(device, opts) is not None:
        return opts.lazy_jit, None
    return opts.lazy, opts.ucache // workers


def _pen_diag(lz: _Lazy, pen: Tensor) -> Tensor:
    """[2, c, n]: pen and diag(H^-1) in one tensor, so a removal marks both with one scatter; diag
    is 1 where removed, which keeps the scores free of 0/0."""
    pd = torch.stack([pen, lz.diag()])
    pd[1].masked_fill_(~_live(pen), 1.0)
    return pd


def _torch_steps(lz: _Lazy, w: Tensor, pd: Tensor, k: int, quant, nm, out: tuple, s0: int) -> Tensor:
    """k greedy steps of every row as torch ops (any device); step s's e_q, [H^-1]_qq and t_q go
    to out = (re, rd, rt)[:, s0 + s]. Returns the chosen positions [c, k].

    A step is a few dozen small ops on [c, n] vectors, so their count matters: results are
    collected in lists and written once per batch, and w_q is left as it is (never read again)."""
    c = w.shape[0]
    inf = float("inf")
    pen, diag = pd[0], pd[1]
    marks = torch.tensor([inf, 1.0], dtype=w.dtype, device=w.device).view(2, 1, 1).expand(2, c, 1)
    sb = _Scores(c, lz.n, w)
    qs, es, ds, ts = [], [], [], []
    for _ in range(k):
        if quant is not None:
            sc, qmin, qmax = quant
            t = torch.round(w / sc).clamp_(qmin, qmax).mul_(sc)
            e = w - t
        else:
            e = w
        torch.addcdiv(pen, e * e, diag, out=sb.view())
        q1 = sb.argmin()[:, None]
        col = lz.rows(q1[:, 0])
        dq = col.gather(1, q1).clamp_min_(_FLOOR)
        eq = e.gather(1, q1)
        r = dq.rsqrt()
        u = lz.next_u()
        torch.mul(col, r, out=u)
        w.addcmul_(u, eq * r, value=-1)           # w -= e_q / [H^-1]_qq * H^-1[:, q]
        diag.addcmul_(u, u, value=-1)
        pd.scatter_(2, q1.expand(2, c, 1), marks)
        qs.append(q1)
        es.append(eq)
        ds.append(dq)
        if quant is not None:
            ts.append(t.gather(1, q1))
        if nm is not None:                        # a full group's other members become ineligible
            gid, cnt, cap = nm
            g = gid.gather(1, q1)
            cnt.scatter_add_(1, g, torch.ones_like(g))
            full = cnt.gather(1, g) >= cap
            pen.masked_fill_((gid == g) & full, inf)
    for o, vals in zip(out, (es, ds, ts)):
        if o is not None:
            o[:, s0:s0 + k] = torch.cat(vals, 1)
    return torch.cat(qs, 1)


def _jit_steps(jit, lz: _Lazy, w: Tensor, pd: Tensor, k: int, quant, nm, out: tuple, s0: int) -> Tensor:
    """The same k steps as ``_torch_steps``, as one compiled call (engine.jit); out = (positions,
    re, rd, rt) [c, steps], written at s0.. . Returns the positions [c, k]."""
    c, n = w.shape
    qbuf, re, rd, rt = out
    j0 = lz.j
    lz.flops += c * n * k * (2 * j0 + k - 1)      # the pending-term reads, counted as lz.rows does
    one = w.numpy().dtype.type(1)
    sc, qmin, qmax = quant if quant is not None else (w.new_ones(c), 0, 0)
    gid, cnt, cap = nm if nm is not None else (_NO_GROUPS, _NO_GROUPS, 0)
    A = lz.base[None] if lz.base is not None else lz.buf
    jit.greedy_steps(A.numpy(), lz.base is not None, lz.Ubuf.numpy(), j0, k, n, w.numpy(), pd.numpy(),
                     quant is not None, sc.reshape(c).contiguous().numpy(), one * qmin, one * qmax,
                     nm is not None, gid.numpy(), cnt.numpy(), int(cap),
                     qbuf.numpy(), re.numpy(), rd.numpy(), (re if rt is None else rt).numpy(), s0,
                     one * _FLOOR, one * float("inf"), one)
    lz.j += k
    return qbuf[:, s0:s0 + k]


def _live(pen: Tensor) -> Tensor:
    """Positions still in play (pen +inf: removed, or frozen in a full N:M group)."""
    return ~(torch.isinf(pen) & (pen > 0))


def _nm_select(score: Tensor, k: int, gid: Tensor, room: Tensor) -> Tensor:
    """k smallest scores per row with at most room[g] picks from group g: [c, k] positions."""
    order = torch.sort(score, dim=1, stable=True).indices
    g = gid.gather(1, order)
    # rank of each candidate inside its group, in score order: stable-sort by group, count from the
    # group's first position
    by_g = torch.sort(g, dim=1, stable=True)
    n = score.shape[1]
    pos = torch.arange(n, device=score.device).expand_as(g)
    start = torch.where(torch.cat([torch.ones_like(g[:, :1], dtype=torch.bool),
                                   by_g.values[:, 1:] != by_g.values[:, :-1]], 1), pos, 0)
    rank_sorted = pos - start.cummax(1).values
    rank = torch.empty_like(rank_sorted).scatter_(1, by_g.indices, rank_sorted)
    ok = rank < room.gather(1, g)
    sc = torch.where(ok, score.gather(1, order), torch.full_like(score, float("inf")))
    pick = torch.sort(sc, dim=1, stable=True).indices[:, :k]
    return order.gather(1, pick)


def _greedy_block(lz: _Lazy, w: Tensor, pen: Tensor, idx: Tensor, steps: int, k: int, *, nm=None, bar=None):
    """k weights per step per row, group OBS update w -= H^-1[:, P] ([H^-1]_PP)^-1 w_P.
    Per removed index, records its own score (w_q^2 / [H^-1]_qq at selection), ascending."""
    c = w.shape[0]
    inf = float("inf")
    rq = torch.empty(c, steps, dtype=torch.int64, device=w.device)
    re = torch.empty(c, steps, dtype=w.dtype, device=w.device)
    rd = torch.empty_like(re)
    lz.lazy = max(lz.lazy, k)
    lz.resize()
    lz.B = max(lz.B, k)
    diag = lz.diag()
    diag.masked_fill_(~_live(pen), 1.0)
    done = 0
    while done < steps:
        kk = min(k, steps - done)
        if lz.j + kk > lz.B:
            if nm is None:
                w, pen, idx = lz.compact(_live(pen), w, pen, idx)
            else:
                w, pen, idx, gid = lz.compact(_live(pen), w, pen, idx, nm[0])
                nm = (gid, nm[1], nm[2])
            lz.B = max(lz.B, k)
            diag = lz.diag()
            diag.masked_fill_(~_live(pen), 1.0)
        score = torch.addcdiv(pen, w * w, diag)
        if nm is None:
            P = torch.sort(score, dim=1, stable=True).indices[:, :kk]
        else:
            gid, cnt, cap = nm
            room = (cap - cnt).clamp_min(0)
            P = _nm_select(score, kk, gid, room)
        rows = lz.rows(P)                                            # [c, kk, n]
        A = rows.gather(2, P[:, None, :].expand(-1, kk, -1))         # [H^-1]_PP
        A = 0.5 * (A + A.mT)
        Lc, info = torch.linalg.cholesky_ex(A)
        if bool((info != 0).any()):
            A = A + torch.diag_embed(A.diagonal(dim1=1, dim2=2).abs().clamp_min(_FLOOR) * 1e-6)
            Lc = torch.linalg.cholesky_ex(A)[0]
        Z = torch.linalg.solve_triangular(Lc, rows, upper=False)     # new low-rank rows: L^-1 H^-1[P, :]
        wP = w.gather(1, P)
        z = torch.linalg.solve_triangular(Lc, wP[:, :, None], upper=False)
        lz.slot(kk).copy_(Z)
        dP = diag.gather(1, P)
        sc_P = (wP * wP / dP)
        o = torch.sort(sc_P, dim=1, stable=True).indices
        rq[:, done:done + kk] = idx.gather(1, P).gather(1, o)
        re[:, done:done + kk] = wP.gather(1, o)
        rd[:, done:done + kk] = dP.gather(1, o)
        w.sub_(torch.bmm(z.mT, Z)[:, 0])
        diag.sub_((Z * Z).sum(1)).clamp_min_(_FLOOR)
        w.scatter_(1, P, 0.0)
        diag.scatter_(1, P, 1.0)
        pen.scatter_(1, P, inf)
        if nm is not None:
            gid, cnt, cap = nm
            g = gid.gather(1, P)
            cnt.scatter_add_(1, g, torch.ones_like(g))
            fullg = cnt >= cap                                       # [c, G]
            pen.masked_fill_(fullg.gather(1, gid), inf)
        done += kk
        if bar is not None:
            bar.update(kk * c)
    lz.flush()
    return rq, re, rd

