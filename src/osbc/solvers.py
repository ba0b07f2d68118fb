"""Layer solvers: exact greedy OBS/OBQ (OBC), SparseGPT, GPTQ, magnitude and round-to-nearest.

Pure tensors, no nn.Module. ``W`` is [R, d] (R output rows, d inputs), ``H`` the Hessian of the
per-row loss, shared [d, d] or per row [R, d, d], with H = 2 E[(KX)^T (KX)] (its scale does not
matter). Losses are 1/2 dw^T H dw: removing w_q alone, optimally compensated, costs
w_q^2 / (2 [H^-1]_qq).

Work is vectorised over rows, chunked so the chunks' working sets stay under ``max_memory`` bytes,
and runs on W's device in float32 (float64 when W is float64). Inputs whose diagonal of H is zero
("dead": they never fired) carry no loss and are removed first.

The exact greedy (``obs_path``, ``quantize_obq``) keeps, per row, H^-1 of the surviving weights.
A step needs only diag(H^-1) (to choose) and one row of it (to compensate), so the rank-1
downdates of a batch of steps (``_LAZY``, ``_LAZY_JIT``) are kept as a low-rank term
(H^-1 = Hi - U^T U) and applied together (a flush): lower triangle only, panel by panel, each
panel mirrored while in cache. At
each flush the surviving positions are compacted to the front, so the matrices shrink as weights
go. On CPU the steps between two flushes run as one compiled loop (``osbc.jit``, numba) rather
than ~20 torch ops per step, and the row chunks run on one worker thread per core: the step work
does not speed up with threads, and the products are partly memory-bound. H^-1 is normalised to
mean(diag H) = 1, which keeps float32 well inside its range.
"""
from __future__ import annotations

import math
import queue
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
from torch import Tensor

from .quant import Grid

__all__ = ["damp_inverse", "PrunePath", "obs_path", "budget_counts", "solve_on_support", "prune_exact",
           "prune_sparsegpt", "prune_magnitude", "quantize_obq", "quantize_gptq", "quantize_rtn",
           "DEFAULT_MAX_MEMORY"]

DEFAULT_MAX_MEMORY = 384 * 2 ** 20
_LAZY = 128          # most steps between batched downdates (torch steps)
_LAZY_JIT = 256      # the same for compiled steps: they read one row's pending term at a time
_UCACHE = 32 * 2 ** 20   # torch steps re-read the whole chunk's pending term: keep it about cache-sized
_PANEL = 128         # row panel of the lower-triangle flush
_FLOOR = 1e-12       # floor of diag(H^-1) (normalised; the true minimum is ~1/d)
_RETRIES = 6
_STEP_THREADS = 1    # intra-op threads for the per-step vector work (None: leave as is)
_WORKERS = 4         # most row chunks solved concurrently on CPU (1: one at a time, on all threads)
_BLOCK_ARGMIN = True
_COMPACT = True      # shrink the active window after each flush (False only for benchmarks)
_JIT = True          # compiled CPU steps (osbc.jit) when numba is installed (False: torch steps)
_JIT_MOD = None      # osbc.jit once imported, False when numba is missing
_NO_GROUPS = torch.zeros(1, 1, dtype=torch.int64)
_FLOPS = [0]         # executed H^-1 update flops of the greedy engines (read by bench/bench_solvers.py)


def _cdtype(W: Tensor) -> torch.dtype:
    return torch.float64 if W.dtype == torch.float64 else torch.float32


def _progress(progress: bool, total: int, desc: str):
    if not progress:
        return None
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, unit="w", unit_scale=True, leave=False)


# ---- damping --------------------------------------------------------------------------------------

def _symmetrize_(H: Tensor, bs: int = 512) -> Tensor:
    """H := (H + H^T) / 2 in place, block by block (no d x d temporary)."""
    d = H.shape[0]
    for i in range(0, d, bs):
        D = H[i:i + bs, i:i + bs]
        D.copy_((D + D.mT) * 0.5)
        for j in range(i + bs, d, bs):
            A, Bt = H[i:i + bs, j:j + bs], H[j:j + bs, i:i + bs]
            avg = (A + Bt.mT) * 0.5
            A.copy_(avg)
            Bt.copy_(avg.mT)
    return H


