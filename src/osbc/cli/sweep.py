"""``osbc sweep``: a grid of methods x sparsities / bits over several calibration seeds, written as
a table, JSON and a plot. The grid helpers here are shared with ``osbc demo``."""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from ..errors import OsbcError
from . import common as C
from .options import DATA_OPTIONS, PRUNE_METHODS, QUANT_METHODS, add_builder_options, add_option, add_options, int_in
from .outputs import Writer, check_out_dir, json_text, text_writer, write_all

NAME = "sweep"
HELP = "a grid of methods x sparsities/bits over several calibration seeds: table, JSON, plot"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_option(p, "model", help="dense checkpoint")
    add_options(p, "methods", "sparsities", "bits_list")
    p.add_argument("--seeds", type=int_in(1, 1000), default=3,
                   help="calibration draws per point (seeds --seed, --seed+1, ...)")
    add_options(p, "solver", "auto_seconds", "allocation", "lamp_power", "calibration", "calib_from")
    add_option(p, "out_dir", default="osbc-sweep")
    add_option(p, "force", help="write into an existing non-empty --out")
    add_options(p, *DATA_OPTIONS, group="data and run options")
    add_builder_options(p)


# ---- the grid ---------------------------------------------------------------------------------

def grid(levels_prune: list[float] | None, levels_bits: list[int] | None,
         methods: list[str]) -> list[tuple[str, str, float]]:
    """(task, method, level) for every applicable method at every sparsity and bit width."""
    jobs = []
    for s in levels_prune or []:
        jobs += [("prune", m, s) for m in methods if m in PRUNE_METHODS]
    for b in levels_bits or []:
        jobs += [("quantize", m, b) for m in methods if m in QUANT_METHODS]
    return jobs


def run_job(model, calib, test, task: str, method: str, level: float, dev, seed: int, solver: str,
            allocation: str = "lamp", calibration: str = "dense", batch_size: int = 128,
            lamp_power: float = 2.0, auto_seconds: float = 60.0) -> dict:
    """Compress ``model`` once and evaluate it; the compressed model is under ``"_model"``."""
    from .. import compress
    from ..training import evaluate

    t0 = time.time()
    if task == "prune":
        res = compress.prune(model, calib, sparsity=level, method=method, solver=solver, auto_seconds=auto_seconds,
                             allocation=allocation,
                             lamp_power=lamp_power, calibration=calibration, device=dev, seed=seed, verbose=False)
    else:
        res = compress.quantize(model, calib, bits=int(level), method=method, solver=solver, auto_seconds=auto_seconds,
                                calibration=calibration, device=dev, seed=seed, verbose=False)
    secs = time.time() - t0
    ev = evaluate(res.model, test, batch_size=batch_size, device=dev)
    return {"task": task, "method": method, "level": level, "accuracy": ev.accuracy,
            "membrane_error": C.mean_err(res.report), "sparsity": ev.sparsity, "seconds": secs,
            "synops": ev.synops, "bytes_stored": ev.bytes_stored, "report": res.report.to_dict(),
            "_model": res.model}


def level_str(task: str, level: float) -> str:
    return f"{100 * level:g}%" if task == "prune" else f"{int(level)} bits"


def results_table(rows: list[dict], dense_acc: float, spread: bool = False) -> str:
    """Accuracy, drop, membrane error and time per grid point, under the dense model's accuracy."""
    headers = ["task", "method", "level", "accuracy", "drop", "mem.err", "seconds"]
    body = [["dense", "-", "-", f"{100 * dense_acc:.2f}%", "-", "-", "-"]]
    for r in rows:
        acc = f"{100 * r['accuracy']:.2f}%"
        if spread:
            acc += f" ± {100 * r['accuracy_std']:.2f}"
        body.append([r["task"], r["method"], level_str(r["task"], r["level"]), acc,
                     f"{100 * r.get('drop', dense_acc - r['accuracy']):+.2f}", C.fmt_err(r["membrane_error"]),
                     f"{r['seconds']:.2f}"])
    return C.table(headers, body, right={2, 3, 4, 5, 6})


def plot_output(outdir: Path, name: str, rows: list[dict], dense_acc: float, title: str,
                dense_std: float | None = None) -> list[tuple[Path, Writer]]:
    """The accuracy plot as an output for :func:`write_all`; none, with a warning, without matplotlib
    (an optional dependency)."""
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        print("osbc: warning: no plot (plotting needs matplotlib: pip install matplotlib)", file=sys.stderr)
        return []
    from ..plot import plot_results

    return [(outdir / name, lambda tmp: plot_results(rows, dense_acc, tmp, title=title, dense_std=dense_std))]


