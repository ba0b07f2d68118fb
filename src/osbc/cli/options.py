"""The command line's options: value types, the choices and defaults, and the one factory that adds
them to a subcommand (:func:`add_options`), so a shared option reads the same in every command.

This module imports nothing heavy: ``osbc --help`` and an early Ctrl-C stay cheap.
"""

from __future__ import annotations

import argparse
import json
import math
from typing import Any, Callable

from ..config import ALLOCATIONS, CALIBRATIONS, GRIDS, PRUNE_METHODS, QUANT_METHODS, SOLVERS  # no torch

__all__ = ["DATASETS", "DEFAULT_FRAMES", "PRUNE_METHODS", "QUANT_METHODS", "METHODS", "SOLVERS", "ALLOCATIONS",
           "CALIBRATIONS", "CALIB_SOURCES", "BUILDER_OPTIONS", "MAX_FRAMES", "MAX_BATCH", "HelpFormatter", "add_options", "add_option", "add_builder_options"]

DATASETS = ("digits", "nmnist", "dvsgesture", "cifar10dvs")
#: frames per sample when neither --frames nor the checkpoint says (the paper's T; digits: the demo's)
DEFAULT_FRAMES = {"digits": 10, "nmnist": 100, "dvsgesture": 20, "cifar10dvs": 10}
METHODS = tuple(dict.fromkeys(PRUNE_METHODS + QUANT_METHODS))
CALIB_SOURCES = ("train", "test")
#: size bounds: beyond them a sample batch or a data set no longer fits a workstation's memory
MAX_FRAMES = 1000
MAX_BATCH = 4096
MAX_DOWNSAMPLE = 64


# ---- value types (argparse turns ArgumentTypeError into "osbc: error: argument --x: ...") ------

def int_in(lo: int, hi: int | None = None, what: str = "") -> Callable[[str], int]:
    """An integer in [lo, hi]; ``what`` says why the upper bound exists."""
    kind = "a positive integer" if lo == 1 else f"an integer >= {lo}"

    def parse(s: str) -> int:
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind}, got {s!r}") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"expected {kind}, got {s!r}")
        if hi is not None and v > hi:
            raise argparse.ArgumentTypeError(f"{v} is too large: at most {hi}{what}")
        return v
    return parse


pos_int = int_in(1)
nonneg_int = int_in(0)


def checked(cast: Callable[[str], Any], ok: Callable[[Any], bool], message: str) -> Callable[[str], Any]:
    """``cast(s)`` when it parses and ``ok`` accepts it; else ``message`` (``{s}``: the input)."""
    def parse(s: str) -> Any:
        try:
            v = cast(s)
        except ValueError:
            raise argparse.ArgumentTypeError(message.format(s=repr(s))) from None
        if not ok(v):
            raise argparse.ArgumentTypeError(message.format(s=repr(s)))
        return v
    return parse


pos_float = checked(float, lambda v: v > 0 and math.isfinite(v), "expected a positive number, got {s}")
bits = checked(int, lambda v: 2 <= v <= 8, "bits must be an integer from 2 to 8, got {s}")
fraction = checked(float, lambda v: 0 <= v < 1, "expected a fraction in [0, 1), got {s}")


def sparsity(s: str) -> float:
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


def listof(kind: Callable[[str], Any], choices: tuple[str, ...] | None = None) -> Callable[[str], list]:
    """A comma-separated list of ``kind`` values (from ``choices`` when given)."""
    def parse(s: str) -> list:
        items = [t.strip() for t in s.split(",") if t.strip()]
        if not items:
            raise argparse.ArgumentTypeError("expected a comma-separated list")
        if choices is not None:
            bad = [t for t in items if t not in choices]
            if bad:
                raise argparse.ArgumentTypeError(f"unknown {', '.join(bad)}; choose from {', '.join(choices)}")
        return [kind(t) for t in items]
    return parse


def nm(s: str) -> tuple[int, int]:
    try:
        n, m = (int(v) for v in s.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"N:M pattern like 2:4 expected, got {s!r}") from None
    if not 0 < n < m:
        raise argparse.ArgumentTypeError(f"N:M needs 0 < N < M, got {s!r}")
    return n, m