def _damped(H: Tensor, damp: float, flip: bool = False):
    """Float64 (H_damped, Cholesky factor, dead) for [d, d] or [R, d, d].

    Dead inputs get a unit diagonal and no coupling, so removing them costs nothing and touches no
    other weight. lambda = damp * mean of the live diagonal (scale-free); Cholesky failures retry
    with 10x more damping, then fall back to an eigenvalue floor. ``flip=True`` works on the
    reversed matrix J H J (what the column sweeps factor; the returned H_damped is then reversed
    too, dead is not). In place where possible: a layer's H can be large."""
    batched = H.dim() == 3
    H = H.detach()
    H = H.flip(-2, -1).to(torch.float64) if flip else H.to(torch.float64, copy=True)
    if not batched:
        H = H[None]
    torch.nan_to_num_(H, nan=0.0, posinf=0.0, neginf=0.0)
    for Hr in H:
        _symmetrize_(Hr)
    diag = H.diagonal(dim1=1, dim2=2)
    dead = diag <= 0
    if bool(dead.any()):
        H.masked_fill_(dead[:, :, None], 0.0).masked_fill_(dead[:, None, :], 0.0)
        diag.masked_fill_(dead, 1.0)
    live = (~dead).to(H.dtype)
    mean = (diag * live).sum(1) / live.sum(1).clamp_min(1.0)
    mean = torch.where(mean > 0, mean, torch.ones_like(mean))
    lam = mean * damp if damp > 0 else torch.zeros_like(mean)
    diag.add_(lam[:, None])                                  # H is now the damped matrix

    chol = torch.linalg.cholesky_ex
    L, info = chol(H)
    for _ in range(_RETRIES):
        bad = info != 0
        if not bool(bad.any()):
            break
        new = torch.where(bad, torch.where(lam > 0, lam * 10, mean * 1e-6), lam)
        diag.add_((new - lam)[:, None])
        lam = new
        L[bad], info[bad] = chol(H[bad])
    bad = info != 0
    if bool(bad.any()):  # not even heavy damping helped (non-finite or wildly indefinite input)
        Hb = H[bad] - torch.diag_embed(lam[bad, None].expand(-1, H.shape[-1]))
        e, V = torch.linalg.eigh(Hb)
        e = e.clamp_min(mean[bad, None] * max(damp, 1e-6) + 1e-6 * e.abs().amax(1, keepdim=True))
        Hb = (V * e[:, None, :]) @ V.mT
        H[bad] = 0.5 * (Hb + Hb.mT)
        L[bad], info[bad] = chol(H[bad])
        bad = info != 0
        if bool(bad.any()):
            H[bad] = torch.diag_embed(H[bad].diagonal(dim1=1, dim2=2).abs() + mean[bad, None])
            L[bad] = chol(H[bad])[0]
    if flip:
        dead = dead.flip(-1)
    if not batched:
        return H[0], L[0], dead[0]
    return H, L, dead


def _chol_inverse(L: Tensor) -> Tensor:
    """(L L^T)^-1 from the lower factor: a triangular inverse and one product (LAPACK's potri is
    several times slower here)."""
    Li = torch.eye(L.shape[-1], dtype=L.dtype, device=L.device).expand_as(L).contiguous()
    Li = torch.linalg.solve_triangular(L, Li, upper=False, out=Li)    # in place: one d x d buffer
    return Li.mT @ Li


def _block(M: Tensor, idx: Tensor) -> Tensor:
    """Principal submatrix M[idx][:, idx] of a [d, d] matrix (no copy when idx is all of 0..d-1,
    the common case of no silent input: a gather of a big float64 matrix is not free)."""
    if idx.numel() == M.shape[-1]:
        return M
    return M.index_select(0, idx).index_select(1, idx)


def damp_inverse(H: Tensor, damp: float = 0.01):
    """(H + lambda I)^-1 in float64 and the dead-input mask, for [d, d] or [R, d, d]."""
    _, L, dead = _damped(H, damp)
    return _chol_inverse(L), dead


