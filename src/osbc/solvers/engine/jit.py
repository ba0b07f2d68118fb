"""Compiled CPU kernels of the greedy's steps (numba, a dependency of osbc; the torch steps run without it).

The greedy (``engine.greedy._greedy``) spends its time in two kinds of work: the batched downdate of
H^-1 every B steps (large matrix products: torch does these well) and, at every step, a few dozen
passes over [c, n] vectors. In torch each of those passes is one op with microseconds of dispatch,
so at n ~ 2000 the step costs more in dispatch than in arithmetic. Here the whole run of steps
between two flushes is one compiled loop over rows and steps: one call per lazy batch instead of
~20 ops per step. The math is the torch path's, step for step (see ``engine.greedy._torch_steps``);
only the summation order of the pending term differs, at rounding level.

``forward_select`` does the same for the restricted solver's forward selection
(``restricted._forward``), whose steps are a matrix-vector product and a few passes over n each.

Every kernel compiles with numba's numpy error model (a division by zero gives inf, as in torch):
the default Python model checks each division and so keeps LLVM from vectorising the score
passes, which then took 8x longer. Each step's choice (the first maximum of a score) is a
vectorised pass, eight running maxima per block of 64 and one block scanned: a plain running
argmax is a serial chain of compares.

Imported lazily by ``engine.greedy``; without numba the torch path runs instead.
"""
from __future__ import annotations

import numba
import numpy as np

# error_model="numpy": a float division returns inf/nan instead of raising ZeroDivisionError; the
# check that raising needs keeps LLVM from vectorising the score passes (measured 8x slower)
_jit = dict(nogil=True, cache=True, boundscheck=False, error_model="numpy")
_BLOCK = 64      # the score passes' argmax: block maxima first, then one block scanned


@numba.njit(**_jit, inline="always")
def _block_max(x, lo, hi):   # pragma: no cover  (compiled; tested via solvers)
    """max(x[lo:hi]) with eight running maxima: a single chain is bound by the compare latency,
    and numba does not vectorise a max reduction."""
    m0 = m1 = m2 = m3 = m4 = m5 = m6 = m7 = x[lo]
    i = lo
    while i + 8 <= hi:
        a0, a1, a2, a3, a4, a5, a6, a7 = x[i], x[i + 1], x[i + 2], x[i + 3], x[i + 4], x[i + 5], x[i + 6], x[i + 7]
        m0 = a0 if a0 > m0 else m0
        m1 = a1 if a1 > m1 else m1
        m2 = a2 if a2 > m2 else m2
        m3 = a3 if a3 > m3 else m3
        m4 = a4 if a4 > m4 else m4
        m5 = a5 if a5 > m5 else m5
        m6 = a6 if a6 > m6 else m6
        m7 = a7 if a7 > m7 else m7
        i += 8
    while i < hi:
        m0 = x[i] if x[i] > m0 else m0
        i += 1
    m0 = m1 if m1 > m0 else m0
    m2 = m3 if m3 > m2 else m2
    m4 = m5 if m5 > m4 else m4
    m6 = m7 if m7 > m6 else m6
    m0 = m2 if m2 > m0 else m0
    m4 = m6 if m6 > m4 else m4
    return m4 if m4 > m0 else m0


@numba.njit(**_jit, inline="always")
def _block_maxima(x, bmax):   # pragma: no cover
    """bmax[b] = max of x's block b (``_BLOCK`` entries)."""
    n = x.shape[0]
    for b in range(bmax.shape[0]):
        bmax[b] = _block_max(x, b * _BLOCK, min(n, (b + 1) * _BLOCK))


@numba.njit(**_jit, inline="always")
def _first_max(x, bmax):   # pragma: no cover
    """(the first position of x's maximum, the maximum), from its block maxima."""
    jb = 0
    for b in range(1, bmax.shape[0]):
        if bmax[b] > bmax[jb]:
            jb = b
    best = bmax[jb]
    for i in range(jb * _BLOCK, min(x.shape[0], (jb + 1) * _BLOCK)):
        if x[i] == best:
            return i, best
    return jb * _BLOCK, best



