"""Compiled CPU kernel of the exact greedy's steps (numba, a dependency of osbc; the torch steps run without it).

The greedy (``engine.greedy._greedy``) spends its time in two kinds of work: the batched downdate of
H^-1 every B steps (large matrix products: torch does these well) and, at every step, a few dozen
passes over [c, n] vectors. In torch each of those passes is one op with microseconds of dispatch,
so at n ~ 2000 the step costs more in dispatch than in arithmetic. Here the whole run of steps
between two flushes is one compiled loop over rows and steps: one call per lazy batch instead of
~20 ops per step. The math is the torch path's, step for step (see ``engine.greedy._torch_steps``);
only the summation order of the pending term differs, at rounding level.

Imported lazily by ``engine.greedy``; without numba the torch path runs instead.
"""
from __future__ import annotations

import numba
import numpy as np


@numba.njit(nogil=True, cache=True, boundscheck=False)
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
            # choose: the first minimum of pen + e^2 / diag; the min is a vectorised pass, its
            # position a short scan (a running argmin does not vectorise)
            best = inf
            if quant:
                for i in range(n):
                    e = wr[i] - min(max(np.rint(wr[i] / s_r), qmin), qmax) * s_r
                    score[i] = pen[i] + e * e / dg[i]
                    best = min(best, score[i])
            else:
                for i in range(n):
                    score[i] = pen[i] + wr[i] * wr[i] / dg[i]
                    best = min(best, score[i])
            q = 0
            for i in range(n):
                if score[i] == best:
                    q = i
                    break
            # row q of the current H^-1: the flushed row minus the pending terms, 4 at a time
            for i in range(n):
                col[i] = Ar[q, i]
            t = 0
            while t + 4 <= j:
                a0, a1, a2, a3 = Ur[t, q], Ur[t + 1, q], Ur[t + 2, q], Ur[t + 3, q]
                u0, u1, u2, u3 = Ur[t], Ur[t + 1], Ur[t + 2], Ur[t + 3]
                for i in range(n):
                    col[i] -= a0 * u0[i] + a1 * u1[i] + a2 * u2[i] + a3 * u3[i]
                t += 4
            while t < j:
                a0 = Ur[t, q]
                u0 = Ur[t]
                for i in range(n):
                    col[i] -= a0 * u0[i]
                t += 1
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
