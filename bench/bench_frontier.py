"""Accuracy-vs-time frontier of the pruning solvers: exact greedy, SparseGPT sweep ("fast"), restricted
greedy (osbc.solvers.prune_restricted with its defaults: "restricted"; variants: "forward1.5" =
forward-selection candidates, |C| = 1.5 x kept, "sparsegpt3" = a SparseGPT mask 3x as dense).

For each shape and sparsity: the relative membrane error sum_r dw_r^T H dw_r / sum_r w_r^T H w_r
of each solver, its ratio to the exact greedy's, seconds and peak memory above the start (CPU:
resident set sampled every 5 ms; CUDA: the allocator's peak). H is built from random spike trains
filtered by a LIF kernel (bench_solvers.spike_hessian); ``--real`` adds "digits" (256x2312), the
first layer of the nmnist_mlp trained on the offline digits data set, with its real Hessian.

The exact greedy on large layers (``--exact-rows``, default 16 rows when d > 2500) runs on a row
subset; every solver then also runs on that subset and the error ratio is taken there (the
budget is per layer, so a subset is its own small layer), while the seconds and memory are those
of the whole layer (exact: extrapolated linearly from the subset, marked "~").

  python bench/bench_frontier.py                               # all shapes, 90/95/97/99%
  python bench/bench_frontier.py --shapes 256x2312 --real --sparsities 0.97 --json f.json --png f.png
  python bench/bench_frontier.py --variants forward:1,forward:1.5 --threads 1
  python bench/bench_frontier.py --device cuda                 # time on a GPU
  python bench/bench_frontier.py --device cuda --skip-exact --max-memory 384    # the CPU's chunks on a GPU
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

SHAPES = ["256x2312", "128x1152", "500x2048", "512x4608", "512x8192"]


class Peak:
    """Peak memory above the start of the block: CUDA allocator peak, or sampled CPU RSS."""

    def __init__(self, device):
        self.device, self.mb = device, 0.0

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self):
        import torch
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return self
        self.base = self.top = self._rss()
        self.stop = threading.Event()

        def sample():
            while not self.stop.wait(0.005):
                self.top = max(self.top, self._rss())
        self.thread = threading.Thread(target=sample, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        import torch
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.mb = (torch.cuda.max_memory_allocated() - self.base) / 2 ** 20
        else:
            self.stop.set()
            self.thread.join()
            self.mb = (max(self.top, self._rss()) - self.base) / 2 ** 20


def digits_layer(cache: str, epochs: int, seed: int = 0):
    """(W [256, 2312], H) of the first layer of nmnist_mlp trained on the digits data set, H from
    osbc's Hessian pass (the LIF membrane kernel) over 256 training samples; cached in ``cache``."""
    import torch
    from safetensors.torch import load_file, save_file
    path = os.path.join(cache, f"digits_fc1_e{epochs}_s{seed}.safetensors")
    if os.path.exists(path):
        t = load_file(path)
        return t["W"], t["H"]
    import osbc.models
    from osbc.compress import inspect
    from osbc.data import load_dataset
    from osbc.trace import Recorder, batches
    from osbc.hessian import HessianAccumulator
    from osbc.training import train
    tr = load_dataset("digits", train=True, frames=20)
    torch.manual_seed(seed)
    model = osbc.models.build("nmnist_mlp")
    train(model, tr, epochs=epochs, seed=seed, progress=False, log=None)
    calib = torch.stack([tr[i][0] for i in range(256)]).float()
    t = inspect(model, calib)[0]
    acc = HessianAccumulator(t, t.kernel, "cpu")
    with Recorder([t], lambda t_, x: acc.add(x)) as rec:
        for x in batches(calib, 32):
            rec.run(model, x)
    W, H = t.weight2d().detach().float().clone(), acc.hessians()[0][1]
    os.makedirs(cache, exist_ok=True)
    save_file({"W": W.contiguous(), "H": H.contiguous()}, path)
    return W, H