@numba.njit(**_jit, inline="always")
def _minus_rank_terms(col, U, q, m, n):   # pragma: no cover  (compiled; tested via solvers)
    """col[:n] -= sum_{u < m} U[u, q] U[u, :n], four rows of U per pass over col (a low-rank
    correction read one row at a time: the pending H^-1 downdates, or a Cholesky factor's columns)."""
    u = 0
    while u + 4 <= m:
        a0, a1, a2, a3 = U[u, q], U[u + 1, q], U[u + 2, q], U[u + 3, q]
        u0, u1, u2, u3 = U[u], U[u + 1], U[u + 2], U[u + 3]
        for i in range(n):
            col[i] -= a0 * u0[i] + a1 * u1[i] + a2 * u2[i] + a3 * u3[i]
        u += 4
    while u < m:
        a0 = U[u, q]
        u0 = U[u]
        for i in range(n):
            col[i] -= a0 * u0[i]
        u += 1


@numba.njit(**_jit, inline="always")
def _minus_rank_terms2(col, col2, U, q, q2, m, n):   # pragma: no cover  (compiled; tested via solvers)
    """``_minus_rank_terms`` for two columns q and q2 in one pass over U: U is read once for
    both (the pass is bound by reading U, not by the multiply-adds)."""
    u = 0
    while u + 4 <= m:
        a0, a1, a2, a3 = U[u, q], U[u + 1, q], U[u + 2, q], U[u + 3, q]
        b0, b1, b2, b3 = U[u, q2], U[u + 1, q2], U[u + 2, q2], U[u + 3, q2]
        u0, u1, u2, u3 = U[u], U[u + 1], U[u + 2], U[u + 3]
        for i in range(n):
            x0, x1, x2, x3 = u0[i], u1[i], u2[i], u3[i]
            col[i] -= a0 * x0 + a1 * x1 + a2 * x2 + a3 * x3
            col2[i] -= b0 * x0 + b1 * x1 + b2 * x2 + b3 * x3
        u += 4
    while u < m:
        a0, b0 = U[u, q], U[u, q2]
        u0 = U[u]
        for i in range(n):
            col[i] -= a0 * u0[i]
            col2[i] -= b0 * u0[i]
        u += 1


