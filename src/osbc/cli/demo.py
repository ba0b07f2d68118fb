"""``osbc demo``: the whole job offline: digits events, train the MLP, prune and quantize it with
every method, then a table, JSON, plot and checkpoints."""

from __future__ import annotations

import argparse
import tempfile
import time

from ..config import QUANT_SOLVERS, SOLVERS
from ..errors import OsbcError
from . import common as C
from .options import DATA_OPTIONS, METHODS, add_option, add_options, pos_float, pos_int
from .outputs import check_out_dir, json_text, text_writer, write_all
from .sweep import grid, level_str, plot_output, results_table, run_job
from .train import train_model

NAME = "demo"
HELP = "the whole job offline: digits events, train the MLP, prune and quantize, table + JSON + plot"

DEMO = dict(frames=10, epochs=8, lr=5e-3, sparsities=[0.5, 0.9, 0.97], bits=[8, 4, 3, 2],
            methods=list(METHODS), hidden=256, solver="auto", quant_solver="fast",
            auto_seconds=10.0)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_option(p, "out_dir", default="osbc-demo")
    add_option(p, "force", help="write into an existing non-empty --out")
    p.add_argument("--epochs", type=pos_int, default=DEMO["epochs"], help="training epochs")
    p.add_argument("--lr", type=pos_float, default=DEMO["lr"], help="Adam learning rate")
    p.add_argument("--hidden", type=pos_int, default=DEMO["hidden"], help="hidden LIF neurons of the MLP")
    add_option(p, "sparsities", default=DEMO["sparsities"])
    add_option(p, "bits_list", default=DEMO["bits"])
    add_option(p, "methods", default=DEMO["methods"])
    add_option(p, "solver", choices=SOLVERS, default=DEMO["solver"],
               help="pruning solver: auto runs restricted (exact-greedy quality in seconds) at 80%% and above "
                    "and the exact greedy or the sweep below, whichever fits --auto-seconds; exact is the greedy everywhere (about 30-80 s per 97%% prune "
                    "of the MLP on one CPU thread); fast is the SparseGPT column sweep")
    add_option(p, "auto_seconds", default=DEMO["auto_seconds"])
    p.add_argument("--quant-solver", choices=QUANT_SOLVERS, default=DEMO["quant_solver"],
                   help="quantization solver: fast (GPTQ) fits the demo's budget; exact / auto run OBQ "
                        "(about 20 s or more per compression of the MLP)")
    add_options(p, *DATA_OPTIONS, group="data and run options")


def run(args: argparse.Namespace) -> int:
    from ..training import pinned_threads

    # one intra-op thread on any machine: torch's CPU sums round differently per thread count
    with pinned_threads(1):
        return _demo(args)