def keyval(s: str) -> tuple[str, Any]:
    """KEY=VALUE with VALUE read as JSON when it is JSON (numbers, lists), else as a string."""
    if "=" not in s:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {s!r}")
    k, v = s.split("=", 1)
    try:
        val = json.loads(v)
    except json.JSONDecodeError:
        val = v
    return k.strip(), val


# ---- the options ------------------------------------------------------------------------------

_FRAMES_DEFAULTS = ", ".join(f"{k} {v}" for k, v in DEFAULT_FRAMES.items())

#: name -> (flags, add_argument keywords). A command takes an option by name and may override
#: keywords (its own help line, a default of its own); everything else is defined only here.
OPTIONS: dict[str, tuple[tuple[str, ...], dict[str, Any]]] = {
    # data and run
    "data": (("--data",), dict(choices=DATASETS, default=None,
                               help="data set (default: the checkpoint's, else digits: offline, no download)")),
    "root": (("--root",), dict(default=None, metavar="DIR",
                               help="folder holding the downloaded data set (see the README); not needed for digits")),
    "frames": (("--frames",), dict(type=int_in(1, MAX_FRAMES, " frames per sample"), default=None, metavar="T",
                                   help=f"frames per sample, 1..{MAX_FRAMES} (default: the checkpoint's, "
                                        f"else {_FRAMES_DEFAULTS})")),
    "downsample": (("--downsample",), dict(type=int_in(1, MAX_DOWNSAMPLE), default=None, metavar="K",
                                           help="sum KxK pixel blocks (2: 128x128 -> 64x64 for the 64x64 "
                                                "CIFAR10-DVS net; default: the checkpoint's, else none)")),
    "calib_samples": (("--calib-samples",), dict(type=pos_int, default=256, metavar="N",
                                                 help="stratified samples used for calibration")),
    "device": (("--device",), dict(default=None, help="cpu, cuda, cuda:1 (default: cuda when available)")),
    "seed": (("--seed",), dict(type=nonneg_int, default=0, help="random seed")),
    "batch_size": (("--batch-size",), dict(type=int_in(1, MAX_BATCH, " samples per batch"), default=64,
                                           metavar="B", help=f"batch size, 1..{MAX_BATCH}")),
    "quiet": (("-q", "--quiet"), dict(action="store_true", help="print only results and errors")),
    # inputs and outputs
    "model": (("-m", "--model"), dict(required=True, metavar="CKPT", help="checkpoint (.safetensors)")),
    "out": (("-o", "--out"), dict(required=True, help="checkpoint to write (.safetensors)")),
    "out_dir": (("-o", "--out"), dict(help="output folder")),
    "report": (("--report",), dict(default=None, metavar="JSON",
                                   help="also write the settings, per-layer report and accuracies as JSON")),
    "json": (("--json",), dict(default=None, metavar="JSON", help="also write the results as JSON")),
    "force": (("--force",), dict(action="store_true", help="overwrite existing outputs")),
    "no_eval": (("--no-eval",), dict(action="store_true", help="skip evaluating dense and compressed models")),
    "builder": (("--builder",), dict(default=None, metavar="MODULE:FUNCTION",
                                     help="build the model by importing and calling this function (e.g. "
                                          "mynets:make_net, found from the current folder or PYTHONPATH) and "
                                          "load the file's tensors into it: an osbc checkpoint, compact file or "
                                          "plain safetensors state dict")),
    "builder_arg": (("--builder-arg",), dict(action="append", type=keyval, default=[], metavar="KEY=VALUE",
                                             help="keyword argument of --builder, e.g. hidden=256 (repeatable; "
                                                  "default: the file's, when it names the same builder)")),
    "trust_builder": (("--trust-builder",), dict(action="store_true",
                                                 help="rebuild a checkpoint saved with a builder by importing and "
                                                      "calling the function it names (runs that code: only for "
                                                      "files you trust)")),
    "in_shape": (("--in-shape",), dict(type=listof(pos_int), default=None, metavar="C,H,W",
                                       help="shape of one input frame, for a model whose file does not record it")),
    "arch_arg": (("--arch-arg",), dict(action="append", type=keyval, default=[], metavar="KEY=VALUE",
                                       help="architecture argument, e.g. hidden=512 or tau=2.0 (repeatable)")),
    # compression
    "methods": (("--methods",), dict(type=listof(str, METHODS), default=list(METHODS),
                                     help="comma list; magnitude prunes only, rtn quantizes only")),
    "sparsities": (("--sparsities",), dict(type=listof(sparsity), default=None,
                                           help="comma list of sparsities, e.g. 0.5,0.9,0.97 or 90%%")),
    "bits_list": (("--bits",), dict(type=listof(bits), default=None, help="comma list of bits, e.g. 8,4,3,2")),
    "solver": (("--solver",), dict(choices=SOLVERS, default="auto",
                                   help="exact: greedy ExactOBS / OBQ; blocked: prune d/256 weights per step "
                                        "(pruning only); fast: SparseGPT / GPTQ column sweeps; restricted: the exact "
                                        "greedy on a forward-selected candidate support, near-exact at 80-99%% "
                                        "sparsity and far faster (pruning only); auto: at >= 80%% sparsity restricted where its "
                                        "estimated time is under --auto-seconds per layer and under exact's, else "
                                        "exact where that is, else fast")),
    "auto_seconds": (("--auto-seconds",), dict(type=pos_float, default=60.0, metavar="S",
                                               help="per-layer time budget of --solver auto: the best solver "
                                                    "whose estimated time fits")),
    "allocation": (("--allocation",), dict(choices=ALLOCATIONS, default="lamp",
                                           help="how the sparsity is shared among layers: lamp (the paper's), "
                                                "uniform, or global (one OBS-loss threshold over all layers)")),
    "lamp_power": (("--lamp-power",), dict(type=pos_float, default=2.0, metavar="P",
                                           help="LAMP score power (the paper uses 3 for deep nets)")),
    "calibration": (("--calibration",), dict(choices=CALIBRATIONS, default="dense",
                                             help="each layer's inputs from the dense model (the paper) or from "
                                                  "the layers already compressed (sequential)")),
    "calib_from": (("--calib-from",), dict(choices=CALIB_SOURCES, default="train",
                                           help="draw calibration samples from the training set (evaluate on the "
                                                "test set) or from the test set (evaluate on the rest of it: the "
                                                "paper's N-MNIST quantization)")),
    "include": (("--include",), dict(action="append", default=None, metavar="GLOB",
                                     help="compress only modules matching (repeatable; default: all)")),
    "exclude": (("--exclude",), dict(action="append", default=None, metavar="GLOB",
                                     help="leave modules matching alone (repeatable)")),
}

