"""Checkpoints: safetensors files that rebuild their model without pickles.

A checkpoint holds the model's state (weights, BatchNorm statistics, neuron time constants) and, in
the safetensors metadata (strings only), everything needed to rebuild it: the architecture name and
keyword arguments from :func:`osbc.models.build`, the number of frames and the dataset it was
trained on, and free-form ``info`` (training accuracy, a compression report, ...). Pruned and
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
import os
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn

from . import fileformat, storage
from . import models as _models
from .atomic import atomic_write  # re-exported: the CLI and plot write through it
from .errors import OsbcError

__all__ = ["save", "load", "read_meta", "save_compressed", "read_compressed", "load_compressed", "atomic_write", "FORMAT", "VERSION", "MAX_FRAMES"]

FORMAT = "osbc-checkpoint"
VERSION = "1"
MAX_FRAMES = 10_000  # time steps a checkpoint may ask for: the CLI allocates [frames, batch, C, H, W] inputs


def save(model: nn.Module, path: str | os.PathLike, *, data: str | None = None, frames: int | None = None,
         info: dict | None = None, compact: bool = True) -> Path:
    """Write ``model`` to ``path`` (a ``.safetensors`` file) atomically: the file appears complete or
    not at all. The architecture comes from ``model.osbc_config`` (set by :func:`osbc.models.build`
    and kept by :func:`load`); ``data``/``frames`` default to the values recorded there.
    ``compact=True`` stores zeros and quantized weights compactly (via :mod:`osbc.storage`); every
    stored tensor gets a content hash that :func:`load` checks."""
    path = Path(path)
    cfg = getattr(model, "osbc_config", None) or {}
    if "arch" not in cfg:
        raise OsbcError("this model was not built by osbc.models.build, so a checkpoint could not rebuild it; "
                        "build it by name or register its builder with osbc.models.register")
    if not path.parent.exists() and str(path.parent) not in ("", "."):
        raise FileNotFoundError(f"directory {path.parent} does not exist")
    if path.is_dir():
        raise OsbcError(f"{path} is a directory, not a checkpoint file")
    data = data if data is not None else cfg.get("data")
    frames = frames if frames is not None else cfg.get("frames")
    info = dict(cfg.get("info") or {}, **(info or {}))
    fields = {"format": FORMAT, "version": VERSION, "arch": cfg["arch"],
              "kwargs": json.dumps(cfg.get("kwargs", {})),
              "data": "" if data is None else str(data),
              "frames": "" if frames is None else str(int(frames)),
              "info": json.dumps(info, default=str)}
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    # compact=False: the same file, every entry stored as it is (no weight keys to encode)
    return fileformat.write(path, state, None if compact else [], fields)


def _meta(h: fileformat.Header) -> dict:
    """The checkpoint fields of header ``h``, each checked: type, range, JSON shape."""
    raw, path = h.meta, h.path
    if raw.get("format") != FORMAT:
        raise OsbcError(f"{path} is a safetensors file but not an osbc checkpoint (no osbc metadata)")
    version = raw.get("version", "")
    if version not in ("", VERSION):
        raise OsbcError(f"{path}: checkpoint version {version!r} is not one this osbc reads ({VERSION}); "
                        "upgrade osbc")
    arch = raw.get("arch")
    if not arch or len(arch) > 200:
        raise OsbcError(f"{path}: damaged osbc metadata: arch {arch!r} is not an architecture name")
    frames = raw.get("frames") or None
    if frames is not None:
        if not (frames.isascii() and frames.isdigit() and len(frames) <= 6 and 1 <= int(frames) <= MAX_FRAMES):
            raise OsbcError(f"{path}: damaged osbc metadata: frames={frames!r} is not a count in 1..{MAX_FRAMES}")
        frames = int(frames)
    return {"format": FORMAT, "version": version, "arch": arch,
            "kwargs": fileformat.parse_json(path, "kwargs", raw.get("kwargs") or "{}", dict),
            "data": raw.get("data") or None, "frames": frames,
            "info": fileformat.parse_json(path, "info", raw.get("info") or "{}", dict)}


def read_meta(path: str | os.PathLike) -> dict:
    """The checkpoint's metadata, decoded and checked: ``arch``, ``kwargs``, ``data``, ``frames``,
    ``info``. Raises FileNotFoundError, or :class:`~osbc.errors.OsbcError` naming the field."""
    return _meta(fileformat.read_header(path))


def load(path: str | os.PathLike, *, device: str | torch.device = "cpu", model: nn.Module | None = None) -> nn.Module:
    """Rebuild the model stored at ``path`` (no pickles) and load its state; returns it in eval mode
    on ``device``. ``model.osbc_config`` holds ``arch``, ``kwargs``, ``data``, ``frames``, ``info``.
    Pass ``model`` to load the state into an existing module instead of rebuilding one.

    Nothing in the file is trusted: the architecture is first built on the ``meta`` device and
    every stored tensor's shape and dtype compared with it, content hashes are checked, and any
    problem raises :class:`~osbc.errors.OsbcError` naming the file and the tensor or field."""
    h = fileformat.read_header(path)
    meta = _meta(h)
    target = model
    if target is None:
        try:
            target = _models.skeleton(meta["arch"], **meta["kwargs"])
        except (TypeError, ValueError) as e:
            raise OsbcError(f"{h.path}: cannot rebuild model {meta['arch']!r} ({e})") from None
    expect = {k: (v.dtype, tuple(v.shape)) for k, v in target.state_dict().items()}
    state = fileformat.read_state(h, expect)
    if model is None:
        model = _models.build(meta["arch"], **meta["kwargs"])
    model.load_state_dict(state, strict=True)
    model.osbc_config = {"arch": meta["arch"], "kwargs": meta["kwargs"], "data": meta["data"],
                         "frames": meta["frames"], "info": meta["info"]}
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
