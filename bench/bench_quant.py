"""Accuracy-vs-time frontier of the quantization solvers: exact (OBQ greedy, each row the better of
OBQ and GPTQ), fast (GPTQ), refined (GPTQ, then exact coordinate descent on the grid),
exact-refined (OBQ's and GPTQ's results both refined, per row the best), and round-to-nearest
for reference.

Layer table, for bits 2, 3, 4 on per-channel grids (``fit_grid(W, bits)``, the default of
``osbc.quantize``): the relative membrane error sum_r dw_r^T H dw_r / sum_r w_r^T H w_r, its ratio
to exact's, seconds and peak memory above the start (bench_frontier.Peak). Layers: "digits", the
first layer (256x2312) of the nmnist_mlp trained on the offline digits data set with its real
Hessian (bench_frontier.digits_layer), and synthetic spike Hessians (bench_solvers.spike_hessian).
Exact and exact-refined on large layers (``--exact-rows``, default 16 rows when d > 2500) run on a
row subset: their error is the subset's, their seconds are extrapolated linearly (marked "~"), and
every ratio is taken on that subset.

Model table (on unless ``--no-accuracy``): held-out test accuracy of the whole trained digits MLP quantized with
``osbc.quantize(method="osbc")`` per solver at 2 and 3 bits, calibrated on 256 stratified training
samples, with each layer's relative membrane error on the calibration set (osbc's report); the
test split is only evaluated, never used to choose anything.

  python bench/bench_quant.py                                  # digits + 256x2312 + 512x4608, 2/3/4 bits
  python bench/bench_quant.py --shapes 256x2312 --bits 2 --no-real --no-accuracy
  python bench/bench_quant.py --passes 1,4,16                  # refined with other pass limits
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_frontier import digits_layer, membrane_error, save, timed  # noqa: E402

SHAPES = ["256x2312", "512x4608"]
CALIB = 256
ROW_COST = ("exact", "exact-refined")      # OBQ's greedy: cost per row, run on a subset of large layers


def solvers(passes):
    """exact, exact-refined, fast, rtn and refined per pass limit (``refined`` for the default,
    else ``refinedN``)."""
    from osbc import solvers as S
    from osbc.solvers.refine import DEFAULT_PASSES
    out = {"exact": lambda W, H, g: S.quantize_exact(W, H, g),
           "exact-refined": lambda W, H, g: S.quantize_refined(W, H, g, start="exact"),
           "fast": lambda W, H, g: S.quantize_gptq(W, H, g),
           "rtn": lambda W, H, g: S.quantize_rtn(W, g)}
    for p in passes:
        name = "refined" if p == DEFAULT_PASSES else f"refined{p}"
        out[name] = lambda W, H, g, p=p: S.quantize_refined(W, H, g, passes=p)
    return out


def run_layer(name: str, W, H, args, device) -> list[dict]:
    import torch
    from osbc.quant import fit_grid
    R, d = W.shape
    W, H = W.to(device), H.to(device)
    sub = args.exact_rows if args.exact_rows is not None else (16 if d > 2500 else 0)
    sub = sub if 0 < sub < R else 0
    sel = torch.randperm(R, generator=torch.Generator().manual_seed(0))[:sub].sort().values.to(device) if sub else None
    Ws = W[sel] if sub else W
    fns = solvers(args.passes)
    rows = []
    for bits in args.bits:
        grid = fit_grid(W, bits)
        gs = grid.select(sel)
        Qe, te, me = timed(lambda: fns["exact"](Ws, H, gs), device)
        e_exact = membrane_error(Ws, Qe, H)
        rows.append(dict(layer=name, rows=R, inputs=d, bits=bits, solver="exact", error=e_exact, ratio=1.0,
                         seconds=te * R / Ws.shape[0], peak_mb=me, note=f"~ {sub}/{R} rows" if sub else ""))
        for sv, fn in fns.items():
            if sv == "exact":
                continue
            if sv in ROW_COST and sub:
                Q, t, mb = timed(lambda: fn(Ws, H, gs), device)
                e = membrane_error(Ws, Q, H)
                rows.append(dict(layer=name, rows=R, inputs=d, bits=bits, solver=sv, error=e, ratio=e / e_exact,
                                 seconds=t * R / sub, peak_mb=mb, note=f"~ {sub}/{R} rows"))
                continue
            Q, t, mb = timed(lambda: fn(W, H, grid), device)
            e_sub = membrane_error(Ws, fn(Ws, H, gs), H) if sub else membrane_error(W, Q, H)
            rows.append(dict(layer=name, rows=R, inputs=d, bits=bits, solver=sv, error=membrane_error(W, Q, H),
                             ratio=e_sub / e_exact, seconds=t, peak_mb=mb, note=f"ratio on {sub} rows" if sub else ""))
        for r in rows[-len(fns):]:
            print(f"{r['layer']:>9} {r['bits']} bits {r['solver']:>13}  err {r['error']:.3e}  x{r['ratio']:.4f}  "
                  f"{r['seconds']:8.2f} s  {r['peak_mb']:7.0f} MB  {r['note']}", flush=True)
    return rows


def digits_model(cache: str, epochs: int, seed: int = 0):
    """(model, train set, test set): nmnist_mlp trained on the digits training split as
    bench_frontier.digits_layer trains it, kept in ``cache`` (osbc.save, safetensors)."""
    import torch
    import osbc
    import osbc.models
    from osbc.data import load_dataset
    from osbc.training import train
    tr = load_dataset("digits", train=True, frames=20)
    te = load_dataset("digits", train=False, frames=20)
    path = os.path.join(cache, f"digits_mlp_e{epochs}_s{seed}.safetensors")
    if os.path.exists(path):
        return osbc.load(path), tr, te
    torch.manual_seed(seed)
    model = osbc.models.build("nmnist_mlp")
    train(model, tr, epochs=epochs, seed=seed, progress=False, log=None)
    os.makedirs(cache, exist_ok=True)
    osbc.save(model, path, data="digits", frames=20)
    return model, tr, te


def run_accuracy(args, device) -> list[dict]:
    import osbc
    from osbc.data import calibration_inputs, materialize
    from osbc.training import evaluate
    model, tr, te = digits_model(args.cache, args.epochs)
    calib, _ = calibration_inputs(tr, CALIB, seed=0)
    test = materialize(te)
    dense = evaluate(model, test, device=device, stats=False).accuracy
    rows = [dict(bits=32, solver="dense", accuracy=dense, membrane_error=0.0, seconds=0.0)]
    print(f"digits MLP dense test accuracy {100 * dense:.2f}% ({len(te)} test samples)", flush=True)
    for bits in args.acc_bits:
        for sv in ("exact", "exact-refined", "fast", "refined", "rtn"):
            kw = dict(method="rtn") if sv == "rtn" else dict(method="osbc", solver=sv)
            res, t, _ = timed(lambda: osbc.quantize(model, calib, bits=bits, device=device, verbose=False, **kw),
                              device)
            acc = evaluate(res.model, test, device=device, stats=False).accuracy
            per_layer = {l.name: l.membrane_error for l in res.report}
            err = sum(per_layer.values()) / len(per_layer)
            rows.append(dict(bits=bits, solver=sv, accuracy=acc, membrane_error=err, layers=per_layer, seconds=t))
            print(f"  {bits} bits {sv:>13}  test acc {100 * acc:6.2f}%  mem.err {err:.3e} "
                  f"({', '.join(f'{n} {e:.3e}' for n, e in per_layer.items())})  {t:6.1f} s", flush=True)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default=",".join(SHAPES), help="RxD list of synthetic layers ('' for none)")
    ap.add_argument("--no-real", dest="real", action="store_false", help="leave out the trained digits layer")
    ap.add_argument("--no-accuracy", dest="accuracy", action="store_false",
                    help="leave out the test accuracy of the whole quantized digits MLP")
    ap.add_argument("--bits", default="2,3,4", help="bits of the layer table")
    ap.add_argument("--acc-bits", default="2,3", help="bits of the accuracy table")
    ap.add_argument("--passes", default="4", help="pass limits of the refined solver to compare")
    ap.add_argument("--exact-rows", type=int, default=None,
                    help="rows for the exact solver (default: 16 when d > 2500, else all)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--epochs", type=int, default=5, help="training epochs of the digits MLP")
    ap.add_argument("--cache", default=os.path.join(os.environ.get("OSBC_CACHE", os.path.expanduser("~/.cache/osbc")),
                                                    "bench"), help="where the trained digits MLP is kept")
    ap.add_argument("--json", default="bench_quant.json")
    args = ap.parse_args(argv)
    args.bits = [int(b) for b in args.bits.split(",") if b]
    args.acc_bits = [int(b) for b in args.acc_bits.split(",") if b]
    args.passes = [int(p) for p in args.passes.split(",") if p]
    import torch
    from osbc import solvers as S
    from osbc.device import resolve_device
    from osbc.quant import fit_grid
    from bench_solvers import spike_hessian
    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    w0 = torch.randn(8, 64, device=device)
    S.quantize_exact(w0, torch.eye(64, device=device), fit_grid(w0, 4))    # warm-up
    out = dict(layers=[], accuracy=[])       # saved (bench_frontier.save) as {"meta": ..., "rows": out}
    if args.real:
        W, H = digits_layer(args.cache, args.epochs)
        out["layers"] += run_layer("digits", W, H, args, device)
        save(out, args, device)
    for shape in [s for s in args.shapes.split(",") if s]:
        R, d = map(int, shape.split("x"))
        W = torch.randn(R, d, generator=torch.Generator().manual_seed(1)) * 0.05
        out["layers"] += run_layer(shape, W, spike_hessian(d).float(), args, device)
        save(out, args, device)
    if args.accuracy:
        out["accuracy"] = run_accuracy(args, device)
    save(out, args, device)
    load = os.getloadavg()
    print(f"wrote {args.json}; load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")


if __name__ == "__main__":
    main()