def membrane_error(W, W1, H) -> float:
    import torch
    Hh = torch.nan_to_num(H.double())
    w, dw = W.double(), (W1 - W).double()
    return float(((dw @ Hh) * dw).sum() / ((w @ Hh) * w).sum())


def solvers(variants, max_memory=None):
    """exact, fast, restricted (its defaults), and prune_restricted per "candidates:widen" variant;
    ``max_memory`` (bytes, None: the solvers' default) goes to the solvers that take it."""
    from osbc import solvers as S
    from osbc.solvers import prune_restricted
    mm = {} if max_memory is None else {"max_memory": max_memory}
    out = {"exact": lambda W, H, s: S.prune_exact(W, H, s, **mm)[0],
           "fast": lambda W, H, s: S.prune_sparsegpt(W, H, s)[0],
           "restricted": lambda W, H, s: prune_restricted(W, H, s, **mm)[0]}
    for v in filter(None, variants):
        cands, wd = v.split(":")
        out[f"{cands}{float(wd):g}"] = lambda W, H, s, c=cands, wd=float(wd): \
            prune_restricted(W, H, s, widen=wd, candidates=c, **mm)[0]
    return out


def timed(fn, device, repeat: int = 1):
    """(fn(), the least seconds over ``repeat`` runs: on a shared machine the minimum is the least
    disturbed one, peak memory)."""
    import torch
    best = float("inf")
    for _ in range(max(1, repeat)):
        with Peak(device) as pk:
            t0 = time.perf_counter()
            out = fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t0)
    return out, best, pk.mb


def run_layer(name: str, W, H, args, device) -> list[dict]:
    import torch
    R, d = W.shape
    W, H = W.to(device), H.to(device)
    sub = args.exact_rows if args.exact_rows is not None else (16 if d > 2500 else 0)
    sub = sub if 0 < sub < R else 0
    Ws = W[torch.randperm(R, generator=torch.Generator().manual_seed(0))[:sub].sort().values.to(device)] if sub else W
    rows = []
    fns = solvers(args.variants, None if args.max_memory is None else int(args.max_memory * 2 ** 20))
    for sp in args.sparsities:
        e_exact = None
        if not args.skip_exact:
            We, te, me = timed(lambda: fns["exact"](Ws, H, sp), device)
            e_exact = membrane_error(Ws, We, H)
            rows.append(dict(layer=name, rows=R, inputs=d, sparsity=sp, solver="exact", error=e_exact, ratio=1.0,
                             seconds=te * R / Ws.shape[0], peak_mb=me, note=f"~ {sub}/{R} rows" if sub else ""))
        for sv, fn in fns.items():
            if sv == "exact":
                continue
            W1, t, mb = timed(lambda: fn(W, H, sp), device, args.repeat)
            k = round(sp * R * d)
            if int((W1 == 0).sum()) < k:
                raise AssertionError(f"{sv} at {sp}: {int((W1 == 0).sum())} zeros, expected {k}")
            ratio = None
            if e_exact is not None:
                e_sub = membrane_error(Ws, fn(Ws, H, sp), H) if sub else membrane_error(W, W1, H)
                ratio = e_sub / e_exact
            rows.append(dict(layer=name, rows=R, inputs=d, sparsity=sp, solver=sv, error=membrane_error(W, W1, H),
                             ratio=ratio, seconds=t, peak_mb=mb, note=f"ratio on {sub} rows" if sub and ratio else ""))
        for r in rows[-(len(fns) - bool(args.skip_exact)):]:
            rel = "" if r["ratio"] is None else f"x{r['ratio']:.4f}"
            print(f"{r['layer']:>9} {r['sparsity']:5.2f} {r['solver']:>13}  err {r['error']:.4f}  "
                  f"{rel:>7}  {r['seconds']:8.2f} s  {r['peak_mb']:7.0f} MB  {r['note']}", flush=True)
    return rows


