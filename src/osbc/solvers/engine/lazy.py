"""Per-row H^-1 of the surviving weights, with lazy (batched) rank-1 downdates."""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ...device import pinned_threads

_FLOOR = 1e-12       # floor of diag(H^-1) (normalised; the true minimum is ~1/d)


class _Lazy:
    """Per-row H^-1 of a chunk's active inputs with lazy rank-k downdates: the current H^-1 is
    Hi - U[:j]^T U[:j], Hi being the leading n x n window of a fixed [c, n0, n0] buffer.

    With ``base`` ([n, n], the H^-1 every row starts from) the buffer starts uninitialised and the
    first flush writes base - U^T U into it: one pass over the big buffer instead of a copy and an
    update, and the first batch reads its rows from the one shared (cached) matrix.

    A flush updates the lower triangle panel by panel (half the flops of the full product) and
    mirrors each panel to the upper triangle while it is still in cache. After each flush the surviving positions are moved to the front of
    the window by swapping them with the removed ones there (O(B n) per row, not a full O(n^2) copy)
    and the window shrinks, so the products only ever touch surviving weights."""

    def __init__(self, buf: Tensor, lazy: int, base: Tensor | None = None, ucache: int | None = None,
                 panel: int = 128):
        c, n, _ = buf.shape
        self.buf, self.base, self.ucache = buf, base, ucache
        self.panel = panel
        self.flops = 0          # executed H^-1 update flops (flushes and pending-term reads)
        self.Ubuf = buf.new_empty(c, lazy, n)
        self.c, self.n, self.j, self.lazy = c, n, 0, lazy
        self.ar = torch.arange(c, device=buf.device)
        self.nthreads = torch.get_num_threads()     # for the products; steps may run on fewer
        self.resize()

    def resize(self):
        """Lazy batch B: as long as possible (fewer, more efficient products) while the pending
        term U [c, B, n], read at every step, stays about cache-sized; grows as the window shrinks."""
        if self.ucache is None:
            self.B = self.lazy
        else:
            fit = self.ucache / (self.buf.element_size() * self.c * max(self.n, 1))
            self.B = min(self.lazy, max(16, 2 ** int(math.log2(max(fit, 1)))))
        n0 = self.buf.shape[1]
        self.flat = self.buf.view(-1, n0)[:, :self.n]      # row r*n0 + i = row i of row r's H^-1
        self.ar_n0 = self.ar * n0

    @property
    def Hi(self) -> Tensor:
        return self.buf[:, :self.n, :self.n]

    def rows(self, q: Tensor) -> Tensor:
        """Current H^-1 rows q: [c] -> [c, n]; [c, k] -> [c, k, n]."""
        n, j = self.n, self.j
        self.flops += 2 * self.c * j * n * (1 if q.dim() == 1 else q.shape[1])
        if q.dim() == 1:   # row gather as index_select on the flat view: a memcpy per row
            r = self.base.index_select(0, q) if self.base is not None else \
                self.flat.index_select(0, self.ar_n0 + q)
            if j:
                uq = self.Ubuf[self.ar, :j, q]
                r = r[:, None].baddbmm_(uq[:, None], self.Ubuf[:, :j, :n], alpha=-1)[:, 0]
            return r
        r = self.base[q] if self.base is not None else self.buf[self.ar[:, None], q, :n]
        if j:
            U = self.Ubuf[:, :j, :n]
            r = torch.baddbmm(r, U.gather(2, q[:, None, :].expand(-1, j, -1)).mT, U, alpha=-1)
        return r

    def next_u(self) -> Tensor:
        """The next pending row [c, n] (the caller flushes when j reaches B)."""
        u = self.Ubuf[:, self.j, :self.n]
        self.j += 1
        return u

    def slot(self, k: int) -> Tensor:
        if self.j + k > self.B:
            self.flush()
        if self.B > self.Ubuf.shape[1]:
            self.Ubuf = self.Ubuf.new_empty(self.c, self.B, self.n)
        u = self.Ubuf[:, self.j:self.j + k, :self.n]
        self.j += k
        return u

    def flush(self, moves: tuple[Tensor, Tensor] | None = None):
        """Apply the pending downdates: Hi -= U^T U, lower triangle panel by panel, each panel then
        mirrored while in cache. ``moves`` = (a, b) [c, K] from compact: position b's column moves
        to a, done here panel by panel (in cache) rather than as a scattered pass over the matrix."""
        base = self.base
        if not self.j and base is None and moves is None:
            return
        n, j, P = self.n, self.j, self.panel
        U = self.Ubuf[:, :j, :n]
        Hi = self.Hi
        self.flops += self.c * n * (n + min(P, n)) * j
        if moves is not None:    # panel ends, to find each panel's moved columns
            ends = torch.arange(P, n + P, P, device=U.device).clamp_(max=n)
        with pinned_threads(self.nthreads, U.device):
            for r in range(self.c):
                Ur, Hr, full = U[r], Hi[r], self.buf[r]
                if moves is not None:
                    a_r, b_r = moves[0][r], moves[1][r]
                    # a panel needs only its moved columns left of its end (the rest is mirrored
                    # over): a prefix of the sorted destinations
                    kp = torch.searchsorted(a_r, ends).tolist()
                    if base is not None:     # the moved rows' sources, in the new order
                        perm = torch.arange(int(b_r.max()) + 1, device=U.device)
                        perm = perm.index_copy_(0, a_r, b_r)[:n]
                for i, p0 in enumerate(range(0, n, P)):
                    p1 = min(n, p0 + P)
                    out = Hr[p0:p1, :p1]
                    if base is None:
                        src = full[p0:p1]                          # updated in place
                    else:
                        src = base[p0:p1] if moves is None else base.index_select(0, perm[p0:p1])
                    if moves is not None and kp[i]:   # scatter/gather: faster than index_copy_
                        a, b = (m[:kp[i]].expand(p1 - p0, -1) for m in (a_r, b_r))
                        src.scatter_(1, a, src.gather(1, b))
                    if base is None:
                        if j:
                            out.addmm_(Ur[:, p0:p1].mT, Ur[:, :p1], alpha=-1)
                    elif j:
                        torch.addmm(src[:, :p1], Ur[:, p0:p1].mT, Ur[:, :p1], alpha=-1, out=out)
                    else:
                        out.copy_(src[:, :p1])
                    if p0:   # mirror while the panel is in cache (a later pass would re-read it)
                        Hr[:p0, p0:p1].copy_(Hr[p0:p1, :p0].T)
        self.base = None
        self.j = 0

    def diag(self) -> Tensor:
        if self.base is not None:
            return self.base.diagonal().clamp_min(_FLOOR).expand(self.c, -1).clone()
        return self.Hi.diagonal(dim1=1, dim2=2).clamp_min(_FLOOR)

    def compact(self, active: Tensor, *vecs: Tensor):
        """Move the active positions ([c, n] mask) into the first m = max count by swapping the
        late ones (>= m) into the holes, shrink the window to m, then flush: the pending terms move
        along, so the product skips the removed positions, and the flush moves the columns. The
        per-position vectors ``vecs`` get the same moves. Returns them."""
        n, j = self.n, self.j
        m = max(int(active.sum(1).max()), 1)
        lo = torch.arange(n, device=active.device) < m
        holes, late = ~active & lo, active & ~lo
        nlate = late.sum(1)
        K = int(nlate.max())
        moves = None
        if K:
            a = torch.sort((~holes).to(torch.int8), dim=1, stable=True).indices[:, :K]
            b = torch.sort((~late).to(torch.int8), dim=1, stable=True).indices[:, :K]
            ok = torch.arange(K, device=a.device)[None] < nlate[:, None]
            a = torch.where(ok, a, n - 1)            # padding: position n - 1 onto itself
            b = torch.where(ok, b, n - 1)
            if self.base is None:                    # rows now (whole rows), columns in the flush
                ia, ib = (self.ar_n0[:, None] + a).view(-1), (self.ar_n0[:, None] + b).view(-1)
                self.flat.index_copy_(0, ia, self.flat.index_select(0, ib))
            if j:
                U = self.Ubuf[:, :j, :n]
                U.scatter_(2, a[:, None].expand(-1, j, -1), U.gather(2, b[:, None].expand(-1, j, -1)))
            vecs = tuple(v.scatter(1, a, v.gather(1, b)) for v in vecs)
            moves = (a, b)
        self.n = m
        self.flush(moves)
        self.resize()
        return tuple(v[:, :m] for v in vecs)