def _demo(args: argparse.Namespace) -> int:
    t_start = time.time()
    outdir = check_out_dir(args.out, args.force)
    if args.data not in (None, "digits"):
        raise OsbcError("the demo runs on the offline digits; use osbc train / sweep for other data sets")
    args.data = "digits"
    if args.frames is None:
        args.frames = DEMO["frames"]
    spec = C.data_spec(args)
    dev = C.device(args)
    C.seed_all(args.seed)
    t0 = time.time()
    from .. import data as D

    # from scratch: the events are written to a temporary folder (or --root), integrated into
    # frames once and kept in memory
    with tempfile.TemporaryDirectory(prefix="osbc-digits-") as tmp:
        root = args.root or tmp
        kw = {"downsample": spec.downsample} if spec.downsample else {}
        train_ds = D.in_memory(D.load_dataset("digits", root=root, train=True, frames=spec.frames, cache=False, **kw))
        test_ds = D.in_memory(D.load_dataset("digits", root=root, train=False, frames=spec.frames, cache=False, **kw))
    x0, _ = train_ds[0]
    C.say(args, f"[1/4] digits events: {len(train_ds)} train / {len(test_ds)} test samples, "
                f"{tuple(x0.shape)} frames each, {'read from ' + args.root if args.root else 'built from scratch'} "
                f"({time.time() - t0:.1f} s)")
    t0 = time.time()
    C.say(args, f"[2/4] training the N-MNIST MLP ({'x'.join(map(str, x0.shape[1:]))} -> {args.hidden} -> 10, "
                f"LIF tau=2, T={spec.frames}), Adam lr {args.lr:g}, cosine, MSE on firing rate, {args.epochs} epochs")
    model, tres, dense = train_model(args, spec, train_ds, test_ds, "nmnist_mlp", {"hidden": args.hidden},
                                     args.epochs, args.lr, "mse", 0.1, None,
                                     log=(lambda s: None) if args.quiet else (lambda s: print("      " + s, flush=True)))
    C.say(args, f"      test accuracy {100 * dense.accuracy:.2f}% (best epoch {tres.best_epoch} by validation; "
                f"{time.time() - t0:.1f} s)")
    test = D.materialize(test_ds)
    if args.calib_samples >= len(train_ds):
        raise OsbcError(f"--calib-samples {args.calib_samples} must be less than the {len(train_ds)} training samples")
    calib, _ = D.calibration_inputs(train_ds, args.calib_samples, args.seed, args.batch_size)
    jobs = grid(args.sparsities, args.bits, args.methods)
    C.say(args, f"[3/4] {len(jobs)} one-shot compressions from {args.calib_samples} calibration samples")
    rows = []
    keep = {}
    t0 = time.time()
    for task, method, level in jobs:
        C.seed_all(args.seed)
        r = run_job(model, calib, test, task, method, level, dev, args.seed,
                    args.solver if task == "prune" else args.quant_solver, auto_seconds=args.auto_seconds)
        m = r.pop("_model")
        if method == "osbc" and (task, level) in (("prune", max(args.sparsities or [0])), ("quantize", 4)):
            tag = f"pruned-{round(100 * level)}" if task == "prune" else f"quantized-{int(level)}bit"
            keep[f"{tag}-osbc"] = (m, r["accuracy"])
        rows.append(r)
        C.say(args, f"      {task:<8} {method:<9} {level_str(task, level):>8}  acc {100 * r['accuracy']:6.2f}%  "
                    f"mem.err {C.fmt_err(r['membrane_error']):>8}  {r['seconds']:.2f} s")
    C.say(args, f"      ({time.time() - t0:.1f} s)")
    table = results_table(rows, dense.accuracy)
    C.say(args, "[4/4] results (test accuracy; drop in points against the dense model; mem.err: relative membrane "
                "potential error, mean over layers)")
    print(table)
    from ..checkpoint import save

    def saver(m, info):
        return lambda tmp: save(m, tmp, data=spec.name, frames=spec.frames, info=info)

    wall = time.time() - t_start
    report = {"settings": {"data": spec.name, "frames": spec.frames, "hidden": args.hidden, "epochs": args.epochs,
                           "calib_samples": args.calib_samples, "seed": args.seed, "solver": args.solver,
                           "quant_solver": args.quant_solver, "auto_seconds": args.auto_seconds,
                           "device": str(dev), "threads": _threads()},
              "dense": dense.to_dict(), "training": tres.to_dict(), "results": rows, "wall_seconds": wall}
    outputs = [(outdir / "report.json", text_writer(json_text(report))),
               (outdir / "results.txt", text_writer(table + "\n")),
               (outdir / "dense.safetensors",
                saver(model, {"test_accuracy": dense.accuracy, "train": tres.to_dict()}))]
    outputs += [(outdir / f"{name}.safetensors", saver(m, {"test_accuracy": acc})) for name, (m, acc) in keep.items()]
    outputs += plot_output(outdir, "accuracy.png", rows, dense.accuracy,
                           title=f"digits events, MLP, T={spec.frames}, {args.calib_samples} calibration samples")
    write_all(outputs)
    C.say(args, f"wrote {', '.join(str(p) for p, _ in outputs)}")
    print(f"demo finished in {wall:.1f} s")
    return 0


def _threads() -> int:
    import torch

    return torch.get_num_threads()