def plot(rows, path: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    layers = list(dict.fromkeys(r["layer"] for r in rows))
    fig, axes = plt.subplots(1, len(layers), figsize=(4.2 * len(layers), 3.6), squeeze=False)
    for ax, lay in zip(axes[0], layers):
        for sv in dict.fromkeys(r["solver"] for r in rows):
            pts = [(r["seconds"], r["ratio"], r["sparsity"]) for r in rows if r["layer"] == lay and r["solver"] == sv]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=sv)
            for x, y, s in pts:
                ax.annotate(f"{s:g}", (x, y), fontsize=6)
        ax.set_xscale("log")
        ax.set_yscale("log")     # SparseGPT can be 20x off on real layers, the others within 10%
        ax.set_title(lay)
        ax.set_xlabel("seconds")
        ax.set_ylabel("membrane error / exact greedy's")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def save(rows, args, device):
    """The JSON so far (rewritten after each layer: a long run leaves its finished layers)."""
    import torch
    load = os.getloadavg()
    meta = dict(device=str(device), threads=torch.get_num_threads(), cpus=os.cpu_count(), loadavg=load,
                command=" ".join(sys.argv))
    with open(args.json, "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default=",".join(SHAPES), help="RxD list ('' for none)")
    ap.add_argument("--real", action="store_true", help="add the trained digits MLP's first layer (256x2312)")
    ap.add_argument("--sparsities", default="0.9,0.95,0.97,0.99")
    ap.add_argument("--variants", default="forward:1,forward:1.5,forward:2,sparsegpt:3",
                    help="restricted greedy variants besides its defaults, candidates:widen (widen = |C| / "
                         "kept); '' for none")
    ap.add_argument("--skip-exact", action="store_true",
                    help="time the other solvers only (no ratios to exact, no plot): a quick re-timing")
    ap.add_argument("--exact-rows", type=int, default=None,
                    help="rows for the exact greedy (default: 16 when d > 2500, else all)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeat", type=int, default=1,
                    help="time every solver but exact this many times, keep the least (a shared machine's noise)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--max-memory", type=float, default=None,
                    help="MiB per chunk of rows for exact and restricted (default: the solvers', 384 on CPU and "
                         "an eighth of the free memory on a GPU)")
    ap.add_argument("--epochs", type=int, default=5, help="training epochs of the digits MLP")
    ap.add_argument("--cache", default=os.path.join(os.environ.get("OSBC_CACHE", os.path.expanduser("~/.cache/osbc")),
                                                    "bench"), help="where the trained digits layer is kept")
    ap.add_argument("--json", default="bench_frontier.json")
    ap.add_argument("--png", default="bench_frontier.png")
    args = ap.parse_args(argv)
    args.sparsities = [float(s) for s in args.sparsities.split(",")]
    args.variants = [v for v in args.variants.split(",") if v]
    import torch
    from osbc import solvers as S
    from osbc.device import resolve_device
    from bench_solvers import spike_hessian
    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    # warm-up: the compiled kernels' first load is not the solvers' time
    S.prune_exact(torch.randn(8, 64, device=device), torch.eye(64, device=device), 0.5)
    S.prune_restricted(torch.randn(8, 200, device=device), torch.eye(200, device=device), 0.95)
    rows = []
    if args.real:
        W, H = digits_layer(args.cache, args.epochs)
        rows += run_layer("digits", W, H, args, device)
        save(rows, args, device)
    for shape in [s for s in args.shapes.split(",") if s]:
        R, d = map(int, shape.split("x"))
        W = torch.randn(R, d, generator=torch.Generator().manual_seed(1)) * 0.05
        rows += run_layer(shape, W, spike_hessian(d).float(), args, device)
        save(rows, args, device)
    save(rows, args, device)
    if not args.skip_exact:
        plot(rows, args.png)
    load = os.getloadavg()
    print(f"wrote {args.json}" + ("" if args.skip_exact else f", {args.png}") + f"; load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")


if __name__ == "__main__":
    main()