def _rows_per_chunk(bytes_per_row: float, R: int, max_memory: int) -> int:
    return int(max(1, min(R, max_memory // max(1.0, bytes_per_row))))


def _workers(device) -> int:
    """Row chunks solved at once: on CPU one per intra-op thread (at most ``_WORKERS``)."""
    if torch.device(device).type != "cpu":
        return 1
    return max(1, min(_WORKERS, torch.get_num_threads()))


def _step_threads(workers: int, device):
    """Threads for the greedy's per-step work: _STEP_THREADS when one chunk runs at a time; each
    worker already runs on its own share."""
    return _threads(_STEP_THREADS if workers == 1 else None, device)


def _pooled(pool: queue.SimpleQueue, make):
    """A buffer from ``pool`` (put it back when done), or a new one: one per worker, reused by its
    chunks, which saves re-faulting hundreds of MB per chunk."""
    try:
        return pool.get_nowait()
    except queue.Empty:
        return make()


def _chunks(R: int, c_max: int, workers: int) -> list[slice]:
    """Consecutive row chunks of at most c_max rows, as equal as possible, their count a multiple
    of ``workers`` (when there are enough rows) so the workers finish together."""
    k = -(-R // max(1, c_max))
    k = min(R, -(-k // workers) * workers)
    c = -(-R // k)
    return [slice(r, min(R, r + c)) for r in range(0, R, c)]


def _map(fn, items: list, workers: int):
    """fn(item) for every item; with several workers, in that many threads, each with its share of
    the intra-op threads. The greedy's per-step ops are small and barely speed up with threads, and
    its products are memory-bound, so independent chunks, one per core, beat one chunk on all cores
    (about 20% on 2 cores)."""
    workers = min(workers, len(items))
    if workers <= 1:
        for it in items:
            fn(it)
        return
    each = max(1, torch.get_num_threads() // workers)

    def run(it):
        if torch.get_num_threads() != each:    # per thread: the caller's setting is not touched
            torch.set_num_threads(each)
        fn(it)

    with ThreadPoolExecutor(workers, thread_name_prefix="osbc-solver") as ex:
        for _ in ex.map(run, items):
            pass


# ---- the greedy engine ----------------------------------------------------------------------------

class _threads:
    """Run a block with ``n`` intra-op threads (CPU only), restoring the caller's count after.
    The greedy's per-step ops are small (c x n vectors): one thread does them as fast as two on an
    idle machine and avoids barrier stalls on a busy one; the big products get all threads."""

    def __init__(self, n: int | None, device):
        self.n = n if (n is not None and torch.device(device).type == "cpu") else None

    def __enter__(self):
        if self.n is not None:
            self.prev = torch.get_num_threads()
            if self.prev != self.n:
                torch.set_num_threads(self.n)
        return self

    def __exit__(self, *exc):
        if self.n is not None and torch.get_num_threads() != self.prev:
            torch.set_num_threads(self.prev)


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

    def __init__(self, buf: Tensor, lazy: int, base: Tensor | None = None, ucache: int | None = _UCACHE):
        c, n, _ = buf.shape
        self.buf, self.base, self.ucache = buf, base, ucache
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
        _FLOPS[0] += 2 * self.c * j * n * (1 if q.dim() == 1 else q.shape[1])
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
        n, j, P = self.n, self.j, _PANEL
        U = self.Ubuf[:, :j, :n]
        Hi = self.Hi
        _FLOPS[0] += self.c * n * (n + min(P, n)) * j
        if moves is not None:    # panel ends, to find each panel's moved columns
            ends = torch.arange(P, n + P, P, device=U.device).clamp_(max=n)
        with _threads(self.nthreads, U.device):
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
        if not _BLOCK_ARGMIN:
            return self.view().argmin(1)
        c = self.buf.shape[0]
        npad = -(-self.n // _ARG_G) * _ARG_G
        blocks = self.buf[:, :npad].view(c, -1, _ARG_G)
        b = blocks.amin(2).argmin(1)
        return b * _ARG_G + blocks[self.ar, b].argmin(1)


def _greedy(lz: _Lazy, w: Tensor, pen: Tensor, idx: Tensor, steps: int, *, quant=None, nm=None, bar=None):
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
    jit = _jit_module(w.device)
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
        if not _COMPACT:
            lz.flush()
        elif gid is None:
            w, pen, idx = lz.compact(_live(pen), w, pen, idx)
        else:
            w, pen, idx, gid = lz.compact(_live(pen), w, pen, idx, gid)
    return rq, re, rd, rt


def _jit_module(device):
    """osbc.jit when the compiled steps apply (CPU, numba installed, ``_JIT`` on), else None."""
    global _JIT_MOD
    if not _JIT or torch.device(device).type != "cpu":
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


def _lazy_batch(device, workers: int, block: int = 1) -> tuple[int, int | None]:
    """(most steps per lazy batch, cache bound of the pending term) for ``_Lazy``: torch steps read
    the whole chunk's pending term at every step, so it stays cache-sized; compiled steps read one
    row's at a time and take longer batches (fewer flushes)."""
    if block == 1 and _jit_module(device) is not None:
        return _LAZY_JIT, None
    return _LAZY, _UCACHE // workers


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
    """The same k steps as ``_torch_steps``, as one compiled call (osbc.jit); out = (positions,
    re, rd, rt) [c, steps], written at s0.. . Returns the positions [c, k]."""
    c, n = w.shape
    qbuf, re, rd, rt = out
    j0 = lz.j
    _FLOPS[0] += c * n * k * (2 * j0 + k - 1)      # the pending-term reads, counted as lz.rows does
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


# ---- pruning paths ----------------------------------------------------------------------------------

@dataclass
class PrunePath:
    """Greedy removal path of each row.

    order [R, S] int64: input removed at step s; loss [R, S] float64: that step's loss increase
    (w_q^2 / (2 [H^-1]_qq), 0 for dead inputs), made non-decreasing along each row by a running
    max, so a layer's k smallest losses form a prefix of every row."""
    order: Tensor
    loss: Tensor


def _nm_groups(d: int, nm, device):
    n, m = nm
    if not (isinstance(n, int) and isinstance(m, int) and 0 <= n < m):
        raise ValueError(f"nm must be (n, m) with 0 <= n < m, got {nm!r}")
    gid = torch.arange(d, device=device) // m
    G = (d + m - 1) // m
    size = torch.bincount(gid, minlength=G)
    cap = m - n
    return gid, G, cap, int(size.clamp(max=cap).sum())


def obs_path(W: Tensor, H: Tensor, *, max_steps: int | None = None, block: int = 1, nm=None,
             damp: float = 0.01, progress: bool = False, max_memory: int = DEFAULT_MAX_MEMORY) -> PrunePath:
    """Greedy OBS (OBC) removal path of every row of W [R, d], up to ``max_steps`` steps.

    Step: q = argmin w_q^2 / [H^-1]_qq over the eligible weights; w -= w_q / [H^-1]_qq H^-1[:, q];
    H^-1 -= H^-1[:, q] H^-1[q, :] / [H^-1]_qq. ``block=k`` removes the k best per step with the
    group update. ``nm=(n, m)``: at most m - n removed per group of m consecutive inputs (the path
    ends when every group is full). Dead inputs come first, at loss 0."""
    W = W.detach()
    R, d = W.shape
    dev, cdt = W.device, _cdtype(W)
    shared = H.dim() == 2
    if H.shape[-2:] != (d, d) or (not shared and H.shape[0] != R):
        raise ValueError(f"H must be [{d}, {d}] or [{R}, {d}, {d}], got {tuple(H.shape)}")
    block = max(1, int(block))
    if nm is not None:
        gid_all, G, cap, total = _nm_groups(d, nm, dev)
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
        # dead inputs count against their group's allowance: the first `cap` of each group go
        rank = torch.cumsum(dead_common.to(torch.int64), 0) - 1
        first = torch.zeros(G, dtype=torch.int64, device=dev).scatter_reduce_(
            0, gid_all, torch.where(dead_common, rank, torch.full_like(rank, 1 << 40)), "amin", include_self=False)
        pre = dead_common & ((rank - first[gid_all]) < cap)
        cnt0 = torch.bincount(gid_all[pre], minlength=G)
        return pre, ~pre & (cnt0 < cap)[gid_all], cnt0

    es = torch.finfo(cdt).bits // 8
    workers = _workers(dev)
    lazy, ucache = _lazy_batch(dev, workers, block)
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
        order[rows, :plen] = pre_idx[:plen]
        steps = S - plen
        if steps > 0:
            n = int(a_idx.numel())
            if shared:
                buf = _pooled(bufs, lambda: Hi0.new_empty(chunks[0].stop, n, n))
                lz = _Lazy(buf[:c], lazy, base=Hi0, ucache=ucache)
            else:
                lz = _Lazy((Hinv_c[:, a_idx][:, :, a_idx] * sigma[:, None, None]).to(cdt), lazy, ucache=ucache)
            w = W[rows][:, a_idx].to(cdt).clone()
            forced = dead[:, a_idx]
            pen = torch.zeros(c, n, dtype=cdt, device=dev).masked_fill_(forced, -float("inf"))
            idx = a_idx[None].expand(c, n).contiguous()
            nm_state = None
            if nm is not None:
                nm_state = (gid_all[a_idx][None].expand(c, n).contiguous(), cnt0[None].repeat(c, 1), cap)
            with _step_threads(workers, dev):
                if block == 1:
                    q, e, dq, _ = _greedy(lz, w, pen, idx, steps, nm=nm_state, bar=bar)
                else:
                    q, e, dq = _greedy_block(lz, w, pen, idx, steps, block, nm=nm_state, bar=bar)
            del lz
            if shared:
                bufs.put(buf)
            lo = e.double() ** 2 / (2 * dq.double()) * sigma.to(dev)[:, None]
            lo = lo.masked_fill(dead[torch.arange(c, device=dev)[:, None], q], 0.0)
            order[rows, plen:] = q
            loss[rows, plen:] = lo
        if bar is not None:
            bar.update(c * plen)

    _map(solve, chunks, workers)
    if bar is not None:
        bar.close()
    loss = torch.nan_to_num(loss, nan=0.0, posinf=torch.finfo(torch.float64).max).cummax(1).values
    return PrunePath(order, loss)


def budget_counts(path: PrunePath, k: int, row_scale: Tensor | None = None) -> Tensor:
    """How many of its first path steps each row takes when the layer removes its k cheapest steps
    (each row's losses times row_scale[r], e.g. a BatchNorm gain^2). Ties: earlier rows first."""
    loss = path.loss.to(torch.float64)
    R, S = loss.shape
    k = int(k)
    if k < 0 or k > R * S:
        raise ValueError(f"budget k={k} outside [0, {R * S}] (R={R} rows x {S} computed steps)")
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


# ---- weights on a fixed support ---------------------------------------------------------------------

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


def solve_on_support(W: Tensor, H: Tensor, keep_mask: Tensor, damp: float = 0.01,
                     max_memory: int = DEFAULT_MAX_MEMORY) -> Tensor:
    """argmin (w - w0)^T H_damped (w - w0) subject to w = 0 off the kept support, per row.

    Kept support S, pruned P: w_S = w0_S + H_SS^-1 H_SP w0_P, or equivalently (cheaper when P is the
    smaller set) w = w0 - H^-1[:, P] ([H^-1]_PP)^-1 w0_P; each row uses the smaller system. Float64."""
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


def _row_losses(W0: Tensor, W1: Tensor, H: Tensor, row_scale=None) -> Tensor:
    dw = (W1.to(torch.float64) - W0.to(torch.float64))
    Hh = torch.nan_to_num(H.to(device=dw.device, dtype=torch.float64))
    Hdw = dw @ Hh if Hh.dim() == 2 else torch.bmm(Hh, dw[:, :, None])[:, :, 0]
    l = 0.5 * (dw * Hdw).sum(1)
    if row_scale is not None:
        l = l * row_scale.to(device=l.device, dtype=torch.float64).reshape(-1)
    return l


def _budget(sparsity, R: int, d: int, nm) -> int:
    if sparsity is None:
        if nm is None:
            raise ValueError("sparsity is required without nm")
        return R * _nm_groups(d, nm, "cpu")[3]
    if not 0 <= float(sparsity) <= 1:
        raise ValueError(f"sparsity must be in [0, 1], got {sparsity!r}")
    k = int(round(float(sparsity) * R * d))
    if nm is not None and k > R * _nm_groups(d, nm, "cpu")[3]:
        raise ValueError(f"sparsity {sparsity} exceeds what the {nm[0]}:{nm[1]} pattern allows")
    return k


def prune_exact(W: Tensor, H: Tensor, sparsity, *, block: int = 1, nm=None, row_scale: Tensor | None = None,
                damp: float = 0.01, progress: bool = False, max_memory: int = DEFAULT_MAX_MEMORY):
    """Prune the layer's round(sparsity * R * d) cheapest greedy steps (OBS path + layer budget),
    then the closed-form optimum on the kept support. ``sparsity=None`` with ``nm``: the full
    pattern. Returns (W_new, keep_mask, row_losses = row_scale * 1/2 dw^T H dw per row)."""
    R, d = W.shape
    k = _budget(sparsity, R, d, nm)
    total = d if nm is None else _nm_groups(d, nm, "cpu")[3]
    if k == 0:
        keep = torch.ones(R, d, dtype=torch.bool, device=W.device)
        return W.clone(), keep, torch.zeros(R, dtype=torch.float64, device=W.device)
    # the path only as far as the budget can reach; rows that use all their computed steps are
    # extended (their unseen losses might still be under the layer's threshold)
    S0 = total if k > 0.6 * R * total else min(total, math.ceil(1.5 * k / R) + 32)
    path = obs_path(W, H, max_steps=S0, block=block, nm=nm, damp=damp, progress=progress, max_memory=max_memory)
    counts = budget_counts(path, k, row_scale)
    need = (counts >= S0) & (S0 < total)
    if bool(need.any()):
        sel = torch.nonzero(need)[:, 0]
        ext = obs_path(W[sel], H if H.dim() == 2 else H[sel.to(H.device)], block=block, nm=nm, damp=damp,
                       progress=progress, max_memory=max_memory)
        order = torch.zeros(R, total, dtype=torch.int64, device=W.device)
        loss = torch.full((R, total), float("inf"), dtype=torch.float64, device=W.device)
        order[:, :S0], loss[:, :S0] = path.order, path.loss
        # filler for unextended rows (never selected: +inf loss); any valid index will do
        order[:, S0:] = path.order[:, :1]
        order[sel], loss[sel] = ext.order, ext.loss
        path = PrunePath(order, loss)
        counts = budget_counts(path, k, row_scale)
    keep = _keep_from_counts(path.order, counts, d)
    W_new = solve_on_support(W, H, keep, damp, max_memory=max_memory)
    return W_new, keep, _row_losses(W, W_new, H, row_scale)


# ---- fast column sweeps (SparseGPT, GPTQ) -----------------------------------------------------------

def _hinv_upper(Lf: Tensor) -> Tensor:
    """Upper Cholesky factor U of H^-1 (H^-1 = U^T U) from Lf = chol(J H J), J the order reversal:
    H^-1 = (J Lf^-1 J)^T (J Lf^-1 J) and J Lf^-1 J is upper triangular. Row i of U holds the
    error-spreading coefficients of column i once columns < i are fixed (GPTQ's form of the OBS
    downdates); one triangular inverse, no explicit H^-1."""
    Li = torch.eye(Lf.shape[-1], dtype=Lf.dtype, device=Lf.device)
    return torch.linalg.solve_triangular(Lf, Li, upper=False, out=Li).flip(0, 1)


def _sweep(w: Tensor, Uc: Tensor, blocksize: int, target):
    """In place: columns left to right, column i := target(i, W1, U1, il) (W1 the current block,
    il the column inside it), its error spread over the later columns; blocks of ``blocksize``
    columns, the rest of the matrix updated once per block (lazy batch)."""
    R, n = w.shape
    for i1 in range(0, n, blocksize):
        i2 = min(i1 + blocksize, n)
        W1 = w[:, i1:i2].clone()
        U1 = Uc[i1:i2, i1:i2]
        Err = torch.empty_like(W1)
        for il in range(i2 - i1):
            q = target(i1 + il, W1, U1, il)
            err = (W1[:, il] - q) / U1[il, il]
            W1[:, il:].addr_(err, U1[il, il:], alpha=-1)
            W1[:, il] = q
            Err[:, il] = err
        w[:, i1:i2] = W1
        if i2 < n:
            w[:, i2:].addmm_(Err, Uc[i1:i2, i2:], alpha=-1)


def _smallest_mask(score: Tensor, k: int) -> Tensor:
    """Bool mask of the k smallest entries of score (any shape; ties: first in memory order)."""
    flat = score.reshape(-1)
    mask = torch.zeros_like(flat, dtype=torch.bool)
    if k > 0:
        mask[torch.sort(flat, stable=True).indices[:k]] = True
    return mask.view_as(score)


def _quotas(k: int, weights: list[int]) -> list[int]:
    """Split k over parts by cumulative rounding of k * (cumulative weight share): sums to k,
    part i gets at most weights[i] when k <= sum(weights)."""
    tot = sum(weights)
    out, acc, prev = [], 0, 0
    for wgt in weights:
        acc += wgt
        cur = int(math.floor(k * acc / tot + 0.5)) if tot else 0
        out.append(cur - prev)
        prev = cur
    return out


def prune_sparsegpt(W: Tensor, H: Tensor, sparsity, *, nm=None, blocksize: int = 128, damp: float = 0.01):
    """SparseGPT: the column sweep with the mask chosen per block of ``blocksize`` columns by
    w^2 / [chol(H^-1)]_jj^2 (current, compensated weights), each block's share of the layer budget
    fixed up front so the layer hits round(sparsity * R * d) exactly. ``nm=(n, m)``: per group of m
    columns, each row's m - n lowest scores (the group's share of the budget; ``sparsity=None``:
    the full pattern). Dead inputs go first. Shared H [d, d] only. Returns (W_new, keep_mask)."""
    if H.dim() != 2:
        raise ValueError("prune_sparsegpt needs a shared H [d, d]; group rows that share a Hessian")
    R, d = W.shape
    dev, cdt = W.device, _cdtype(W)
    k = _budget(sparsity, R, d, nm)
    _, Lf, dead = _damped(H.to(dev), damp, flip=True)
    w = W.detach().to(cdt).clone()
    prune = torch.zeros(R, d, dtype=torch.bool, device=dev)
    if nm is None:
        dcols = torch.nonzero(dead)[:, 0]
        nd = R * int(dcols.numel())
        if k <= nd:   # only free weights go: any k of them, the smallest first
            prune[:, dcols] = _smallest_mask(w[:, dcols].abs(), k)
            return (w * ~prune).to(W.dtype), ~prune
        prune[:, dcols] = True
        a = torch.nonzero(~dead)[:, 0]
        # dead inputs are decoupled: the live block of the factor is the live block's factor
        fa = (d - 1 - a).flip(0)
        Lf = _block(Lf, fa)
        Uc = _hinv_upper(Lf).to(cdt)
        del Lf
        wa = w[:, a].contiguous()
        da = int(a.numel())
        bounds = list(range(0, da, blocksize))
        quota = _quotas(k - nd, [min(blocksize, da - b) for b in bounds])
        pa = torch.zeros(R, da, dtype=torch.bool, device=dev)
        dg = Uc.diagonal()

        def target(i, W1, U1, il):
            if il == 0:
                b = i // blocksize
                pa[:, i:i + W1.shape[1]] = _smallest_mask(W1 ** 2 / dg[i:i + W1.shape[1]] ** 2, quota[b])
            return W1[:, il] * ~pa[:, i]
        _sweep(wa, Uc, blocksize, target)
        w[:, a] = wa
        prune[:, a] = pa
    else:
        gid, G, cap, tot = _nm_groups(d, nm, dev)
        m = nm[1]
        bs = max(m, blocksize // m * m)
        sizes = [min(m, d - g * m) for g in range(G)]
        quota = _quotas(k, [R * min(cap, s_) for s_ in sizes])
        Uc = _hinv_upper(Lf).to(cdt)
        del Lf
        dg = Uc.diagonal()

        def target(i, W1, U1, il):
            if i % m == 0:
                g = i // m
                cols = slice(il, il + sizes[g])
                sc = W1[:, cols] ** 2 / dg[i:i + sizes[g]] ** 2
                sc = sc.masked_fill(dead[i:i + sizes[g]], -float("inf"))
                cand = torch.zeros_like(sc, dtype=torch.bool).scatter_(
                    1, torch.sort(sc, dim=1, stable=True).indices[:, :min(cap, sizes[g])], True)
                if quota[g] < R * min(cap, sizes[g]):   # a partial pattern: the cheapest candidates
                    cand = _smallest_mask(sc.masked_fill(~cand, float("inf")), quota[g])
                prune[:, i:i + sizes[g]] = cand
            return W1[:, il] * ~prune[:, i]
        _sweep(w, Uc, bs, target)
    w.masked_fill_(prune, 0.0)
    return w.to(W.dtype), ~prune


def prune_magnitude(W: Tensor, sparsity, *, nm=None):
    """The layer's round(sparsity * R * d) smallest |w|, no compensation. ``nm=(n, m)``: only each
    row's m - n smallest of every group of m are candidates (``sparsity=None``: all of them).
    Returns (W_new, keep_mask)."""
    R, d = W.shape
    k = _budget(sparsity, R, d, nm)
    score = W.detach().abs().to(torch.float64)
    if nm is not None:
        gid, G, cap, _ = _nm_groups(d, nm, W.device)
        m = nm[1]
        pad = torch.full((R, G * m), float("inf"), dtype=torch.float64, device=W.device)
        pad[:, :d] = score
        rank = torch.sort(torch.sort(pad.view(R, G, m), dim=2, stable=True).indices, dim=2).indices
        cand = (rank < cap).view(R, G * m)[:, :d]
        score = score.masked_fill(~cand, float("inf"))
    prune = _smallest_mask(score, k)
    return W * ~prune, ~prune


# ---- quantization ---------------------------------------------------------------------------------

def quantize_rtn(W: Tensor, grid: Grid, *, keep_mask: Tensor | None = None) -> Tensor:
    """Round to nearest; pruned weights (keep_mask False) stay 0."""
    q = grid.quantize(W.detach())
    return q if keep_mask is None else q * keep_mask.to(q.device)


def _finish_q(out: Tensor, grid: Grid, keep: Tensor | None, dtype) -> Tensor:
    out = grid.quantize(out.to(dtype))        # on the grid bit for bit (idempotent on grid values)
    return out if keep is None else out * keep


def quantize_gptq(W: Tensor, H: Tensor, grid: Grid, *, keep_mask: Tensor | None = None, blocksize: int = 128,
                  act_order: bool = False, damp: float = 0.01) -> Tensor:
    """GPTQ: one column order for all rows (natural, or decreasing diag(H) with ``act_order``),
    each column rounded and its error spread with the Cholesky factor of H^-1, lazy block updates.
    Pruned weights (keep_mask False) are held at 0 and their error compensated. Shared H only."""
    if H.dim() != 2:
        raise ValueError("quantize_gptq needs a shared H [d, d]; group rows that share a Hessian")
    R, d = W.shape
    dev, cdt = W.device, _cdtype(W)
    keep = None if keep_mask is None else keep_mask.to(device=dev, dtype=torch.bool)
    if act_order:
        perm = torch.sort(-torch.nan_to_num(H.diagonal().to(device=dev, dtype=torch.float64)), stable=True).indices
        Hp = H.to(dev)[perm][:, perm]
    else:
        perm, Hp = torch.arange(d, device=dev), H.to(dev)
    _, Lf, _ = _damped(Hp, damp, flip=True)
    del Hp
    Uc = _hinv_upper(Lf).to(cdt)
    del Lf
    w = W.detach().to(cdt)[:, perm].contiguous()
    kp = None if keep is None else keep[:, perm]
    s = grid.scale.to(device=dev, dtype=cdt)
    qmin, qmax = grid.qmin, grid.qmax

    def target(i, W1, U1, il):
        q = torch.round(W1[:, il] / s).clamp_(qmin, qmax).mul_(s)
        return q if kp is None else q * kp[:, i]
    _sweep(w, Uc, blocksize, target)
    out = torch.empty_like(w)
    out[:, perm] = w
    return _finish_q(out, grid, keep, W.dtype)


def quantize_obq(W: Tensor, H: Tensor, grid: Grid, *, keep_mask: Tensor | None = None, damp: float = 0.01,
                 progress: bool = False, max_memory: int = DEFAULT_MAX_MEMORY) -> Tensor:
    """OBQ greedy per row: quantize first the weight with the smallest (w_q - quant(w_q))^2 / [H^-1]_qq,
    compensate the others, downdate H^-1, repeat. Pruned weights (keep_mask False) stay exactly 0:
    the greedy runs on each row's kept support with H^-1 of that support. Dead inputs: rounded."""
    R, d = W.shape
    dev, cdt = W.device, _cdtype(W)
    keep = None if keep_mask is None else keep_mask.to(device=dev, dtype=torch.bool)
    shared = H.dim() == 2
    w0 = W.detach().to(cdt)
    out = grid.quantize(w0)                     # dead inputs (and the fallback) : round to nearest
    sc_all = grid.scale.to(device=dev, dtype=cdt)
    qmin, qmax = grid.qmin, grid.qmax
    es = torch.finfo(cdt).bits // 8
    if shared:
        Hd, L, dead_s = _damped(H.to(dev), damp)
    workers = _workers(dev)
    lazy, ucache = _lazy_batch(dev, workers)
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
                lz = _Lazy(buf[:c], lazy, base=Hinv, ucache=ucache)
                w = w0[rows][:, a].clone()
                pen = torch.zeros_like(w)
                idx = a[None].expand(c, n).contiguous()
                with _step_threads(workers, dev):
                    q, _, _, t = _greedy(lz, w, pen, idx, n, quant=(sc_all[rows, None], qmin, qmax), bar=bar)
                del lz
                bufs.put(buf)
                out[rows] = out[rows].scatter_(1, q, t)

            _map(solve, chunks, workers)
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
            return
        M = Hd if shared else _damped(H[rr.to(H.device)].to(dev), damp)[0]
        A = _sym_gather(M, pos, valid)
        del M
        Lc, info = torch.linalg.cholesky_ex(A)
        if bool((info != 0).any()):
            A = A + torch.diag_embed(A.diagonal(dim1=1, dim2=2) * 1e-8)
            Lc = torch.linalg.cholesky_ex(A)[0]
        sig = (A.diagonal(dim1=1, dim2=2) * valid).sum(1) / valid.sum(1).clamp_min(1)
        lz = _Lazy((_chol_inverse(Lc) * sig[:, None, None]).to(cdt), lazy, ucache=ucache)
        del A, Lc
        w = w0[rr].gather(1, pos) * valid
        pen = torch.zeros_like(w).masked_fill_(~valid, 1e30)     # padding: picked last, a no-op
        idx = torch.where(valid, pos, torch.full_like(pos, d))
        with _step_threads(workers, dev):
            q, _, _, t = _greedy(lz, w, pen, idx, m, quant=(sc_all[rr, None], qmin, qmax), bar=bar)
        del lz
        o = torch.cat([out[rr], out.new_zeros(len(rr), 1)], 1)
        o.scatter_(1, q, t)
        out[rr] = o[:, :d]

    _map(solve, chunks, workers)
    if bar is not None:
        bar.close()
    return _finish_q(out, grid, keep, W.dtype)
