"""Benchmark of the layer solvers (osbc.solvers) on realistic SNN layer shapes.

Each case runs in its own subprocess so its peak memory (ru_maxrss) is its own. H is built from
random sparse spike trains (N samples x T steps, a share of inputs never fire), filtered by a LIF
membrane kernel (tau = 2), H = 2/N sum (KX)^T (KX).

Flop models (GFLOP column):
  exact / blocked / obq : the executed H^-1 update flops of the greedy, counted by the solver
                          (2 c n^2 j per lazy flush of j rank-1 terms on an n-wide active set, plus
                          the in-block corrections), + d^3/3 + 4/3 n^3 (damping, Cholesky, inverse)
                          + sum over rows of m^3/3 (closed-form solve on the kept support, m = the
                          smaller of kept / pruned). The idealised greedy is sum_s 2 (n - s)^2 per row.
  sparsegpt / gptq      : 2/3 d^3 (factor of H^-1) + R d^2 (the column sweep's error updates).
  rtn                   : 0.
Exact solvers on large layers are timed on a subset of rows (whole chunks) and extrapolated
linearly (rows are independent); such rows are marked "~".

  python bench/bench_solvers.py                         # default shapes and solvers
  python bench/bench_solvers.py --shapes 256x2312 --solvers exact,sparsegpt --json out.json
  python bench/bench_solvers.py --quick                 # bounded: subsets for the slow cases
  python bench/bench_solvers.py --ablate 256x2312       # exact path, one chunk, each optimisation off
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import subprocess
import sys
import time

SHAPES = ["256x2312", "128x1152", "500x2048", "512x8192"]
SOLVERS = ["exact", "blocked", "sparsegpt", "exact24", "sparsegpt24", "obq4", "gptq4", "rtn4"]
EXACT = {"exact", "blocked", "exact24", "obq4"}


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def spike_hessian(d: int, N: int = 256, T: int = 20, dead_frac: float = 0.2, tau: float = 2.0, seed: int = 0):
    """H = 2/N sum_n (K X_n)^T (K X_n) for random spike trains X_n [T, d] (log-normal rates, a
    ``dead_frac`` share of silent inputs), built in sample chunks to keep memory small."""
    import torch
    g = torch.Generator().manual_seed(seed)
    rate = (torch.exp(torch.randn(d, generator=g)) * 0.04).clamp(max=0.9)
    rate[torch.rand(d, generator=g) < dead_frac] = 0
    H = torch.zeros(d, d, dtype=torch.float64)
    a = 1 - 1 / tau
    for n0 in range(0, N, 32):
        nb = min(32, N - n0)
        X = (torch.rand(nb, T, d, generator=g) < rate).float()
        u = torch.zeros(nb, d)
        Y = torch.empty(nb, T, d)
        for t in range(T):
            u = a * u + X[:, t] / tau
            Y[:, t] = u
        Y = Y.reshape(nb * T, d).double()
        H.addmm_(Y.T, Y)
    return H.mul_(2.0 / N)


def matmul_peak() -> float:
    import torch
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(5))
    return 2 * 2048 ** 3 / best / 1e9


def _timed(f) -> float:
    t0 = time.perf_counter()
    f()
    return time.perf_counter() - t0


def run_case(shape: str, solver: str, args) -> dict:
    """One (shape, solver) case, in this process."""
    import torch
    from osbc import solvers as S
    from osbc.quant import fit_grid
    from osbc.solvers.engine.greedy import _lazy_batch
    from osbc.solvers.engine.workers import _rows_per_chunk
    R, d = map(int, shape.split("x"))
    H = spike_hessian(d, N=args.samples, T=args.steps, dead_frac=args.dead)
    n_live = int((H.diagonal() > 0).sum())
    W = torch.randn(R, d, generator=torch.Generator().manual_seed(1)) * 0.05
    # warm-up (first-call library initialisation), not timed
    S.prune_exact(torch.randn(8, 64), torch.eye(64), 0.5)
    S.quantize_gptq(torch.randn(8, 64), torch.eye(64), fit_grid(torch.randn(8, 64), 4))
    base_rss = _rss_mb()
    mem = args.max_memory or S.DEFAULT_MAX_MEMORY
    opts = S.EngineOptions()
    stats = S.EngineStats()
    rows = R
    note = ""
    if solver in EXACT and args.quick and R * (2 * n_live ** 3 / 3) / 1.5e11 > args.budget:
        # subset of rows: whole chunks of the solver's own chunking, at least two rows
        per_row = 4 * (n_live * n_live + _lazy_batch("cpu", 1, opts)[0] * n_live + 16 * d)
        c = _rows_per_chunk(per_row, R, mem)
        target = max(2, int(R * args.budget / (R * (2 * n_live ** 3 / 3) / 1.5e11)))
        rows = min(R, max(c, target // c * c))
        note = f"~ {rows}/{R} rows, extrapolated"
    Wr = W[:rows]
    grid = fit_grid(Wr, 4)
    sp = args.sparsity
    blk = max(1, d // 256)
    fns = {
        "exact": lambda: S.prune_exact(Wr, H, sp, max_memory=mem, options=opts, stats=stats),
        "blocked": lambda: S.prune_exact(Wr, H, sp, block=blk, max_memory=mem, options=opts, stats=stats),
        "sparsegpt": lambda: S.prune_sparsegpt(Wr, H, sp),
        "exact24": lambda: S.prune_exact(Wr, H, None, nm=(2, 4), max_memory=mem, options=opts, stats=stats),
        "sparsegpt24": lambda: S.prune_sparsegpt(Wr, H, None, nm=(2, 4)),
        "obq4": lambda: S.quantize_obq(Wr, H, grid, max_memory=mem, options=opts, stats=stats),
        "gptq4": lambda: S.quantize_gptq(Wr, H, grid),
        "rtn4": lambda: S.quantize_rtn(Wr, grid),
    }
    t = _timed(fns[solver])
    peak = _rss_mb()
    if solver in EXACT:
        m_sup = min(round((1 - (0.5 if solver == "exact24" else sp)) * d), d) if solver != "obq4" else 0
        flops = stats.flops + d ** 3 / 3 + 4 / 3 * n_live ** 3 + rows * m_sup ** 3 / 3
    elif solver in ("sparsegpt", "sparsegpt24", "gptq4"):
        flops = 2 / 3 * d ** 3 + rows * d * d
    else:
        flops = 0.0
    scale = R / rows
    # extrapolate the per-row part only
    fixed = d ** 3 / 3 + 4 / 3 * n_live ** 3 if solver in EXACT else 0.0
    return dict(shape=shape, solver=solver + (f" (k={blk})" if solver == "blocked" else ""), rows=R, inputs=d,
                live=n_live, seconds=t * scale, gflop=(fixed + (flops - fixed) * scale) / 1e9,
                gflops=(flops / t / 1e9) if flops else None, rss_mb=peak, rss_delta_mb=peak - base_rss,
                threads=torch.get_num_threads(), note=note)


ABLATIONS = [  # (name, EngineOptions changes, max_steps beyond the dead prefix or None)
    ("current", {}, None),
    ("torch steps instead of compiled ones", {"jit": False}, None),
    ("one chunk at a time, on all threads", {"workers": 1}, None),
    ("full-matrix flush (no symmetric panels)", {"panel": 1 << 30}, None),
    ("lazy batch B=128 instead of 256", {"lazy_jit": 128}, None),
    ("no window compaction", {"compact": False}, None),
    ("current, first 300 greedy steps", {}, 300),
    ("no lazy batch (B=1), 300 steps", {"lazy": 1, "lazy_jit": 1}, 300),
]


def ablate(shape: str, args):
    """The exact path on one chunk of rows per worker of ``shape``, each optimisation switched off."""
    import torch
    from osbc import solvers as S
    from osbc.solvers.engine.greedy import _lazy_batch
    from osbc.solvers.engine.workers import _rows_per_chunk, _workers
    R, d = map(int, shape.split("x"))
    H = spike_hessian(d, N=args.samples, T=args.steps, dead_frac=args.dead)
    n = int((H.diagonal() > 0).sum())
    mem = args.max_memory or S.DEFAULT_MAX_MEMORY
    opts = S.EngineOptions()
    workers = _workers("cpu", opts)
    c = _rows_per_chunk(4 * (n * n + _lazy_batch("cpu", workers, opts)[0] * n + 16 * d), R, mem // workers)
    rows = min(R, c * workers)
    W = torch.randn(R, d, generator=torch.Generator().manual_seed(1))[:rows] * 0.05
    S.obs_path(W[:2], H, max_steps=d - n + 50)
    print(f"{shape}: exact path of {rows} rows ({workers} workers x {c}, {n} live inputs); x{R / rows:.1f} "
          f"for the layer")
    for name, sets, steps in ABLATIONS:
        o = dataclasses.replace(opts, **sets)
        stats = S.EngineStats()
        ts = [_timed(lambda: S.obs_path(W, H, max_steps=None if steps is None else d - n + steps, max_memory=mem,
                                        options=o, stats=stats)) for _ in range(args.repeat)]
        print(f"  {name:38s} {min(ts):8.2f} s   executed {stats.flops / len(ts) / 1e9:7.1f} GFLOP", flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default=",".join(SHAPES), help="comma list of RxD")
    ap.add_argument("--solvers", default=",".join(SOLVERS), help="comma list from " + ",".join(SOLVERS))
    ap.add_argument("--sparsity", type=float, default=0.97)
    ap.add_argument("--samples", type=int, default=256, help="calibration samples N")
    ap.add_argument("--steps", type=int, default=20, help="time steps T")
    ap.add_argument("--dead", type=float, default=0.2, help="share of inputs that never fire")
    ap.add_argument("--max-memory", type=int, default=None, help="solver max_memory in bytes (default: the solver's)")
    ap.add_argument("--quick", action="store_true",
                    help="time exact solvers on a subset of rows when the full layer would exceed --budget")
    ap.add_argument("--budget", type=float, default=60.0, help="seconds per case with --quick (estimate)")
    ap.add_argument("--repeat", type=int, default=1, help="runs per case (the fastest is reported)")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--no-subprocess", action="store_true", help="run cases in this process (rss less meaningful)")
    ap.add_argument("--ablate", metavar="SHAPE", help="time the exact path's optimisations one by one")
    ap.add_argument("--case", nargs=2, metavar=("SHAPE", "SOLVER"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))
    if args.case:
        print("RESULT " + json.dumps(run_case(*args.case, args)))
        return
    import torch
    peak = matmul_peak()
    if args.ablate:
        print(f"float32 matmul 2048^3: {peak:.0f} GFLOP/s; load {os.getloadavg()[0]:.1f}")
        ablate(args.ablate, args)
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; float32 matmul 2048^3: {peak:.0f} GFLOP/s")
    results = []
    for shape in args.shapes.split(","):
        for solver in args.solvers.split(","):
            best = None
            for _ in range(args.repeat):
                if args.no_subprocess:
                    r = run_case(shape, solver, args)
                else:
                    cmd = [sys.executable, os.path.abspath(__file__), "--case", shape, solver] + \
                          [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--no-subprocess"]
                    cmd = _strip(cmd, ("--json", "--shapes", "--solvers", "--repeat"))
                    out = subprocess.run(cmd, capture_output=True, text=True)
                    line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
                    if out.returncode or not line:
                        print(f"{shape} {solver}: failed\n{out.stderr[-2000:]}")
                        break
                    r = json.loads(line[-1][7:])
                if best is None or r["seconds"] < best["seconds"]:
                    best = r
            if best is None:
                continue
            best["peak_gflops"] = peak
            results.append(best)
            g = f"{best['gflops']:7.1f}" if best["gflops"] else "      -"
            print(f"{best['shape']:>9} {best['solver']:<14} {best['seconds']:9.2f} s {best['gflop']:9.1f} GFLOP {g} GFLOP/s"
                  f"  rss {best['rss_mb']:6.0f} MB (+{best['rss_delta_mb']:5.0f})  {best['note']}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(matmul_gflops=peak, load=os.getloadavg(), results=results), f, indent=1)


def _strip(cmd, opts):
    out, skip = [], False
    for a in cmd:
        if skip:
            skip = False
            continue
        if a in opts:
            skip = True
            continue
        if any(a.startswith(o + "=") for o in opts):
            continue
        out.append(a)
    return out


if __name__ == "__main__":
    main()