@numba.njit(**_jit)
def greedy_steps(A, shared, U, j0, k, n, w, pd, quant, sc, qmin, qmax, nm, gid, cnt, cap,
                 rq, re, rd, rt, s0, floor, inf, one):   # pragma: no cover  (compiled; tested via solvers)
    """``k`` greedy steps for each of the c rows, from lazy position ``j0``.

    A [c or 1, >=n, >=n]: the flushed H^-1 of each row (``shared``: one for all rows); U [c, >=j0+k,
    >=n]: the pending rows (H^-1 = A - U^T U), rows j0.. are written here; w [c, n] weights;
    pd [2, c, n]: penalty (0 eligible, -inf forced, +inf removed) and diag(H^-1) (1 where removed).
    ``quant``: OBQ, the error is w - clamp(round(w / sc[r]), qmin, qmax) sc[r]. ``nm``: gid [c, n]
    group of each position, cnt [c, G] removals per group; a group at ``cap`` closes.
    Writes step s's position, error, [H^-1]_qq (and quantized value) to rq/re/rd/rt[:, s0 + s]."""
    c = w.shape[0]
    score = np.empty(n, w.dtype)
    bmax = np.empty(-(-n // _BLOCK), w.dtype)
    col = np.empty(n, w.dtype)
    for r in range(c):
        Ar = A[0] if shared else A[r]
        Ur = U[r]
        wr = w[r]
        pen = pd[0, r]
        dg = pd[1, r]
        s_r = sc[r] if quant else one
        for s in range(k):
            j = j0 + s
            # choose: the first minimum of pen + e^2 / diag, as the first maximum of its negation
            # (a vectorised pass, then block maxima)
            if quant:
                for i in range(n):
                    e = wr[i] - min(max(np.rint(wr[i] / s_r), qmin), qmax) * s_r
                    score[i] = -(pen[i] + e * e / dg[i])
            else:
                for i in range(n):
                    score[i] = -(pen[i] + wr[i] * wr[i] / dg[i])
            _block_maxima(score, bmax)
            q = _first_max(score, bmax)[0]
            # row q of the current H^-1: the flushed row minus the pending terms
            for i in range(n):
                col[i] = Ar[q, i]
            _minus_rank_terms(col, Ur, q, j, n)
            # remove q, compensate the others, downdate the diagonal; u joins the pending terms
            dq = max(col[q], floor)
            tq = wr[q]
            if quant:
                tq = min(max(np.rint(tq / s_r), qmin), qmax) * s_r
                eq = wr[q] - tq
            else:
                eq = tq
            rs = one / np.sqrt(dq)
            f = eq * rs
            uj = Ur[j]
            for i in range(n):
                u = col[i] * rs
                uj[i] = u
                wr[i] -= u * f
                dg[i] -= u * u
            pen[q] = inf
            dg[q] = one
            rq[r, s0 + s] = q
            re[r, s0 + s] = eq
            rd[r, s0 + s] = dq
            if quant:
                rt[r, s0 + s] = tq
            if nm:   # a full group's other members become ineligible
                g = gid[r, q]
                cnt[r, g] += 1
                if cnt[r, g] >= cap:
                    for i in range(n):
                        if gid[r, i] == g:
                            pen[i] = inf


@numba.njit(**_jit, inline="always")
def _minus_rank_terms4(c0, c1, c2, c3, U, q0, q1, q2, q3, m, n):   # pragma: no cover  (compiled; tested via solvers)
    """``_minus_rank_terms`` for four columns in one pass over U (for factors too large for the
    cache: the pass is bound by reading U from memory, and the extra multiply-adds are free)."""
    u = 0
    while u + 4 <= m:
        a0, a1, a2, a3 = U[u, q0], U[u + 1, q0], U[u + 2, q0], U[u + 3, q0]
        b0, b1, b2, b3 = U[u, q1], U[u + 1, q1], U[u + 2, q1], U[u + 3, q1]
        d0, d1, d2, d3 = U[u, q2], U[u + 1, q2], U[u + 2, q2], U[u + 3, q2]
        e0, e1, e2, e3 = U[u, q3], U[u + 1, q3], U[u + 2, q3], U[u + 3, q3]
        u0, u1, u2, u3 = U[u], U[u + 1], U[u + 2], U[u + 3]
        for i in range(n):
            x0, x1, x2, x3 = u0[i], u1[i], u2[i], u3[i]
            c0[i] -= a0 * x0 + a1 * x1 + a2 * x2 + a3 * x3
            c1[i] -= b0 * x0 + b1 * x1 + b2 * x2 + b3 * x3
            c2[i] -= d0 * x0 + d1 * x1 + d2 * x2 + d3 * x3
            c3[i] -= e0 * x0 + e1 * x1 + e2 * x2 + e3 * x3
        u += 4
    while u < m:
        a0, b0, d0, e0 = U[u, q0], U[u, q1], U[u, q2], U[u, q3]
        u0 = U[u]
        for i in range(n):
            c0[i] -= a0 * u0[i]
            c1[i] -= b0 * u0[i]
            c2[i] -= d0 * u0[i]
            c3[i] -= e0 * u0[i]
        u += 1


@numba.njit(**_jit)
def _select_steps(Ha, idx, C, n, r, s, free, floor, score, bmax, cols, qs, sidx, k, f, t0, t1, wide,
                  row, stop, order, gain, ran, low):   # pragma: no cover  (compiled; tested via solvers)
    """Steps t0..t1-1 of one row's forward selection over the n inputs idx[:n] (positions into Ha):
    C [>= t1, >= n] its factor (rows < t0 filled), r, s, free, floor over the same n. Writes order
    (as Ha positions), gain and ran; returns the least gain so far (the row stops once it falls
    under stop[row]: then ran[row] < t1) ."""
    tiny = k[0]
    whole = n == Ha.shape[0]         # idx is 0..n-1: rows of Ha copied, not gathered
    nb = -(-n // _BLOCK)
    sc_, bm_ = score[:n], bmax[:nb]
    for b in range(4):
        sidx[b] = -1
    spec_t = t0
    for t in range(t0, t1):
        # choose: the first maximum of r^2 / s over free inputs whose Schur complement is not
        # vanishing; nearly dependent ones score -1 (they come last, at zero gain)
        for i in range(n):
            q = r[i] * r[i] / max(s[i], tiny)
            q = q if s[i] > floor[i] else k[1]
            sc_[i] = q if free[i] else k[2]
        _block_maxima(sc_, bm_)
        j, best = _first_max(sc_, bm_)
        ok = best >= 0.0
        sj = np.sqrt(max(s[j], tiny)) if ok else 1.0
        # column t of the pivoted Cholesky factor: (H_:j - C^T C_:j) / sqrt(s_j)
        hit = -1
        for b in range(4):
            if sidx[b] == j:
                hit = b
        if hit >= 0:
            col = cols[hit, :n]
            _minus_rank_terms(col, C[spec_t:], j, t - spec_t, n)
            sidx[hit] = -1
        else:
            nspec = 3 if t * n * C.itemsize > wide else 1
            qs[0] = j
            nq = 1
            while nq <= nspec:       # the next best, one at a time (only one block changes)
                sc_[qs[nq - 1]] = k[3]
                jb = qs[nq - 1] // _BLOCK
                bm_[jb] = _block_max(sc_, jb * _BLOCK, min(n, (jb + 1) * _BLOCK))
                j2, sc2 = _first_max(sc_, bm_)
                if sc2 < 0.0:
                    break
                qs[nq] = j2
                nq += 1
            for b in range(nq):
                cb = cols[b]
                hq = Ha[idx[qs[b]]]
                if whole:
                    for i in range(n):
                        cb[i] = hq[i]
                else:
                    for i in range(n):
                        cb[i] = hq[idx[i]]
            if nq == 1:
                _minus_rank_terms(cols[0], C, qs[0], t, n)
            elif nq == 2:
                _minus_rank_terms2(cols[0], cols[1], C, qs[0], qs[1], t, n)
            else:
                for b in range(nq, 4):       # pad to four: the spare columns are scratch
                    qs[b] = qs[0]
                _minus_rank_terms4(cols[0], cols[1], cols[2], cols[3], C, qs[0], qs[1], qs[2], qs[3], t, n)
            sidx[0] = -1
            for b in range(1, 4):
                sidx[b] = qs[b] if b < nq else -1
            spec_t = t
            col = cols[0, :n]
        f[0] = 1.0 / sj if ok else 0.0
        f[1] = r[j] / sj if ok else 0.0
        scale, at = f[0], f[1]
        Ct = C[t]
        for i in range(n):
            v = col[i] * scale
            Ct[i] = v
            r[i] -= v * at
            s[i] -= v * v
        free[j] = False
        order[row, t] = idx[j]
        gain[row, t] = 0.5 * np.float64(at) ** 2
        low = min(low, gain[row, t])
        if low < stop[row]:
            ran[row] = t + 1
            return low
    return low


@numba.njit(**_jit)
def forward_select(Ha, G, t_max, stop, order, gain, ran, wide, splits, widths):   # pragma: no cover  (compiled; tested via solvers)
    """Forward selection (orthogonal least squares) of up to ``t_max`` inputs for each row of G
    [c, n], Gram matrix Ha [n, n]: the math of ``restricted._forward``'s torch loop, step for step
    (there the factor's column is a batched product; here a row's factor C [t, n] is read once
    per pass and the per-step passes over n are fused). Writes the chosen positions to
    order[:, :t], the loss decreases 1/2 r_j^2 / s_j to gain[:, :t] and t to ran; a row stops
    early once the least of its gains so far falls under stop[row].

    Pools: after splits[i] steps the row goes on among the widths[i] best-scoring free inputs of
    those it still scores (their scores then exact; a step then costs width / n of a full one),
    kept in position order and gathered in place (splits ascending, widths descending; a width not
    under the inputs left changes nothing). Empty splits: every step over all inputs.

    The pass over C that computes the chosen input's column also computes the columns of the
    next-best inputs as of this step (speculation): when one of them is a later pick, its column
    needs only the factor rows added since. One runner-up while C is smaller than ``wide`` bytes
    (the pass is bound by the cache's bandwidth, a second column is about free and a third is
    not), three once it is larger (the pass then streams C from memory and four columns cost
    what one does)."""
    c, n = G.shape
    dt = G.dtype
    C = np.empty((t_max, n), dt)
    r = np.empty(n, dt)
    s = np.empty(n, dt)
    cols = np.zeros((4, n), dt)      # the pass's columns: the pick's, then the speculated ones
    qs = np.empty(4, np.int64)
    sidx = np.empty(4, np.int64)     # the input whose column cols[b] holds (-1: none)
    free = np.empty(n, np.bool_)
    score = np.empty(n, dt)
    bmax = np.empty(-(-n // _BLOCK), dt)
    floor0 = np.empty(n, dt)         # below this Schur complement an input counts as dependent
    floor = np.empty(n, dt)
    idx = np.empty(n, np.int64)      # the Ha position of each input still scored
    for i in range(n):
        floor0[i] = 1e-6 * Ha[i, i]
    # the step's scalars and the constants in G's precision (keeps the fused passes in float32)
    f = np.empty(2, dt)
    k = np.empty(4, dt)
    k[0], k[1], k[2], k[3] = 1e-30, -1.0, -2.0, -3.0
    tiny = k[0]
    ns = len(splits)
    for row in range(c):
        for i in range(n):
            r[i] = G[row, i]
            s[i] = Ha[i, i]
            free[i] = True
            floor[i] = floor0[i]
            idx[i] = i
        ran[row] = t_max
        m = n
        t = 0
        low = np.inf
        for st in range(ns + 1):
            end = min(splits[st], t_max) if st < ns else t_max
            if end > t:
                low = _select_steps(Ha, idx, C, m, r, s, free, floor, score, bmax, cols, qs, sidx, k, f, t, end,
                                    wide, row, stop, order, gain, ran, low)
                t = end
            if st == ns or ran[row] < t_max or t >= t_max:
                break
            B = widths[st]
            if B >= m:
                continue
            # the pool: the B best-scoring free inputs now, in position order (ties then go to the
            # lower position, as over all inputs); P ascends, so P[b] >= b and the gather is in place
            for i in range(m):
                q = r[i] * r[i] / max(s[i], tiny)
                q = q if s[i] > floor[i] else k[1]
                score[i] = q if free[i] else k[2]
            P = np.sort(np.argsort(-score[:m], kind="mergesort")[:B])
            for b in range(B):
                pb = P[b]
                idx[b] = idx[pb]
                r[b] = r[pb]
                s[b] = s[pb]
                floor[b] = floor[pb]
                free[b] = free[pb]
            for u in range(t):
                Cu = C[u]
                for b in range(B):
                    Cu[b] = Cu[P[b]]
            m = B


@numba.njit(**_jit)
def principal_blocks(Hd, pos, cnt, out):   # pragma: no cover  (compiled; tested via solvers)
    """out[r] = Hd[pos[r]][:, pos[r]] on the first cnt[r] positions, identity on the rest: each
    row's principal submatrix of the symmetric Hd, its lower triangle read a row of Hd at a time
    and mirrored (the scattered reads miss the cache; torch's 2-D fancy index is ~5x slower)."""
    c, m = pos.shape
    for r in range(c):
        o = out[r]
        k = cnt[r]
        for i in range(m):
            oi = o[i]
            if i < k:
                hi = Hd[pos[r, i]]
                for j in range(i + 1):
                    x = hi[pos[r, j]]
                    oi[j] = x
                    o[j, i] = x
                for j in range(k, m):
                    oi[j] = 0.0
            else:
                for j in range(m):
                    oi[j] = 0.0
                    o[j, i] = 0.0
                oi[i] = 1.0
