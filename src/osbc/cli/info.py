"""``osbc info``: a model's compressible modules (kernels, shapes, sizes), from a checkpoint or an
architecture name."""

from __future__ import annotations

import argparse
import json

from ..errors import OsbcError
from . import common as C
from .options import DEFAULT_FRAMES, add_builder_options, add_option
from .outputs import check_out_file, json_text, text_writer, write_all

NAME = "info"
HELP = "list a model's compressible modules: kernels, shapes, sizes"


def add_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    add_option(src, "model", required=False, help="checkpoint to describe")
    src.add_argument("--arch", help="describe a fresh architecture instead (no checkpoint needed)")
    add_option(p, "arch_arg", help="architecture argument with --arch, e.g. hidden=512 (repeatable)")
    add_option(p, "frames", help="frames of the zero sample that traces the model (default: the checkpoint's, "
                                 "else the data set's usual T)")
    add_option(p, "json", help="also write the module list as JSON")
    add_option(p, "force", help="overwrite --json")
    add_builder_options(p)


def run(args: argparse.Namespace) -> int:
    out = check_out_file(args.json, args.force, "JSON output")
    if args.model:
        model = C.load_model(args.model, "cpu", args)
        cfg = model.osbc_config
    else:
        from .. import models

        if args.builder or args.builder_arg or args.trust_builder:
            raise OsbcError("--builder, --builder-arg and --trust-builder build the model of a --model file; "
                            "with --arch use --arch-arg")
        model = C.build_model(args.arch, dict(args.arch_arg))
        cfg = dict(models.config_of(model))
    frames = args.frames or cfg.get("frames") or DEFAULT_FRAMES.get(cfg.get("data") or "digits", 10)
    in_shape = C.need_in_shape(model)
    import torch

    from .. import trace
    from ..training import model_size

    targets = trace.find_modules(model.eval(), torch.zeros(int(frames), 1, *in_shape))
    rows, recs = [], []
    total_w = 0
    for t in targets:
        w = t.layer.weight
        nz = int((w != 0).sum())
        total_w += w.numel()
        rec = {"name": t.name, "kind": t.kind, "shape": list(t.shape), "weights": w.numel(), "nonzero": nz,
               "bytes_float32": 4 * w.numel(), "bn": t.bn is not None, "neuron": t.neuron_name,
               "kernel": t.describe_kernel()}
        recs.append(rec)
        rows.append([t.name, t.kind, "x".join(map(str, t.shape)), f"{w.numel():,}", f"{100 * (1 - nz / w.numel()):.1f}%",
                     f"{4 * w.numel() / 1024:.1f} KB", "yes" if t.bn is not None else "-",
                     t.neuron_name or "-", rec["kernel"]])
    dense, stored = model_size(model)
    print(f"model {cfg.get('arch') or cfg.get('builder')} {json.dumps(cfg.get('kwargs', {}))}")
    if cfg.get("data"):
        print(f"trained on {cfg['data']} with T={cfg.get('frames')}")
    print(C.table(["module", "type", "shape", "weights", "sparsity", "float32", "BN", "neuron", "membrane kernel"],
                  rows, right={3, 4, 5}))
    print(f"{len(targets)} compressible modules, {total_w:,} weights; model {dense:,} bytes dense, "
          f"{stored:,} bytes as stored")
    if out is not None:
        write_all([(out, text_writer(json_text({"arch": cfg.get("arch"),
                                                **({"builder": cfg["builder"]} if cfg.get("builder") else {}),
                                                "kwargs": cfg.get("kwargs"),
                                                "frames": frames, "modules": recs, "bytes_dense": dense,
                                                "bytes_stored": stored})))])
    return 0