#: how a command builds the model of a file that names no registered architecture
BUILDER_OPTIONS = ("builder", "builder_arg", "trust_builder", "in_shape")
#: the data options, in --help order
DATA_OPTIONS = ("data", "root", "frames", "downsample", "calib_samples", "device", "seed", "batch_size", "quiet")


def add_option(p: argparse.ArgumentParser | Any, name: str, **override: Any) -> argparse.Action:
    """Add option ``name`` from :data:`OPTIONS` to ``p`` (a parser or argument group); ``override``
    replaces some of its keywords, e.g. ``help=`` for the command's own wording."""
    flags, kw = OPTIONS[name]
    return p.add_argument(*flags, **{**kw, **override})


def add_options(p: argparse.ArgumentParser, *names: str, group: str | None = None) -> None:
    """Add the options ``names`` to ``p``, in a titled --help section when ``group`` is given."""
    target = p.add_argument_group(group) if group else p
    for name in names:
        add_option(target, name)


def add_builder_options(p: argparse.ArgumentParser) -> None:
    """The options that build the model of a file naming no registered architecture, in their section."""
    add_options(p, *BUILDER_OPTIONS, group="model building (a file without a registered architecture)")


def _shown(default: Any) -> str:
    if isinstance(default, (list, tuple)):
        return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in default)
    return f"{default:g}" if isinstance(default, float) else str(default)


class HelpFormatter(argparse.HelpFormatter):
    """Appends "(default: X)" to every option whose default is a value (not None, off or an empty
    list) and whose help does not already say its default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        d = action.default
        if (not action.option_strings or d is None or d is False or d == [] or d == argparse.SUPPRESS
                or "default" in text or action.required):
            return text
        return f"{text} (default: {_shown(d).replace('%', '%%')})"  # help texts are %-formats
