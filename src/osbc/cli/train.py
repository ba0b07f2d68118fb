"""``osbc train``: train a reference model on a data set and write a checkpoint."""

from __future__ import annotations

import argparse
from typing import Callable

from . import common as C
from .options import DATA_OPTIONS, add_option, add_options, fraction, int_in, pos_float, pos_int
from .outputs import check_out_file, write_all

NAME = "train"
HELP = "train a reference model on a data set and write a checkpoint"
#: train ignores --calib-samples
DATA = tuple(o for o in DATA_OPTIONS if o != "calib_samples")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--arch", default=None, help="architecture (default: the paper's for --data); one of "
                   "nmnist_mlp, dvsgesture_net, cifar10dvs_net, cifar10dvs_net64, small_conv")
    add_option(p, "arch_arg")
    p.add_argument("--epochs", type=pos_int, default=10, help="training epochs")
    p.add_argument("--lr", type=pos_float, default=1e-3, help="Adam learning rate (cosine schedule to 0)")
    p.add_argument("--loss", choices=("mse", "ce"), default="mse",
                   help="mse on the output firing rate (the paper) or cross-entropy")
    p.add_argument("--val-fraction", type=fraction, default=0.1,
                   help="stratified share of the training set that picks the best epoch (0: the last epoch)")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="mixed precision (default: on for CUDA)")
    p.add_argument("--workers", type=int_in(0, 64), default=0,
                   help="data loader worker processes (0: load in the main process, data held in memory)")
    add_option(p, "out")
    add_option(p, "force", help="overwrite --out")
    add_options(p, *DATA, group="data and run options")


def train_model(args: argparse.Namespace, spec: C.DataSpec, train_ds, test_ds, arch: str | None, arch_kw: dict,
                epochs: int, lr: float, loss: str, val_fraction: float, amp: bool | None, workers: int = 0,
                log: Callable[[str], None] = print):
    """Build and train a model; returns (model, TrainResult, test Evaluation)."""
    from .. import data as D
    from .. import models
    from ..training import evaluate, train

    classes = getattr(train_ds, "num_classes", None) or int(max(int(t) for t in train_ds.targets) + 1)
    x0, _ = train_ds[0]
    in_shape = tuple(x0.shape[1:])
    name, kw = models.default_arch(spec.name, in_shape, classes)
    if arch is not None:
        name = arch
    kw.update(arch_kw)
    C.seed_all(args.seed)
    model = C.build_model(name, kw)
    C.check_shape(model, train_ds, spec, fix="leave in_shape out of --arch-arg (it comes from the data) "
                                            "or check --data and --downsample")
    if val_fraction > 0:
        n_val = max(classes, int(round(val_fraction * len(train_ds))))
        val_ds, fit_ds = D.calibration_split(train_ds, n_val, args.seed)
    else:
        val_ds, fit_ds = None, train_ds
    fit = D.materialize(fit_ds) if workers == 0 else fit_ds
    val = D.materialize(val_ds) if val_ds is not None else None
    test = D.materialize(test_ds)
    dev = C.device(args)
    res = train(model, fit, val, epochs=epochs, batch_size=args.batch_size, lr=lr, loss=loss,
                device=dev, amp=amp, seed=args.seed, progress=C.progress(args), log=log,
                num_workers=workers)
    ev = evaluate(res.model, test, batch_size=max(128, args.batch_size), device=dev)
    return res.model, res, ev


def run(args: argparse.Namespace) -> int:
    out = check_out_file(args.out, args.force, "checkpoint")
    spec = C.data_spec(args)
    if args.arch is not None:
        C.check_arch(args.arch)
    C.device(args)  # a bad --device fails before the data is read
    train_ds = C.dataset(args, spec, True)
    test_ds = C.dataset(args, spec, False)
    C.say(args, f"training on {spec.name}: {len(train_ds)} train / {len(test_ds)} test samples, T={spec.frames}")
    model, res, ev = train_model(args, spec, train_ds, test_ds, args.arch, dict(args.arch_arg), args.epochs,
                                 args.lr, args.loss, args.val_fraction, args.amp, args.workers,
                                 log=(lambda s: None) if args.quiet else print)
    from ..checkpoint import save

    info = {"test_accuracy": ev.accuracy, "train": res.to_dict(), "seed": args.seed}
    if spec.downsample:
        info["downsample"] = spec.downsample
    write_all([(out, lambda tmp: save(model, tmp, data=spec.name, frames=spec.frames, info=info))])
    print(f"test accuracy {100 * ev.accuracy:.2f}% ({ev.samples} samples); best epoch {res.best_epoch}; "
          f"{res.seconds:.1f} s; wrote {out}")
    return 0
