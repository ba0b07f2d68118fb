"""``osbc prune`` and ``osbc quantize``: compress a checkpoint one-shot, evaluate it, write it."""

from __future__ import annotations

import argparse
import time

from ..errors import OsbcError
from . import common as C
from ..config import GRIDS, QUANT_SOLVERS
from .options import (DATA_OPTIONS, PRUNE_METHODS, QUANT_METHODS, add_builder_options, add_option, add_options, bits,
                      nm, sparsity)
from .outputs import check_out_file, json_text, text_writer, write_all

COMMANDS = {
    "prune": "prune a checkpoint one-shot (osbc, obc or magnitude)",
    "quantize": "quantize a checkpoint one-shot (osbc, obc or rtn)",
}

_METHOD_HELP = {
    "prune": "osbc: OBS on the membrane potential (neuron kernel + BN gains); obc: OBS on the input current; "
             "magnitude: smallest weights first",
    "quantize": "osbc: OBQ on the membrane potential (neuron kernel + BN gains); obc: OBQ on the input current; "
                "rtn: round to nearest",
}

_QUANT_SOLVER_HELP = ("exact: OBQ greedy (each row the better of OBQ and GPTQ); fast: GPTQ column sweep; refined: "
                      "GPTQ, then exact coordinate descent on the grid (a few sweeps' cost); exact-refined: OBQ's "
                      "and GPTQ's results both refined, per row the best (never above exact's error, exact's "
                      "cost); auto: exact-refined where exact's estimated time is under --auto-seconds per "
                      "layer, else refined")


def _add_shared(p: argparse.ArgumentParser, task: str) -> None:
    add_option(p, "solver", **(dict(choices=QUANT_SOLVERS, help=_QUANT_SOLVER_HELP) if task == "quantize" else {}))
    add_option(p, "auto_seconds")
    add_options(p, "calibration", "calib_from", "include", "exclude")
    add_option(p, "out", help=f"{'pruned' if task == 'prune' else 'quantized'} checkpoint to write")
    add_options(p, "report", "no_eval", "force")
    add_options(p, *DATA_OPTIONS, group="data and run options")
    add_builder_options(p)


def add_prune_arguments(p: argparse.ArgumentParser) -> None:
    add_option(p, "model", help="checkpoint to prune")
    p.add_argument("-s", "--sparsity", type=sparsity, default=None,
                   help="fraction of weights removed, e.g. 0.97 or 97%% (required unless --nm)")
    p.add_argument("--method", choices=PRUNE_METHODS, default="osbc", help=_METHOD_HELP["prune"])
    add_options(p, "allocation", "lamp_power")
    p.add_argument("--nm", type=nm, default=None, metavar="N:M",
                   help="N:M semi-structured sparsity (N nonzero weights in every M consecutive inputs, so "
                        "a sparsity of 1 - N/M) instead of --sparsity's unstructured one")
    _add_shared(p, "prune")


def add_quantize_arguments(p: argparse.ArgumentParser) -> None:
    add_option(p, "model", help="checkpoint to quantize")
    p.add_argument("-b", "--bits", type=bits, required=True, help="bits per weight (2..8)")
    p.add_argument("--method", choices=QUANT_METHODS, default="osbc", help=_METHOD_HELP["quantize"])
    p.add_argument("--per", choices=GRIDS, default="channel",
                   help="one scale per output channel or one per layer")
    p.add_argument("--mse", action="store_true", help="search shrunk maxima for each scale (MSE fit)")
    p.add_argument("--pow2", action="store_true", help="power-of-two scales (for hardware)")
    _add_shared(p, "quantize")


def run(args: argparse.Namespace, task: str) -> int:
    if task == "prune" and args.sparsity is None and args.nm is None:
        raise OsbcError("give the sparsity to reach with -s/--sparsity (e.g. 0.97) or an N:M pattern with --nm")
    out = check_out_file(args.out, args.force, "output")
    report_path = check_out_file(args.report, args.force, "report")
    if report_path is not None and report_path.resolve() == out.resolve():
        raise OsbcError("--report and --out name the same file; give the report another name")
    dev = C.device(args)
    model = C.load_model(args.model, dev, args)
    spec = C.data_spec(args, model.osbc_config)
    sp = C.splits(args, spec, need_eval=not args.no_eval)
    C.check_shape(model, sp.calibration_source, spec)
    calib, test, _ = sp.draw(args.seed)
    from .. import compress
    from ..checkpoint import save
    from ..training import evaluate

    shared = dict(method=args.method, solver=args.solver, auto_seconds=args.auto_seconds,
                  calibration=args.calibration, device=dev, seed=args.seed,
                  verbose=C.progress(args), include=args.include, exclude=args.exclude)
    C.seed_all(args.seed)
    t0 = time.time()
    if task == "prune":
        target = args.sparsity if args.nm is None else 1 - args.nm[0] / args.nm[1]
        res = compress.prune(model, calib, sparsity=target, allocation=args.allocation, nm=args.nm,
                             lamp_power=args.lamp_power, **shared)
        what = f"{100 * args.sparsity:g}% sparsity" if args.nm is None else f"{args.nm[0]}:{args.nm[1]} sparsity"
    else:
        res = compress.quantize(model, calib, bits=args.bits, per=args.per, mse=args.mse, pow2=args.pow2, **shared)
        what = f"{args.bits} bits"
    secs = time.time() - t0
    C.say(args, str(res.report))
    summary = {"task": task, "method": args.method, "model": str(args.model), "data": spec.name,
               "frames": spec.frames, "calib_samples": args.calib_samples, "calib_from": args.calib_from,
               "seed": args.seed, "seconds": secs,
               "report": res.report.to_dict()}
    if test is not None:
        dense = evaluate(model, test, batch_size=max(128, args.batch_size), device=dev)
        comp = evaluate(res.model, test, batch_size=max(128, args.batch_size), device=dev)
        summary["dense"] = dense.to_dict()
        summary["compressed"] = comp.to_dict()
        print(f"{args.method} {what}: accuracy {100 * comp.accuracy:.2f}% (dense {100 * dense.accuracy:.2f}%, "
              f"drop {100 * (dense.accuracy - comp.accuracy):.2f} points), weight sparsity "
              f"{100 * comp.sparsity:.1f}%, {comp.bytes_stored:,} bytes stored (dense {dense.bytes_dense:,}), "
              f"{secs:.1f} s")
    else:
        print(f"{args.method} {what}: done in {secs:.1f} s")
    info = {"compression": {k: v for k, v in summary.items() if k not in ("dense", "compressed")}}
    if spec.downsample:
        info["downsample"] = spec.downsample
    if "compressed" in summary:
        info["test_accuracy"] = summary["compressed"]["accuracy"]
        info["dense_test_accuracy"] = summary["dense"]["accuracy"]
    outputs = [(out, lambda tmp: save(res.model, tmp, data=spec.name, frames=spec.frames, info=info))]
    if report_path is not None:
        outputs.append((report_path, text_writer(json_text(summary))))
    write_all(outputs)
    C.say(args, f"wrote {out}" + (f" and {report_path}" if report_path else ""))
    return 0
