"""``osbc eval``: accuracy, firing rates, synaptic operations, sparsity and size of a checkpoint."""

from __future__ import annotations

import argparse

from . import common as C
from .options import DATA_OPTIONS, add_builder_options, add_option, add_options, pos_int
from .outputs import check_out_file, json_text, text_writer, write_all

NAME = "eval"
HELP = "accuracy, firing rates, synaptic operations, sparsity and size of a checkpoint"
#: evaluation draws no calibration samples and nothing random
DATA = tuple(o for o in DATA_OPTIONS if o not in ("calib_samples", "seed"))


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_option(p, "model", help="checkpoint to evaluate")
    p.add_argument("--split", choices=("test", "train"), default="test",
                   help="which part of the data set to evaluate on")
    p.add_argument("--max-samples", type=pos_int, default=None, metavar="N",
                   help="evaluate on the first N samples only (default: all)")
    add_option(p, "json")
    add_option(p, "force", help="overwrite --json")
    add_options(p, *DATA, group="data and run options")
    add_builder_options(p)


def run(args: argparse.Namespace) -> int:
    out = check_out_file(args.json, args.force, "JSON output")
    dev = C.device(args)
    model = C.load_model(args.model, dev, args)
    spec = C.data_spec(args, model.osbc_config)
    ds = C.dataset(args, spec, args.split == "train")
    C.check_shape(model, ds, spec)
    from ..training import evaluate

    ev = evaluate(model, ds, batch_size=max(128, args.batch_size), device=dev, max_samples=args.max_samples,
                  progress=C.progress(args))
    print(f"{args.model} on {spec.name} ({args.split}, T={spec.frames})")
    print(ev)
    if out is not None:
        write_all([(out, text_writer(json_text({"model": str(args.model), "data": spec.name, "split": args.split,
                                                "frames": spec.frames, **ev.to_dict()})))])
    return 0