# ---- osbc sweep -------------------------------------------------------------------------------

def run(args: argparse.Namespace) -> int:
    if not args.sparsities and not args.bits:
        raise OsbcError("give --sparsities and/or --bits")
    if args.solver in ("blocked", "restricted") and args.bits:
        raise OsbcError(f"--solver {args.solver} applies to pruning only; use it without --bits")
    outdir = check_out_dir(args.out, args.force)
    jobs = grid(args.sparsities, args.bits, args.methods)
    if not jobs:
        raise OsbcError("no method in --methods applies to the requested sparsities/bits")
    if args.allocation == "global" and args.sparsities and "magnitude" in args.methods:
        raise OsbcError("--allocation global ranks OBS losses and cannot drive magnitude pruning; "
                        "use lamp or uniform, or leave magnitude out of --methods")
    dev = C.device(args)
    model = C.load_model(args.model, dev, args)
    spec = C.data_spec(args, model.osbc_config)
    sp = C.splits(args, spec)
    C.check_shape(model, sp.calibration_source, spec)
    from ..training import evaluate

    seeds = [args.seed + i for i in range(args.seeds)]
    C.say(args, f"{len(jobs)} points x {len(seeds)} seeds on {spec.name} (T={spec.frames}, "
                f"{args.calib_samples} calibration samples from the {args.calib_from} set)")
    runs: dict[tuple, list[dict]] = {}
    dense_acc: dict[int, float] = {}
    dense = None
    t_all = time.time()
    for seed in seeds:
        calib, test, shared = sp.draw(seed)
        if dense is None or not shared:
            dense = evaluate(model, test, batch_size=max(128, args.batch_size), device=dev)
            C.say(args, f"  seed {seed}  dense accuracy {100 * dense.accuracy:.2f}% on {dense.samples} samples")
        dense_acc[seed] = dense.accuracy
        for task, method, level in jobs:
            C.seed_all(seed)
            r = run_job(model, calib, test, task, method, level, dev, seed, args.solver, args.allocation,
                        args.calibration, max(128, args.batch_size), args.lamp_power, args.auto_seconds)
            r.pop("_model")
            r["seed"] = seed
            r["drop"] = dense_acc[seed] - r["accuracy"]
            runs.setdefault((task, method, level), []).append(r)
            C.say(args, f"  seed {seed}  {task:<8} {method:<9} {level_str(task, level):>8}  "
                        f"acc {100 * r['accuracy']:6.2f}%  {r['seconds']:.1f} s")
    dense_mean = statistics.fmean(dense_acc.values())
    dense_std = statistics.stdev(dense_acc.values()) if len(dense_acc) > 1 else 0.0
    agg = []
    for (task, method, level), rs in runs.items():
        accs = [r["accuracy"] for r in rs]
        errs = [r["membrane_error"] for r in rs if r["membrane_error"] is not None]
        agg.append({"task": task, "method": method, "level": level, "accuracy": statistics.fmean(accs),
                    "accuracy_std": statistics.stdev(accs) if len(accs) > 1 else 0.0, "accuracies": accs,
                    "drop": statistics.fmean(r["drop"] for r in rs),
                    "membrane_error": statistics.fmean(errs) if errs else None,
                    "seconds": statistics.fmean(r["seconds"] for r in rs), "runs": rs})
    table = results_table(agg, dense_mean, spread=True)
    print(table)
    result = {"model": str(args.model), "data": spec.name, "frames": spec.frames, "calib_samples": args.calib_samples,
              "calib_from": args.calib_from, "seeds": seeds, "solver": args.solver, "allocation": args.allocation,
              "lamp_power": args.lamp_power,
              "calibration": args.calibration, "dense": dict(dense.to_dict(), accuracy=dense_mean,
                                                             accuracy_std=dense_std, accuracies=list(dense_acc.values())),
              "results": agg, "seconds": time.time() - t_all}
    outputs = [(outdir / "sweep.json", text_writer(json_text(result))), (outdir / "sweep.txt", text_writer(table + "\n"))]
    outputs += plot_output(outdir, "sweep.png", agg, dense_mean, dense_std=dense_std,
                           title=f"{spec.name}, T={spec.frames}, {args.calib_samples} calibration samples, "
                                 f"{len(seeds)} seeds")
    write_all(outputs)
    C.say(args, f"wrote {', '.join(str(p) for p, _ in outputs)}")
    return 0
