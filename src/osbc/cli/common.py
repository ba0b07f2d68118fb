"""Helpers shared by the commands: messages, device and seeds, checkpoints and architectures, the
data set a command reads and its calibration / evaluation splits.

Heavy modules (torch, osbc's compression and data code) are imported inside the functions, so
that importing the command line stays cheap.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from typing import Any

from ..errors import OsbcError
from .options import DATASETS, DEFAULT_FRAMES

__all__ = ["say", "progress", "device", "seed_all", "load_model", "in_shape", "need_in_shape", "check_arch", "build_model", "DataSpec", "data_spec",
           "dataset", "splits", "check_shape", "table", "mean_err", "fmt_err", "out_of_memory"]


def say(args: argparse.Namespace, *msg: Any) -> None:
    """Print unless --quiet."""
    if not getattr(args, "quiet", False):
        print(*msg, flush=True)


def progress(args: argparse.Namespace) -> bool:
    """Progress bars: on a terminal, unless --quiet."""
    return not getattr(args, "quiet", False) and sys.stderr.isatty()


def device(args: argparse.Namespace):
    """--device through :func:`osbc.device.resolve_device` (imported here: it imports torch)."""
    from ..device import resolve_device

    return resolve_device(args.device)


def seed_all(seed: int) -> None:
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def load_model(path: str, dev, args: argparse.Namespace | None = None):
    """The checkpoint at ``path`` (a user's file: whatever is wrong with it is a user error), built
    with --builder/--builder-arg or, with --trust-builder, the builder the file names; --in-shape
    gives the input frame shape when the file records none."""
    from ..checkpoint import check_in_shape, load

    builder = getattr(args, "builder", None)
    builder_args = dict(getattr(args, "builder_arg", None) or [])
    trust = getattr(args, "trust_builder", False)
    if builder_args and builder is None:
        raise OsbcError("--builder-arg needs --builder MODULE:FUNCTION")
    if (builder or trust) and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # the user's module, as `python -m` would find it
    try:
        model = load(path, device=dev, builder=builder, builder_kwargs=builder_args or None, trust_builder=trust)
    except OsbcError:
        raise
    except ValueError as e:  # checkpoint.load reports unreadable or damaged files as ValueError
        raise OsbcError(str(e)) from e
    given = getattr(args, "in_shape", None)
    if given is not None:
        given, have = check_in_shape(given, "--in-shape"), in_shape(model)
        if have is not None and list(have) != given:
            raise OsbcError(f"--in-shape {','.join(map(str, given))} differs from the {tuple(have)} of {path}; "
                            "leave --in-shape out")
        model.osbc_config["in_shape"] = given
    return model


def in_shape(model) -> tuple[int, ...] | None:
    """One input frame's shape: the model's (osbc's architectures), else the one its file or
    --in-shape gave (None when unknown)."""
    shape = getattr(model, "in_shape", None) or (getattr(model, "osbc_config", None) or {}).get("in_shape")
    return tuple(shape) if shape is not None else None


def need_in_shape(model) -> tuple[int, ...]:
    """:func:`in_shape`, which a command needs to build a sample input."""
    shape = in_shape(model)
    if shape is None:
        raise OsbcError("the model's input frame shape is unknown: pass --in-shape (e.g. 2,34,34), or save it "
                        "with osbc.save(..., in_shape=...)")
    return shape


def check_arch(arch: str) -> None:
    """``arch`` is a registered architecture."""
    from .. import models

    if arch not in models.available():
        raise OsbcError(f"unknown --arch {arch!r}; choose one of {', '.join(models.available())}")


def build_model(arch: str, kwargs: dict):
    """``osbc.models.build(arch, **kwargs)`` with the user's --arch / --arch-arg."""
    from .. import models

    check_arch(arch)
    try:
        return models.build(arch, **kwargs)
    except OsbcError:
        raise
    except (MemoryError, RuntimeError) as e:  # torch: an allocation failure or an impossible size
        why = "not enough memory for its weights" if out_of_memory(e) else str(e)
        raise OsbcError(f"cannot build {arch} with --arch-arg {kwargs}: {why}; choose other sizes") from None
    except (TypeError, ValueError) as e:  # the constructor rejects the --arch-arg values
        raise OsbcError(f"cannot build {arch} with --arch-arg {kwargs}: {e}") from None


def out_of_memory(e: BaseException) -> bool:
    """Python's MemoryError, torch's out-of-memory error, or torch's CPU allocator failing (which
    raises a plain RuntimeError)."""
    if isinstance(e, MemoryError):
        return True
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(e, getattr(torch, "OutOfMemoryError", ())):
        return True
    return isinstance(e, RuntimeError) and "can't allocate memory" in str(e)


@dataclass
class DataSpec:
    """The data a command reads: data set name, frames per sample, pixel downsampling."""
    name: str
    frames: int
    downsample: int | None = None


def data_spec(args: argparse.Namespace, cfg: dict | None = None) -> DataSpec:
    """Data set, frames and downsampling: the command line's, else the checkpoint's, else defaults."""
    cfg = cfg or {}
    name = args.data or cfg.get("data") or "digits"
    if name not in DATASETS:
        raise OsbcError(f"the checkpoint was trained on {name!r}; pass --data with one of {', '.join(DATASETS)}")
    frames = args.frames or cfg.get("frames") or DEFAULT_FRAMES[name]
    same_data = args.data is None or args.data == cfg.get("data")
    down = getattr(args, "downsample", None) or ((cfg.get("info") or {}).get("downsample") if same_data else None)
    return DataSpec(name, int(frames), int(down) if down and int(down) > 1 else None)


def dataset(args: argparse.Namespace, spec: DataSpec, train: bool):
    """The training or test set of ``spec`` from ``--root``."""
    from .. import data as D

    kw = {}
    if spec.downsample:
        kw["downsample"] = spec.downsample
    if args.root is None and spec.name != "digits":
        raise OsbcError(f"--data {spec.name} needs --root DIR, the folder holding the downloaded data set "
                        "(see the README)")
    try:
        return D.load_dataset(spec.name, root=args.root, train=train, frames=spec.frames, **kw)
    except TypeError as e:  # an option this dataset does not take
        raise OsbcError(f"{spec.name}: {e}") from None


def splits(args: argparse.Namespace, spec: DataSpec, need_eval: bool = True):
    """The calibration / evaluation splits per --calib-from and --calib-samples
    (:class:`osbc.data.Splits`); the training set is read only when it is calibrated on."""
    from ..data import Splits

    source = args.calib_from
    train = dataset(args, spec, True) if source == "train" else None
    test = dataset(args, spec, False) if (need_eval or source == "test") else None
    s = Splits(train, test, args.calib_samples, args.batch_size, source)
    n = len(s.calibration_source)
    if args.calib_samples >= n:
        raise OsbcError(f"--calib-samples {args.calib_samples} must be less than the {n} "
                        f"{'training' if source == 'train' else 'test'} samples")
    return s


def check_shape(model, ds, spec: DataSpec, fix: str = "check --data and its options") -> None:
    """The model's recorded input shape matches the data's frames; ``fix`` says what to change."""
    want = in_shape(model)
    if want is None:
        return
    x0, _ = ds[0]
    got = tuple(x0.shape[1:])
    if tuple(want) != got:
        raise OsbcError(f"the model expects input {tuple(want)} per frame but {spec.name} gives {got}; {fix}")


def table(headers: list[str], rows: list[list[str]], right: set[int] | None = None) -> str:
    """A plain-text table; columns in ``right`` are right-aligned."""
    right = right or set()
    width = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]

    def fmt(cells):
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, width)))
    return "\n".join(line.rstrip() for line in [fmt(headers), "  ".join("-" * w for w in width)] + [fmt(r) for r in rows])


def mean_err(report) -> float | None:
    """Mean relative membrane-potential error over a report's layers (None when not measured)."""
    errs = [l.membrane_error for l in report.layers if l.membrane_error is not None]
    return sum(errs) / len(errs) if errs else None


def fmt_err(v: float | None) -> str:
    return "-" if v is None else f"{v:.3g}"
