"""Checkpoints: safetensors files that rebuild their model without pickles.

A checkpoint holds the model's state (weights, BatchNorm statistics, neuron time constants) and, in
the safetensors metadata (strings only), everything needed to rebuild it: the architecture name and
keyword arguments from :func:`osbc.models.build` (or a user's builder function, see
:func:`osbc.models.build_with`, run only when the user trusts the file), the number of frames and
the dataset it was trained on, one input frame's shape when the model does not know it, and
free-form ``info`` (training accuracy, a compression report, ...). Pruned and
quantized models are stored compactly (sparse masks, integer codes and scales) through
:mod:`osbc.storage`, and load back to the same dense tensors. The file format (shared with
:func:`osbc.checkpoint.save_compressed`) is :mod:`osbc.fileformat`.

>>> osbc.save(model, "mlp.safetensors", data="digits", frames=10)
>>> model = osbc.load("mlp.safetensors")
>>> model.osbc_config["frames"]
10
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn

from . import fileformat, storage
from . import models as _models
from .atomic import atomic_write  # re-exported: the CLI and plot write through it
from .errors import OsbcError

__all__ = ["save", "load", "read_meta", "check_in_shape", "save_compressed", "read_compressed", "load_compressed", "atomic_write", "FORMAT", "VERSION", "MAX_FRAMES", "MAX_FRAME_SIZE"]

FORMAT = "osbc-checkpoint"
VERSION = "1"
MAX_FRAMES = 10_000  # time steps a checkpoint may ask for: the CLI allocates [frames, batch, C, H, W] inputs
MAX_FRAME_SIZE = 1 << 24  # values per frame a checkpoint's in_shape may ask for, for the same reason


def save(model: nn.Module, path: str | os.PathLike, *, data: str | None = None, frames: int | None = None,
         info: dict | None = None, compact: bool = True, builder: str | None = None,
         builder_kwargs: dict | None = None, in_shape: tuple[int, ...] | None = None) -> Path:
    """Write ``model`` to ``path`` (a ``.safetensors`` file) atomically: the file appears complete or
    not at all. The architecture comes from ``model.osbc_config`` (set by :func:`osbc.models.build`,
    :func:`osbc.models.build_with` and kept by :func:`load`), or from ``builder``: a function
    ``"package.module:function"`` that ``builder(**builder_kwargs)`` builds the model (a library
    model of your own). ``data``/``frames`` default to the values recorded there; ``in_shape`` (one
    sample frame's shape, for the CLI's sample inputs) defaults to ``model.in_shape`` when it has one.
    ``compact=True`` stores zeros and quantized weights compactly (via :mod:`osbc.storage`); every
    stored tensor gets a content hash that :func:`load` checks."""
    path = Path(path)
    cfg = getattr(model, "osbc_config", None) or {}
    if builder is not None:
        cfg = dict(cfg, arch=None, builder=_models.check_builder(builder), kwargs=builder_kwargs or {})
    elif "arch" not in cfg and "builder" not in cfg:
        raise OsbcError("this model was not built by osbc.models.build, so a checkpoint could not rebuild it; "
                        "pass builder='package.module:function' (a function that builds it) or register its "
                        "builder with osbc.models.register")
    if not path.parent.exists() and str(path.parent) not in ("", "."):
        raise FileNotFoundError(f"directory {path.parent} does not exist")
    if path.is_dir():
        raise OsbcError(f"{path} is a directory, not a checkpoint file")
    data = data if data is not None else cfg.get("data")
    frames = frames if frames is not None else cfg.get("frames")
    info = dict(cfg.get("info") or {}, **(info or {}))
    # the architectures osbc builds know their input shape; a user's model may not
    in_shape = in_shape if in_shape is not None else None if hasattr(model, "in_shape") else cfg.get("in_shape")
    fields = {"format": FORMAT, "version": VERSION}
    fields.update({"builder": cfg["builder"]} if cfg.get("builder") else {"arch": cfg["arch"]})
    fields.update({"kwargs": json.dumps(_models._jsonable(cfg.get("kwargs", {}))),
                   "data": "" if data is None else str(data),
                   "frames": "" if frames is None else str(int(frames)),
                   "info": json.dumps(info, default=str)})
    if in_shape is not None:
        fields["in_shape"] = json.dumps(check_in_shape(in_shape, "in_shape"))
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    # compact=False: the same file, every entry stored as it is (no weight keys to encode)
    return fileformat.write(path, state, None if compact else [], fields)


def check_in_shape(v, where: str) -> list[int]:
    """``v``: the shape of one sample frame, 1 to 4 sizes whose product is at most
    :data:`MAX_FRAME_SIZE` (the CLI allocates sample inputs of it); OsbcError naming ``where``."""
    ok = isinstance(v, (list, tuple)) and 1 <= len(v) <= 4
    ok = ok and all(isinstance(s, int) and not isinstance(s, bool) and 1 <= s <= MAX_FRAME_SIZE for s in v)
    if not ok or math.prod(v) > MAX_FRAME_SIZE:
        raise OsbcError(f"{where}: {v!r} is not a frame shape (1 to 4 positive sizes, at most "
                        f"{MAX_FRAME_SIZE:,} values)")
    return [int(s) for s in v]


def _meta(h: fileformat.Header, state_only: bool = False) -> dict:
    """The checkpoint fields of header ``h``, each checked: type, range, JSON shape. ``state_only``:
    a file that is not a checkpoint (a compact file, a plain safetensors state dict) has none."""
    raw, path = h.meta, h.path
    if raw.get("format") != FORMAT:
        if state_only:
            return {"arch": None, "builder": None, "kwargs": {}, "data": None, "frames": None, "info": {},
                    "in_shape": None}
        raise OsbcError(f"{path} is a safetensors file but not an osbc checkpoint (no osbc metadata)")
    version = raw.get("version", "")
    if version not in ("", VERSION):
        raise OsbcError(f"{path}: checkpoint version {version!r} is not one this osbc reads ({VERSION}); "
                        "upgrade osbc")
    arch, builder = raw.get("arch"), raw.get("builder")
    if builder is not None:
        try:
            _models.check_builder(builder)
        except OsbcError as e:
            raise OsbcError(f"{path}: damaged osbc metadata: {e}") from None
        arch = None
    elif not arch or len(arch) > 200:
        raise OsbcError(f"{path}: damaged osbc metadata: arch {arch!r} is not an architecture name")
    frames = raw.get("frames") or None
    if frames is not None:
        if not (frames.isascii() and frames.isdigit() and len(frames) <= 6 and 1 <= int(frames) <= MAX_FRAMES):
            raise OsbcError(f"{path}: damaged osbc metadata: frames={frames!r} is not a count in 1..{MAX_FRAMES}")
        frames = int(frames)
    in_shape = raw.get("in_shape") or None
    if in_shape is not None:
        in_shape = check_in_shape(fileformat.parse_json(path, "in_shape", in_shape, list),
                                  f"{path}: damaged osbc metadata: in_shape")
    return {"format": FORMAT, "version": version, "arch": arch, "builder": builder,
            "kwargs": fileformat.parse_json(path, "kwargs", raw.get("kwargs") or "{}", dict),
            "data": raw.get("data") or None, "frames": frames,
            "info": fileformat.parse_json(path, "info", raw.get("info") or "{}", dict), "in_shape": in_shape}


def read_meta(path: str | os.PathLike) -> dict:
    """The checkpoint's metadata, decoded and checked: ``arch`` (or ``builder``), ``kwargs``,
    ``data``, ``frames``, ``info``, ``in_shape`` (None unless recorded). Raises FileNotFoundError,
    or :class:`~osbc.errors.OsbcError` naming the field."""
    return _meta(fileformat.read_header(path))


def load(path: str | os.PathLike, *, device: str | torch.device = "cpu", model: nn.Module | None = None,
         builder: str | None = None, builder_kwargs: dict | None = None, trust_builder: bool = False) -> nn.Module:
    """Rebuild the model stored at ``path`` (no pickles) and load its state; returns it in eval mode
    on ``device``. ``model.osbc_config`` holds ``arch`` (or ``builder``), ``kwargs``, ``data``,
    ``frames``, ``info`` (and ``in_shape`` when the file records one).
    Pass ``model`` to load the state into an existing module instead of rebuilding one.

    A file saved with a builder (``osbc.save(..., builder="package.module:function")``) is rebuilt
    by importing and calling that function, which runs its code: only with ``trust_builder=True``.
    ``builder`` (with ``builder_kwargs``, default: the file's when it names the same builder) builds
    the model with your function instead; the file may then also be a compact file or a plain
    safetensors state dict.

    Nothing in the file is trusted: the architecture is first built (the built-in ones on the
    ``meta`` device) and every stored tensor's shape and dtype compared with it, content hashes
    are checked, and any problem raises :class:`~osbc.errors.OsbcError` naming the file and the
    tensor or field."""
    h = fileformat.read_header(path)
    meta = _meta(h, state_only=builder is not None)
    if builder is not None:
        kwargs = builder_kwargs if builder_kwargs is not None else meta["kwargs"] if meta["builder"] == builder else {}
        meta.update(arch=None, builder=builder, kwargs=kwargs)
    elif meta["builder"] and model is None and not trust_builder:
        raise OsbcError(f"{h.path} is rebuilt by calling {meta['builder']}(**{json.dumps(meta['kwargs'])}), which "
                        "imports and runs that code; if you trust the file, pass trust_builder=True (CLI: "
                        "--trust-builder), or name the builder yourself (builder=..., CLI: --builder)")
    target = model
    if target is None:
        try:
            target = (_models.build_with(meta["builder"], meta["kwargs"]) if meta["builder"]
                      else _models.skeleton(meta["arch"], **meta["kwargs"]))
        except (TypeError, ValueError) as e:
            raise OsbcError(f"{h.path}: cannot rebuild model {meta['arch'] or meta['builder']!r} ({e})") from None
    expect = {k: (v.dtype, tuple(v.shape)) for k, v in target.state_dict().items()}
    state = fileformat.read_state(h, expect)
    if model is None:  # a user's builder built it for real; a registered name, as a skeleton
        model = target if meta["builder"] else _models.build(meta["arch"], **meta["kwargs"])
    model.load_state_dict(state, strict=True)
    keys = ("builder" if meta["builder"] else "arch", "kwargs", "data", "frames", "info")
    model.osbc_config = {k: meta[k] for k in keys}
    if meta["in_shape"] is not None:
        model.osbc_config["in_shape"] = meta["in_shape"]
    return model.to(device).eval()


# ---- compact files without an architecture ------------------------------------------------------

def save_compressed(model: nn.Module | dict, path: str | os.PathLike, metadata: dict | None = None) -> Path:
    """Write ``model`` (a module, or a state dict) compactly to ``path`` (safetensors), atomically.
    ``metadata``: any JSON-serialisable dict, returned by :func:`read_compressed`. The same format
    as :func:`osbc.save`, without an architecture (so loading needs the model)."""
    state, keys = storage.state_and_keys(model)
    return fileformat.write(path, state, keys, {"format": storage.FORMAT, "user": json.dumps(metadata or {})})


def _read(path, expect=None) -> tuple[dict[str, Tensor], dict]:
    h = fileformat.read_header(path, "compact file")
    if h.meta.get("format") != storage.FORMAT:
        raise OsbcError(f"{h.path} is not an osbc compact file")
    user = fileformat.parse_json(h.path, "user", h.meta.get("user") or "{}", dict)
    return fileformat.read_state(h, expect), user


def read_compressed(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict]:
    """``(state_dict, metadata)`` of a file written by :func:`save_compressed`, checked: a damaged
    file raises :class:`~osbc.errors.OsbcError` (see :func:`osbc.fileformat.read_state`)."""
    return _read(path)


def load_compressed(path: str | os.PathLike, model: nn.Module | Callable[[], nn.Module],
                    strict: bool = True) -> nn.Module:
    """Load a compact file into ``model`` (a module, or a zero-argument callable that builds one)
    and return it. The weights are exactly those that were saved. With ``strict``, the file must
    hold exactly the model's tensors (dtypes and shapes), checked before decoding."""
    if not isinstance(model, nn.Module):
        model = model()
    expect = {k: (v.dtype, tuple(v.shape)) for k, v in model.state_dict().items()} if strict else None
    state, _ = _read(path, expect)
    model.load_state_dict(state, strict=strict)
    return model
