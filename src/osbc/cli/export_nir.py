"""``osbc export-nir``: write a checkpoint (dense or compressed) as a NIR graph (needs the optional
``nir`` package)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import OsbcError
from . import common as C
from .options import MAX_FRAMES, add_builder_options, add_option, int_in, pos_float
from .outputs import check_out_file, write_all

NAME = "export-nir"
HELP = "write a checkpoint as a NIR graph (dense or compressed weights)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_option(p, "model", required=False, help="checkpoint written by osbc train / prune / quantize")
    # before -m/--model this command took the checkpoint as a positional argument: still accepted
    p.add_argument("model_arg", nargs="?", default=None, metavar="MODEL", help=argparse.SUPPRESS)
    p.add_argument("-o", "--out", default=None, help="output NIR file (default: the checkpoint with a .nir suffix)")
    p.add_argument("--dt", type=pos_float, default=1e-3,
                   help="seconds per time step; LIF tau_NIR = tau * dt (snntorch's importer assumes 1e-4)")
    add_option(p, "frames", type=int_in(1, MAX_FRAMES), default=4,
               help="time steps of the zero sample used to read the layer order")
    p.add_argument("-f", "--force", action="store_true", help="overwrite the output file")
    add_builder_options(p)


def run(args: argparse.Namespace) -> int:
    if args.model and args.model_arg and args.model != args.model_arg:
        raise OsbcError("two checkpoints given; pass one with -m/--model")
    model_path = args.model or args.model_arg
    if model_path is None:
        raise OsbcError("give the checkpoint to export with -m/--model")
    import importlib.util

    if importlib.util.find_spec("nir") is None:
        raise OsbcError("NIR export needs the nir package: pip install nir")
    out = check_out_file(args.out or str(Path(model_path).with_suffix(".nir")), args.force, "NIR output")
    import torch

    from ..nir_export import export_nir

    model = C.load_model(model_path, "cpu", args)
    sample = torch.zeros(args.frames, 1, *C.need_in_shape(model))
    graph = {}

    def write(tmp):
        graph["g"] = export_nir(model.eval(), tmp, dt=args.dt, sample=sample, metadata={"checkpoint": str(model_path)})

    write_all([(out, write)])
    kinds = [type(n).__name__ for k, n in graph["g"].nodes.items() if k not in ("input", "output")]
    print(f"wrote {out}: {len(kinds)} nodes ({', '.join(kinds)}), dt={args.dt:g} s")
    return 0
