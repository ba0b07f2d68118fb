"""The ``osbc`` command: demo, train, prune, quantize, eval, sweep, info.

Every subcommand works offline on ``--data digits`` (scikit-learn's handwritten digits turned into
N-MNIST-style events). User errors (a missing file, a wrong dataset root, bad numbers, an output
that exists without ``--force``) print one line ``osbc: error: ...`` on stderr and exit with 1
(2 for argument syntax, from argparse), before any output file is written. Set ``OSBC_DEBUG=1`` to
see the traceback instead.

Other modules add subcommands with :func:`register_command` (e.g. ``osbc export-nir``).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import math
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

__all__ = ["main", "build_parser", "register_command", "UserError"]

DATASETS = ("digits", "nmnist", "dvsgesture", "cifar10dvs")
#: frames per sample when neither --frames nor the checkpoint says (the paper's T; digits: the demo's)
DEFAULT_FRAMES = {"digits": 10, "nmnist": 100, "dvsgesture": 20, "cifar10dvs": 10}
PRUNE_METHODS = ("osbc", "obc", "magnitude")
QUANT_METHODS = ("osbc", "obc", "rtn")
#: modules that may add subcommands by calling register_command when imported
PLUGINS = ("osbc.nir_cli",)


class UserError(Exception):
    """A mistake in the command line or its inputs: reported in one line, no traceback."""


# ---- subcommand registry ----------------------------------------------------------------------

@dataclass
class Command:
    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int | None]
    common: bool = True  # add --data/--root/--frames/--calib-samples/--device/--seed


COMMANDS: dict[str, Command] = {}


def register_command(name: str, help: str, add_arguments: Callable[[argparse.ArgumentParser], None],
                     run: Callable[[argparse.Namespace], int | None], common: bool = True) -> None:
    """Add ``osbc NAME``: ``add_arguments(parser)`` declares its options, ``run(args)`` does the work
    and returns an exit code (None = 0). With ``common=True`` the shared options (--data, --root,
    --frames, --calib-samples, --device, --seed, --batch-size, --quiet) are added too. ``run`` may
    raise :class:`UserError`, ``ValueError`` or ``FileNotFoundError`` for one-line errors."""
    COMMANDS[name] = Command(name, help, add_arguments, run, common)


def _command(name: str, help: str):
    def deco(fn):
        adder = globals().get(f"_args_{name.replace('-', '_')}", lambda p: None)
        register_command(name, help, adder, fn)
        return fn
    return deco


# ---- argument types ---------------------------------------------------------------------------

def _pos_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}")
    return v


def _nonneg_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {s!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {s!r}")
    return v


def _pos_float(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {s!r}") from None
    if not (v > 0 and math.isfinite(v)):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {s!r}")
    return v


def _sparsity(s: str) -> float:
    t = s.strip()
    pct = t.endswith("%")
    try:
        v = float(t[:-1] if pct else t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"sparsity must be a number in [0, 1) or a percentage, got {s!r}") from None
    if pct:
        v /= 100
    if not 0 <= v < 1:
        raise argparse.ArgumentTypeError(f"sparsity must be in [0, 1) (e.g. 0.97 or 97%), got {s!r}")
    return v


def _bits(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bits must be an integer from 2 to 8, got {s!r}") from None
    if not 2 <= v <= 8:
        raise argparse.ArgumentTypeError(f"bits must be an integer from 2 to 8, got {s!r}")
    return v


def _fraction(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1), got {s!r}") from None
    if not 0 <= v < 1:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1), got {s!r}")
    return v


def _listof(kind: Callable[[str], object], choices: tuple[str, ...] | None = None):
    def parse(s: str):
        items = [t.strip() for t in s.split(",") if t.strip()]
        if not items:
            raise argparse.ArgumentTypeError("expected a comma-separated list")
        if choices is not None:
            bad = [t for t in items if t not in choices]
            if bad:
                raise argparse.ArgumentTypeError(f"unknown {', '.join(bad)}; choose from {', '.join(choices)}")
        return [kind(t) for t in items]
    return parse


def _nm(s: str) -> tuple[int, int]:
    try:
        n, m = (int(v) for v in s.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"N:M pattern like 2:4 expected, got {s!r}") from None
    if not 0 < n < m:
        raise argparse.ArgumentTypeError(f"N:M needs 0 < N < M, got {s!r}")
    return n, m


def _keyval(s: str) -> tuple[str, object]:
    if "=" not in s:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {s!r}")
    k, v = s.split("=", 1)
    try:
        val = json.loads(v)
    except json.JSONDecodeError:
        val = v
    return k.strip(), val


# ---- shared helpers ---------------------------------------------------------------------------

def _say(args, *msg) -> None:
    if not getattr(args, "quiet", False):
        print(*msg, flush=True)


def _progress(args) -> bool:
    return not getattr(args, "quiet", False) and sys.stderr.isatty()


def _check_out_file(path: str | None, force: bool, what: str = "output") -> Path | None:
    """Before any work: the output must not exist (unless --force) and its folder must."""
    if path is None:
        return None
    p = Path(path)
    if p.is_dir():
        raise UserError(f"{what} {p} is a directory")
    if p.exists() and not force:
        raise UserError(f"{what} {p} exists; pass --force to overwrite it")
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise UserError(f"folder {parent} for {what} {p} does not exist")
    return p


def _check_out_dir(path: str, force: bool) -> Path:
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise UserError(f"output folder {p} exists and is a file")
    if p.is_dir() and any(p.iterdir()) and not force:
        raise UserError(f"output folder {p} exists and is not empty; pass --force to write into it")
    if not p.parent.is_dir():
        raise UserError(f"folder {p.parent} for the output folder {p} does not exist")
    return p


def _write_json(path: Path, obj) -> None:
    from .checkpoint import atomic_write

    text = json.dumps(obj, indent=2, default=_json_default) + "\n"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def _write_text(path: Path, text: str) -> None:
    from .checkpoint import atomic_write

    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def _json_default(o):
    if hasattr(o, "to_dict"):
        return o.to_dict()
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, (set, tuple)):
        return list(o)
    return str(o)


def _table(headers: list[str], rows: list[list[str]], right: set[int] | None = None) -> str:
    right = right or set()
    width = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]

    def fmt(cells):
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, width)))
    return "\n".join(line.rstrip() for line in [fmt(headers), "  ".join("-" * w for w in width)] + [fmt(r) for r in rows])


def _device(args):
    from .training import resolve_device

    return resolve_device(args.device)


def _seed_all(seed: int) -> None:
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _load_model(path: str, device):
    from .checkpoint import load

    return load(path, device=device)


@dataclass
class DataSpec:
    name: str
    frames: int
    downsample: int | None = None


def _data_spec(args, cfg: dict | None = None) -> DataSpec:
    """Data set, frames and downsampling: the command line's, else the checkpoint's, else defaults."""
    cfg = cfg or {}
    name = args.data or cfg.get("data") or "digits"
    if name not in DATASETS:
        raise UserError(f"the checkpoint was trained on {name!r}; pass --data with one of {', '.join(DATASETS)}")
    frames = args.frames or cfg.get("frames") or DEFAULT_FRAMES[name]
    same_data = args.data is None or args.data == cfg.get("data")
    down = getattr(args, "downsample", None) or ((cfg.get("info") or {}).get("downsample") if same_data else None)
    return DataSpec(name, int(frames), int(down) if down and int(down) > 1 else None)


def _dataset(args, spec: DataSpec, train: bool):
    from . import data as D

    kw = {}
    if spec.downsample:
        kw["downsample"] = spec.downsample
    if args.root is None and spec.name != "digits":
        raise UserError(f"--data {spec.name} needs --root DIR, the folder holding the downloaded data set "
                        "(see the README)")
    try:
        return D.load_dataset(spec.name, root=args.root, train=train, frames=spec.frames, **kw)
    except TypeError as e:  # an option this dataset does not take
        raise UserError(f"{spec.name}: {e}") from None


class _TensorSet:
    """A data set held in memory as tensors (fast indexing, keeps ``targets``/``num_classes``)."""

    def __init__(self, X, y, num_classes: int):
        self.X, self.y = X, y
        self.targets = y.tolist()
        self.num_classes = num_classes

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i):
        return self.X[i], int(self.y[i])


def _in_memory(ds) -> _TensorSet:
    X, y = _materialize(ds, float("inf"))
    nc = getattr(ds, "num_classes", None) or int(y.max()) + 1
    return _TensorSet(X, y, int(nc))


def _materialize(ds, limit_bytes: float = 2e9):
    """A small data set as tensors (X [N, T, ...], y [N]) for fast repeated passes; else itself."""
    import torch

    if isinstance(ds, _TensorSet):
        return ds.X, ds.y
    n = len(ds)
    if n == 0:
        raise UserError("the data set is empty")
    x0, _ = ds[0]
    if n * x0.numel() * 4 > limit_bytes:
        return ds
    X = torch.empty((n, *x0.shape), dtype=torch.float32)
    y = torch.empty(n, dtype=torch.long)
    for i in range(n):
        xi, yi = ds[i]
        X[i] = torch.as_tensor(xi)
        y[i] = int(yi)
    return X, y


def _calibration(ds, n: int, seed: int, batch_size: int, split: str = "training"):
    """``n`` stratified samples of ``ds``: (calibration inputs, the rest of ``ds``). The inputs are
    a tensor [n, T, ...] when small, else a DataLoader of (x, y) batches."""
    from torch.utils.data import DataLoader

    from . import data as D

    if n >= len(ds):
        raise UserError(f"--calib-samples {n} must be less than the {len(ds)} {split} samples")
    calib, rest = D.calibration_split(ds, n, seed)
    m = _materialize(calib, 1e9)
    if isinstance(m, tuple):
        return m[0], rest
    return DataLoader(calib, batch_size=batch_size, shuffle=False), rest


class _Splits:
    """Calibration and evaluation data for one seed, per --calib-from: ``train`` (calibrate on
    training samples, evaluate on the whole test set) or ``test`` (the paper's N-MNIST
    quantization protocol: calibrate on test samples, evaluate on the rest of the test set)."""

    def __init__(self, args, spec: DataSpec, need_eval: bool = True):
        self.args, self.source = args, getattr(args, "calib_from", "train")
        self.train_ds = _dataset(args, spec, True) if self.source == "train" else None
        self.test_ds = _dataset(args, spec, False) if (need_eval or self.source == "test") else None
        self._test = None

    @property
    def any(self):
        return self.train_ds if self.train_ds is not None else self.test_ds

    def draw(self, seed: int):
        """(calib, eval data or None, eval_is_shared)"""
        a = self.args
        if self.source == "test":
            calib, rest = _calibration(self.test_ds, a.calib_samples, seed, a.batch_size, "test")
            return calib, _materialize(rest), False
        calib, _ = _calibration(self.train_ds, a.calib_samples, seed, a.batch_size)
        if self.test_ds is None:
            return calib, None, True
        if self._test is None:
            self._test = _materialize(self.test_ds)
        return calib, self._test, True


def _check_shape(model, ds, spec: DataSpec) -> None:
    want = getattr(model, "in_shape", None)
    if want is None:
        return
    x0, _ = ds[0]
    got = tuple(x0.shape[1:])
    if tuple(want) != got:
        raise UserError(f"the model expects input {tuple(want)} per frame but {spec.name} gives {got}; "
                        "check --data and its options")


def _mean_err(report) -> float | None:
    errs = [l.membrane_error for l in report.layers if l.membrane_error is not None]
    return sum(errs) / len(errs) if errs else None


def _fmt_err(v) -> str:
    return "-" if v is None else f"{v:.3g}"


# ---- common options ---------------------------------------------------------------------------

def _add_common(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data and run options")
    g.add_argument("--data", choices=DATASETS, default=None,
                   help="data set (default: the checkpoint's, else digits: offline, no download)")
    g.add_argument("--root", default=None, metavar="DIR",
                   help="folder holding the downloaded data set (see the README); not needed for digits")
    g.add_argument("--frames", type=_pos_int, default=None, metavar="T",
                   help="frames per sample (default: the checkpoint's, else " +
                        ", ".join(f"{k} {v}" for k, v in DEFAULT_FRAMES.items()) + ")")
    g.add_argument("--downsample", type=_pos_int, default=None, metavar="K",
                   help="sum KxK pixel blocks (2: 128x128 -> 64x64 for the 64x64 CIFAR10-DVS net)")
    g.add_argument("--calib-samples", type=_pos_int, default=256, metavar="N",
                   help="stratified training samples used for calibration (default 256)")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when available)")
    g.add_argument("--seed", type=_nonneg_int, default=0, help="random seed (default 0)")
    g.add_argument("--batch-size", type=_pos_int, default=64, metavar="B", help="batch size (default 64)")
    g.add_argument("-q", "--quiet", action="store_true", help="print only results and errors")


def _add_compress_opts(p: argparse.ArgumentParser, quant: bool) -> None:
    p.add_argument("--solver", default="auto", choices=("auto", "exact", "fast") if quant else
                   ("auto", "exact", "blocked", "fast"), help="solver (default auto: exact when affordable)")
    p.add_argument("--calibration", default="dense", choices=("dense", "sequential"),
                   help="layer inputs from the dense model (the paper) or from the already compressed layers")
    p.add_argument("--calib-from", choices=("train", "test"), default="train",
                   help="draw calibration samples from the training set (default; evaluate on the test set) "
                        "or from the test set (evaluate on the rest of it: the paper's N-MNIST quantization)")
    p.add_argument("--include", action="append", default=None, metavar="GLOB",
                   help="compress only modules matching (repeatable)")
    p.add_argument("--exclude", action="append", default=None, metavar="GLOB",
                   help="leave modules matching alone (repeatable)")


# ---- osbc train -------------------------------------------------------------------------------

def _args_train(p: argparse.ArgumentParser) -> None:
    p.add_argument("--arch", default=None, help="architecture (default: the paper's for --data); one of "
                   "nmnist_mlp, dvsgesture_net, cifar10dvs_net, cifar10dvs_net64, small_conv")
    p.add_argument("--arch-arg", action="append", type=_keyval, default=[], metavar="KEY=VALUE",
                   help="architecture argument, e.g. hidden=512 or tau=2.0 (repeatable)")
    p.add_argument("--epochs", type=_pos_int, default=10)
    p.add_argument("--lr", type=_pos_float, default=1e-3)
    p.add_argument("--loss", choices=("mse", "ce"), default="mse",
                   help="mse on the output firing rate (the paper) or cross-entropy")
    p.add_argument("--val-fraction", type=_fraction, default=0.1,
                   help="stratified share of the training set that picks the best epoch (default 0.1; 0: last)")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="mixed precision (default: on for CUDA)")
    p.add_argument("--workers", type=_nonneg_int, default=0, help="data loader worker processes")
    p.add_argument("-o", "--out", required=True, help="checkpoint to write (.safetensors)")
    p.add_argument("--force", action="store_true", help="overwrite --out")


def _train_model(args, spec: DataSpec, train_ds, test_ds, arch: str | None, arch_kw: dict, epochs: int,
                 lr: float, loss: str, val_fraction: float, amp, workers: int = 0, log=print):
    """Build and train a model; returns (model, TrainResult, test Evaluation)."""
    from . import data as D
    from . import models
    from .training import evaluate, train

    classes = getattr(train_ds, "num_classes", None) or int(max(int(t) for t in train_ds.targets) + 1)
    x0, _ = train_ds[0]
    in_shape = tuple(x0.shape[1:])
    name, kw = models.default_arch(spec.name, in_shape, classes)
    if arch is not None:
        name = arch
    kw.update(arch_kw)
    _seed_all(args.seed)
    try:
        model = models.build(name, **kw)
    except TypeError as e:
        raise UserError(f"cannot build {name}: {e}") from None
    if val_fraction > 0:
        n_val = max(classes, int(round(val_fraction * len(train_ds))))
        val_ds, fit_ds = D.calibration_split(train_ds, n_val, args.seed)
    else:
        val_ds, fit_ds = None, train_ds
    fit = _materialize(fit_ds) if workers == 0 else fit_ds
    val = _materialize(val_ds) if val_ds is not None else None
    test = _materialize(test_ds)
    res = train(model, fit, val, epochs=epochs, batch_size=args.batch_size, lr=lr, loss=loss,
                device=_device(args), amp=amp, seed=args.seed, progress=_progress(args), log=log,
                num_workers=workers)
    ev = evaluate(res.model, test, batch_size=max(128, args.batch_size), device=_device(args))
    return res.model, res, ev


@_command("train", "train a reference model on a data set and write a checkpoint")
def cmd_train(args) -> int:
    out = _check_out_file(args.out, args.force, "checkpoint")
    spec = _data_spec(args)
    from . import models

    if args.arch is not None and args.arch not in models.available():
        raise UserError(f"unknown --arch {args.arch!r}; choose one of {', '.join(models.available())}")
    train_ds = _dataset(args, spec, True)
    test_ds = _dataset(args, spec, False)
    _say(args, f"training on {spec.name}: {len(train_ds)} train / {len(test_ds)} test samples, T={spec.frames}")
    model, res, ev = _train_model(args, spec, train_ds, test_ds, args.arch, dict(args.arch_arg), args.epochs,
                                  args.lr, args.loss, args.val_fraction, args.amp, args.workers,
                                  log=(lambda s: None) if args.quiet else print)
    from .checkpoint import save

    info = {"test_accuracy": ev.accuracy, "train": res.to_dict(), "seed": args.seed}
    if spec.downsample:
        info["downsample"] = spec.downsample
    save(model, out, data=spec.name, frames=spec.frames, info=info)
    print(f"test accuracy {100 * ev.accuracy:.2f}% ({ev.samples} samples); best epoch {res.best_epoch}; "
          f"{res.seconds:.1f} s; wrote {out}")
    return 0


# ---- osbc prune / quantize --------------------------------------------------------------------

def _args_prune(p: argparse.ArgumentParser) -> None:
    p.add_argument("-m", "--model", required=True, help="checkpoint to prune")
    p.add_argument("-s", "--sparsity", type=_sparsity, required=True, help="fraction of weights removed, e.g. 0.97")
    p.add_argument("--method", choices=PRUNE_METHODS, default="osbc")
    p.add_argument("--allocation", choices=("uniform", "lamp", "global"), default="lamp",
                   help="how the sparsity is shared among layers (default lamp, the paper's)")
    p.add_argument("--lamp-power", type=_pos_float, default=2.0,
                   help="LAMP score power (default 2; the paper uses 3 for deep nets)")
    p.add_argument("--nm", type=_nm, default=None, metavar="N:M", help="N:M semi-structured sparsity instead")
    _add_compress_opts(p, quant=False)
    p.add_argument("-o", "--out", required=True, help="pruned checkpoint to write")
    p.add_argument("--report", default=None, metavar="JSON", help="also write the per-layer report as JSON")
    p.add_argument("--no-eval", action="store_true", help="skip evaluating dense and compressed models")
    p.add_argument("--force", action="store_true", help="overwrite existing outputs")


def _args_quantize(p: argparse.ArgumentParser) -> None:
    p.add_argument("-m", "--model", required=True, help="checkpoint to quantize")
    p.add_argument("-b", "--bits", type=_bits, required=True, help="bits per weight (2..8)")
    p.add_argument("--method", choices=QUANT_METHODS, default="osbc")
    p.add_argument("--per", choices=("channel", "layer"), default="channel",
                   help="one scale per output channel (default) or per layer")
    p.add_argument("--mse", action="store_true", help="search shrunk maxima for each scale (MSE fit)")
    p.add_argument("--pow2", action="store_true", help="power-of-two scales (for hardware)")
    _add_compress_opts(p, quant=True)
    p.add_argument("-o", "--out", required=True, help="quantized checkpoint to write")
    p.add_argument("--report", default=None, metavar="JSON", help="also write the per-layer report as JSON")
    p.add_argument("--no-eval", action="store_true", help="skip evaluating dense and compressed models")
    p.add_argument("--force", action="store_true", help="overwrite existing outputs")


def _compress(args, task: str) -> int:
    out = _check_out_file(args.out, args.force, "output")
    report_path = _check_out_file(args.report, args.force, "report")
    if report_path is not None and out is not None and report_path.resolve() == out.resolve():
        raise UserError("--report and --out name the same file")
    dev = _device(args)
    model = _load_model(args.model, dev)
    spec = _data_spec(args, model.osbc_config)
    splits = _Splits(args, spec, need_eval=not args.no_eval)
    _check_shape(model, splits.any, spec)
    calib, test, _ = splits.draw(args.seed)
    from . import compress
    from .checkpoint import save
    from .training import evaluate

    common = dict(method=args.method, solver=args.solver, calibration=args.calibration, device=dev, seed=args.seed,
                  verbose=_progress(args), include=args.include, exclude=args.exclude)
    _seed_all(args.seed)
    t0 = time.time()
    if task == "prune":
        res = compress.prune(model, calib, sparsity=args.sparsity, allocation=args.allocation, nm=args.nm,
                             lamp_power=args.lamp_power, **common)
        what = f"{100 * args.sparsity:g}% sparsity" if args.nm is None else f"{args.nm[0]}:{args.nm[1]} sparsity"
    else:
        res = compress.quantize(model, calib, bits=args.bits, per=args.per, mse=args.mse, pow2=args.pow2, **common)
        what = f"{args.bits} bits"
    secs = time.time() - t0
    _say(args, str(res.report))
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
    save(res.model, out, data=spec.name, frames=spec.frames, info=info)
    if report_path is not None:
        _write_json(report_path, summary)
    _say(args, f"wrote {out}" + (f" and {report_path}" if report_path else ""))
    return 0


@_command("prune", "prune a checkpoint one-shot (osbc, obc or magnitude)")
def cmd_prune(args) -> int:
    return _compress(args, "prune")


@_command("quantize", "quantize a checkpoint one-shot (osbc, obc or rtn)")
def cmd_quantize(args) -> int:
    return _compress(args, "quantize")


# ---- osbc eval --------------------------------------------------------------------------------

def _args_eval(p: argparse.ArgumentParser) -> None:
    p.add_argument("-m", "--model", required=True, help="checkpoint to evaluate")
    p.add_argument("--split", choices=("test", "train"), default="test")
    p.add_argument("--max-samples", type=_pos_int, default=None, help="evaluate on the first N samples only")
    p.add_argument("--json", default=None, help="also write the results as JSON")
    p.add_argument("--force", action="store_true", help="overwrite --json")


@_command("eval", "accuracy, firing rates, synaptic operations, sparsity and size of a checkpoint")
def cmd_eval(args) -> int:
    out = _check_out_file(args.json, args.force, "JSON output")
    dev = _device(args)
    model = _load_model(args.model, dev)
    spec = _data_spec(args, model.osbc_config)
    ds = _dataset(args, spec, args.split == "train")
    _check_shape(model, ds, spec)
    from .training import evaluate

    ev = evaluate(model, ds, batch_size=max(128, args.batch_size), device=dev, max_samples=args.max_samples,
                  progress=_progress(args))
    print(f"{args.model} on {spec.name} ({args.split}, T={spec.frames})")
    print(ev)
    if out is not None:
        _write_json(out, {"model": str(args.model), "data": spec.name, "split": args.split, "frames": spec.frames,
                          **ev.to_dict()})
    return 0


# ---- osbc info --------------------------------------------------------------------------------

def _args_info(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("-m", "--model", help="checkpoint to describe")
    src.add_argument("--arch", help="describe a fresh architecture instead (no checkpoint needed)")
    p.add_argument("--arch-arg", action="append", type=_keyval, default=[], metavar="KEY=VALUE",
                   help="architecture argument with --arch (repeatable)")
    p.add_argument("--json", default=None, help="also write the module list as JSON")
    p.add_argument("--force", action="store_true", help="overwrite --json")


@_command("info", "list a model's compressible modules: kernels, shapes, sizes")
def cmd_info(args) -> int:
    import torch

    from . import models, trace

    out = _check_out_file(args.json, args.force, "JSON output")
    if args.model:
        model = _load_model(args.model, "cpu")
        cfg = model.osbc_config
    else:
        if args.arch not in models.available():
            raise UserError(f"unknown --arch {args.arch!r}; choose one of {', '.join(models.available())}")
        try:
            model = models.build(args.arch, **dict(args.arch_arg))
        except TypeError as e:
            raise UserError(f"cannot build {args.arch}: {e}") from None
        cfg = dict(models.config_of(model))
    frames = args.frames or cfg.get("frames") or DEFAULT_FRAMES.get(cfg.get("data") or "digits", 10)
    in_shape = getattr(model, "in_shape", None)
    if in_shape is None:
        raise UserError("the model does not record its input shape")
    sample = torch.zeros(int(frames), 1, *in_shape)
    targets = trace.find_modules(model.eval(), sample)
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
    from .training import model_size

    dense, stored = model_size(model)
    print(f"model {cfg.get('arch')} {json.dumps(cfg.get('kwargs', {}))}")
    if cfg.get("data"):
        print(f"trained on {cfg['data']} with T={cfg.get('frames')}")
    print(_table(["module", "type", "shape", "weights", "sparsity", "float32", "BN", "neuron", "membrane kernel"],
                 rows, right={3, 4, 5}))
    print(f"{len(targets)} compressible modules, {total_w:,} weights; model {dense:,} bytes dense, "
          f"{stored:,} bytes as stored")
    if out is not None:
        _write_json(out, {"arch": cfg.get("arch"), "kwargs": cfg.get("kwargs"), "frames": frames, "modules": recs,
                          "bytes_dense": dense, "bytes_stored": stored})
    return 0


# ---- grids: sweep and demo --------------------------------------------------------------------

def _grid(levels_prune, levels_bits, methods) -> list[tuple[str, str, float]]:
    jobs = []
    for s in levels_prune or []:
        jobs += [("prune", m, s) for m in methods if m in PRUNE_METHODS]
    for b in levels_bits or []:
        jobs += [("quantize", m, b) for m in methods if m in QUANT_METHODS]
    return jobs


def _run_job(model, calib, test, task, method, level, dev, seed, solver, allocation="lamp", calibration="dense",
             batch_size=128, lamp_power=2.0) -> dict:
    from . import compress
    from .training import evaluate

    t0 = time.time()
    if task == "prune":
        res = compress.prune(model, calib, sparsity=level, method=method, solver=solver, allocation=allocation,
                             lamp_power=lamp_power, calibration=calibration, device=dev, seed=seed, verbose=False)
    else:
        res = compress.quantize(model, calib, bits=int(level), method=method, solver=solver,
                                calibration=calibration, device=dev, seed=seed, verbose=False)
    secs = time.time() - t0
    ev = evaluate(res.model, test, batch_size=batch_size, device=dev)
    return {"task": task, "method": method, "level": level, "accuracy": ev.accuracy,
            "membrane_error": _mean_err(res.report), "sparsity": ev.sparsity, "seconds": secs,
            "synops": ev.synops, "bytes_stored": ev.bytes_stored, "report": res.report.to_dict(),
            "_model": res.model}


def _level_str(task, level) -> str:
    return f"{100 * level:g}%" if task == "prune" else f"{int(level)} bits"


def _args_sweep(p: argparse.ArgumentParser) -> None:
    p.add_argument("-m", "--model", required=True, help="dense checkpoint")
    p.add_argument("--methods", type=_listof(str, ("osbc", "obc", "magnitude", "rtn")),
                   default=["osbc", "obc", "magnitude", "rtn"],
                   help="comma list (default osbc,obc,magnitude,rtn; magnitude prunes only, rtn quantizes only)")
    p.add_argument("--sparsities", type=_listof(_sparsity), default=None, help="comma list, e.g. 0.5,0.9,0.97")
    p.add_argument("--bits", type=_listof(_bits), default=None, help="comma list, e.g. 8,4,3,2")
    p.add_argument("--seeds", type=_pos_int, default=3, help="calibration draws per point (seed, seed+1, ...)")
    p.add_argument("--solver", default="auto", choices=("auto", "exact", "blocked", "fast"))
    p.add_argument("--allocation", choices=("uniform", "lamp", "global"), default="lamp")
    p.add_argument("--lamp-power", type=_pos_float, default=2.0, help="LAMP score power (default 2; 3 for deep nets)")
    p.add_argument("--calibration", default="dense", choices=("dense", "sequential"))
    p.add_argument("--calib-from", choices=("train", "test"), default="train",
                   help="calibrate on training samples (evaluate on the test set) or on test samples "
                        "(evaluate on the rest of the test set)")
    p.add_argument("-o", "--out", default="osbc-sweep", help="output folder (default ./osbc-sweep)")
    p.add_argument("--force", action="store_true", help="write into an existing non-empty --out")


@_command("sweep", "a grid of methods x sparsities/bits over several calibration seeds: table, JSON, plot")
def cmd_sweep(args) -> int:
    if not args.sparsities and not args.bits:
        raise UserError("give --sparsities and/or --bits")
    if args.solver == "blocked" and args.bits:
        raise UserError("--solver blocked applies to pruning only")
    outdir = _check_out_dir(args.out, args.force)
    dev = _device(args)
    model = _load_model(args.model, dev)
    spec = _data_spec(args, model.osbc_config)
    jobs = _grid(args.sparsities, args.bits, args.methods)
    if not jobs:
        raise UserError("no method in --methods applies to the requested sparsities/bits")
    if args.allocation == "global" and args.sparsities and "magnitude" in args.methods:
        raise UserError("--allocation global ranks OBS losses and cannot drive magnitude pruning; "
                        "use lamp or uniform, or leave magnitude out of --methods")
    splits = _Splits(args, spec)
    _check_shape(model, splits.any, spec)
    from .training import evaluate

    seeds = [args.seed + i for i in range(args.seeds)]
    _say(args, f"{len(jobs)} points x {len(seeds)} seeds on {spec.name} (T={spec.frames}, "
               f"{args.calib_samples} calibration samples from the {args.calib_from} set)")
    runs: dict[tuple, list[dict]] = {}
    dense_acc: dict[int, float] = {}
    dense = None
    t_all = time.time()
    for seed in seeds:
        calib, test, shared = splits.draw(seed)
        if dense is None or not shared:
            dense = evaluate(model, test, batch_size=max(128, args.batch_size), device=dev)
            _say(args, f"  seed {seed}  dense accuracy {100 * dense.accuracy:.2f}% on {dense.samples} samples")
        dense_acc[seed] = dense.accuracy
        for task, method, level in jobs:
            _seed_all(seed)
            r = _run_job(model, calib, test, task, method, level, dev, seed, args.solver, args.allocation,
                         args.calibration, max(128, args.batch_size), args.lamp_power)
            r.pop("_model")
            r["seed"] = seed
            r["drop"] = dense_acc[seed] - r["accuracy"]
            runs.setdefault((task, method, level), []).append(r)
            _say(args, f"  seed {seed}  {task:<8} {method:<9} {_level_str(task, level):>8}  "
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
    table = _results_table(agg, dense_mean, spread=True)
    print(table)
    result = {"model": str(args.model), "data": spec.name, "frames": spec.frames, "calib_samples": args.calib_samples,
              "calib_from": args.calib_from, "seeds": seeds, "solver": args.solver, "allocation": args.allocation,
              "lamp_power": args.lamp_power,
              "calibration": args.calibration, "dense": dict(dense.to_dict(), accuracy=dense_mean,
                                                             accuracy_std=dense_std, accuracies=list(dense_acc.values())),
              "results": agg, "seconds": time.time() - t_all}
    outdir.mkdir(exist_ok=True)
    _write_json(outdir / "sweep.json", result)
    _write_text(outdir / "sweep.txt", table + "\n")
    written = ["sweep.json", "sweep.txt"]
    try:
        from .plot import plot_results

        plot_results(agg, dense_mean, outdir / "sweep.png", dense_std=dense_std,
                     title=f"{spec.name}, T={spec.frames}, {args.calib_samples} calibration samples, "
                           f"{len(seeds)} seeds")
        written.append("sweep.png")
    except ValueError as e:
        print(f"osbc: warning: no plot ({e})", file=sys.stderr)
    _say(args, f"wrote {', '.join(str(outdir / w) for w in written)}")
    return 0


def _results_table(rows: list[dict], dense_acc: float, spread: bool = False) -> str:
    headers = ["task", "method", "level", "accuracy", "drop", "mem.err", "seconds"]
    body = [["dense", "-", "-", f"{100 * dense_acc:.2f}%", "-", "-", "-"]]
    for r in rows:
        acc = f"{100 * r['accuracy']:.2f}%"
        if spread:
            acc += f" ± {100 * r['accuracy_std']:.2f}"
        body.append([r["task"], r["method"], _level_str(r["task"], r["level"]), acc,
                     f"{100 * r.get('drop', dense_acc - r['accuracy']):+.2f}", _fmt_err(r["membrane_error"]),
                     f"{r['seconds']:.2f}"])
    return _table(headers, body, right={2, 3, 4, 5, 6})


# ---- osbc demo --------------------------------------------------------------------------------

DEMO = dict(frames=10, epochs=8, lr=5e-3, calib_samples=256, sparsities=[0.5, 0.9, 0.97], bits=[8, 4, 3, 2],
            methods=["osbc", "obc", "magnitude", "rtn"], hidden=256, solver="fast")


def _args_demo(p: argparse.ArgumentParser) -> None:
    p.add_argument("-o", "--out", default="osbc-demo", help="output folder (default ./osbc-demo)")
    p.add_argument("--force", action="store_true", help="write into an existing non-empty --out")
    p.add_argument("--epochs", type=_pos_int, default=DEMO["epochs"], help=f"training epochs (default {DEMO['epochs']})")
    p.add_argument("--lr", type=_pos_float, default=DEMO["lr"], help=f"learning rate (default {DEMO['lr']:g})")
    p.add_argument("--hidden", type=_pos_int, default=DEMO["hidden"], help="hidden LIF neurons of the MLP")
    p.add_argument("--sparsities", type=_listof(_sparsity), default=DEMO["sparsities"])
    p.add_argument("--bits", type=_listof(_bits), default=DEMO["bits"])
    p.add_argument("--methods", type=_listof(str, ("osbc", "obc", "magnitude", "rtn")), default=DEMO["methods"])
    p.add_argument("--solver", default=DEMO["solver"], choices=("auto", "exact", "fast"),
                   help="default fast (SparseGPT / GPTQ column sweeps) to fit the CPU budget; auto or exact "
                        "run the greedy ExactOBS / OBQ solvers (about 15 s per compression of the MLP on 2 CPU cores)")
    p.set_defaults(demo_defaults=True)


@_command("demo", "the whole job offline: digits events, train the MLP, prune and quantize, table + JSON + plot")
def cmd_demo(args) -> int:
    from .training import pinned_threads

    # one intra-op thread on any machine: torch's CPU sums round differently per thread count
    with pinned_threads(1):
        return _demo(args)


def _demo(args) -> int:
    t_start = time.time()
    outdir = _check_out_dir(args.out, args.force)
    if args.data not in (None, "digits"):
        raise UserError("the demo runs on the offline digits; use osbc train / sweep for other data sets")
    args.data = "digits"
    if args.frames is None:
        args.frames = DEMO["frames"]
    spec = _data_spec(args)
    dev = _device(args)
    _seed_all(args.seed)
    t0 = time.time()
    from . import data as D

    # from scratch: the events are written to a temporary folder (or --root), integrated into
    # frames once and kept in memory
    with tempfile.TemporaryDirectory(prefix="osbc-digits-") as tmp:
        root = args.root or tmp
        kw = {"downsample": spec.downsample} if spec.downsample else {}
        train_ds = _in_memory(D.load_dataset("digits", root=root, train=True, frames=spec.frames, cache=False, **kw))
        test_ds = _in_memory(D.load_dataset("digits", root=root, train=False, frames=spec.frames, cache=False, **kw))
    x0, _ = train_ds[0]
    _say(args, f"[1/4] digits events: {len(train_ds)} train / {len(test_ds)} test samples, "
               f"{tuple(x0.shape)} frames each, {'read from ' + args.root if args.root else 'built from scratch'} "
               f"({time.time() - t0:.1f} s)")
    t0 = time.time()
    _say(args, f"[2/4] training the N-MNIST MLP ({'x'.join(map(str, x0.shape[1:]))} -> {args.hidden} -> 10, "
               f"LIF tau=2, T={spec.frames}), Adam lr {args.lr:g}, cosine, MSE on firing rate, {args.epochs} epochs")
    model, tres, dense = _train_model(args, spec, train_ds, test_ds, "nmnist_mlp", {"hidden": args.hidden},
                                      args.epochs, args.lr, "mse", 0.1, None,
                                      log=(lambda s: None) if args.quiet else (lambda s: print("      " + s, flush=True)))
    _say(args, f"      test accuracy {100 * dense.accuracy:.2f}% (best epoch {tres.best_epoch} by validation; "
               f"{time.time() - t0:.1f} s)")
    test = _materialize(test_ds)
    calib, _ = _calibration(train_ds, args.calib_samples, args.seed, args.batch_size)
    jobs = _grid(args.sparsities, args.bits, args.methods)
    _say(args, f"[3/4] {len(jobs)} one-shot compressions from {args.calib_samples} calibration samples")
    rows = []
    keep = {}
    t0 = time.time()
    for task, method, level in jobs:
        _seed_all(args.seed)
        r = _run_job(model, calib, test, task, method, level, dev, args.seed, args.solver)
        m = r.pop("_model")
        if method == "osbc" and (task, level) in (("prune", max(args.sparsities or [0])), ("quantize", 4)):
            tag = f"pruned-{round(100 * level)}" if task == "prune" else f"quantized-{int(level)}bit"
            keep[f"{tag}-osbc"] = (m, r["accuracy"])
        rows.append(r)
        _say(args, f"      {task:<8} {method:<9} {_level_str(task, level):>8}  acc {100 * r['accuracy']:6.2f}%  "
                   f"mem.err {_fmt_err(r['membrane_error']):>8}  {r['seconds']:.2f} s")
    _say(args, f"      ({time.time() - t0:.1f} s)")
    table = _results_table(rows, dense.accuracy)
    _say(args, "[4/4] results (test accuracy; drop in points against the dense model; mem.err: relative membrane "
               "potential error, mean over layers)")
    print(table)
    outdir.mkdir(exist_ok=True)
    from .checkpoint import save

    save(model, outdir / "dense.safetensors", data=spec.name, frames=spec.frames,
         info={"test_accuracy": dense.accuracy, "train": tres.to_dict()})
    for name, (m, acc) in keep.items():
        save(m, outdir / f"{name}.safetensors", data=spec.name, frames=spec.frames, info={"test_accuracy": acc})
    wall = time.time() - t_start
    report = {"settings": {"data": spec.name, "frames": spec.frames, "hidden": args.hidden, "epochs": args.epochs,
                           "calib_samples": args.calib_samples, "seed": args.seed, "solver": args.solver,
                           "device": str(dev), "threads": _threads()},
              "dense": dense.to_dict(), "training": tres.to_dict(), "results": rows, "wall_seconds": wall}
    _write_json(outdir / "report.json", report)
    _write_text(outdir / "results.txt", table + "\n")
    written = ["report.json", "results.txt", "dense.safetensors"] + [f"{k}.safetensors" for k in keep]
    try:
        from .plot import plot_results

        plot_results(rows, dense.accuracy, outdir / "accuracy.png",
                     title=f"digits events, MLP, T={spec.frames}, {args.calib_samples} calibration samples")
        written.append("accuracy.png")
    except ValueError as e:
        print(f"osbc: warning: no plot ({e})", file=sys.stderr)
    _say(args, f"wrote {', '.join(str(outdir / w) for w in written)}")
    print(f"demo finished in {wall:.1f} s")
    return 0


def _threads() -> int:
    import torch

    return torch.get_num_threads()


# ---- entry point ------------------------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse's own convention), usage hint after
        self.exit(2, f"osbc: error: {message} (see: {self.prog} --help)\n")


def _load_plugins() -> None:
    for mod in PLUGINS:
        try:
            if importlib.util.find_spec(mod) is None:
                continue
        except (ImportError, ValueError):
            continue
        try:
            importlib.import_module(mod)
        except ImportError:
            continue


def build_parser() -> argparse.ArgumentParser:
    _load_plugins()

    parser = _Parser(prog="osbc", description="One-shot pruning and quantization of spiking neural networks "
                                              "with membrane-potential error (OSBC).")
    try:
        from importlib.metadata import version

        ver = version("osbc")
    except Exception:  # noqa: BLE001
        ver = "unknown"
    parser.add_argument("--version", action="version", version=f"osbc {ver}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for cmd in COMMANDS.values():
        p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.help)
        cmd.add_arguments(p)
        if cmd.common:
            _add_common(p)
        p.set_defaults(func=cmd.run)
    return parser


def _one_line(e: BaseException) -> str:
    msg = str(e).strip() or type(e).__name__
    if isinstance(e, FileNotFoundError) and e.filename and str(e.filename) not in msg:
        msg = f"{msg}: {e.filename}"
    if isinstance(e, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)) \
            and e.strerror and e.filename:
        msg = f"{e.strerror}: {e.filename}"
    return " ".join(msg.split())


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code (0 ok, 1 error, 2 bad arguments, 130 interrupted)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    from .kernels import KernelError

    user_errors = (UserError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError,
                   KernelError, ValueError)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("osbc: interrupted", file=sys.stderr)
        return 130
    except user_errors as e:
        if os.environ.get("OSBC_DEBUG"):
            raise
        print(f"osbc: error: {_one_line(e)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    # run the importable module, not this __main__ copy, so plugins register where main() looks
    from osbc.cli import main as _main

    sys.exit(_main())
