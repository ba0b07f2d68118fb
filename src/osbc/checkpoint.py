"""Checkpoints: safetensors files that rebuild their model without pickles.

A checkpoint holds the model's state (weights, BatchNorm statistics, neuron time constants) and, in
the safetensors metadata (strings only), everything needed to rebuild it: the architecture name and
keyword arguments from :func:`osbc.models.build`, the number of frames and the dataset it was
trained on, and free-form ``info`` (training accuracy, a compression report, ...). Pruned and
quantized models are stored compactly (sparse masks, integer codes and scales) through
:mod:`osbc.storage` when that module is available, and load back to the same dense tensors.

>>> osbc.save(model, "mlp.safetensors", data="digits", frames=10)
>>> model = osbc.load("mlp.safetensors")
>>> model.osbc_config["frames"]
10
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from . import models as _models
from .atomic import atomic_write  # re-exported: the CLI and plot write through it

__all__ = ["save", "load", "read_meta", "atomic_write", "FORMAT", "VERSION"]

FORMAT = "osbc-checkpoint"
VERSION = "1"


def _storage():
    try:
        from . import storage
    except ImportError:
        return None
    if hasattr(storage, "encode_state_dict") and hasattr(storage, "decode_state_dict"):
        return storage
    return None


def _plain_tensors(state: dict) -> dict:
    out = {}
    for k, v in state.items():
        if not isinstance(v, torch.Tensor):
            continue
        out[k] = v.detach().to("cpu").contiguous().clone()
    return out


def save(model: nn.Module, path: str | os.PathLike, *, data: str | None = None, frames: int | None = None,
         info: dict | None = None, compact: bool = True) -> Path:
    """Write ``model`` to ``path`` (a ``.safetensors`` file) atomically: the file appears complete or
    not at all. The architecture comes from ``model.osbc_config`` (set by :func:`osbc.models.build`
    and kept by :func:`load`); ``data``/``frames`` default to the values recorded there.
    ``compact=True`` stores zeros and quantized weights compactly (via :mod:`osbc.storage`)."""
    path = Path(path)
    cfg = getattr(model, "osbc_config", None) or {}
    if "arch" not in cfg:
        raise ValueError("this model was not built by osbc.models.build, so a checkpoint could not rebuild it; "
                         "build it by name or register its builder with osbc.models.register")
    if not path.parent.exists() and str(path.parent) not in ("", "."):
        raise FileNotFoundError(f"directory {path.parent} does not exist")
    if path.is_dir():
        raise ValueError(f"{path} is a directory, not a checkpoint file")
    data = data if data is not None else cfg.get("data")
    frames = frames if frames is not None else cfg.get("frames")
    info = dict(cfg.get("info") or {}, **(info or {}))

    state = model.state_dict()
    meta = {"format": FORMAT, "version": VERSION, "arch": cfg["arch"],
            "kwargs": json.dumps(cfg.get("kwargs", {})),
            "data": "" if data is None else str(data),
            "frames": "" if frames is None else str(int(frames)),
            "info": json.dumps(info, default=str)}
    storage = _storage() if compact else None
    if storage is not None:
        tensors, smeta = storage.encode_state_dict({k: v.detach().cpu() for k, v in state.items()})
        tensors = _plain_tensors(tensors)
        meta["storage"] = json.dumps(smeta)
    else:
        tensors = _plain_tensors(state)

    import safetensors.torch

    return atomic_write(path, lambda tmp: safetensors.torch.save_file(tensors, tmp, metadata=meta))


def read_meta(path: str | os.PathLike) -> dict:
    """The checkpoint's metadata, decoded: ``arch``, ``kwargs``, ``data``, ``frames``, ``info``
    (and ``storage`` for compactly stored models). Raises FileNotFoundError / ValueError."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such checkpoint: {path}")
    if path.is_dir():
        raise ValueError(f"{path} is a directory, not a checkpoint file")
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for bad files
        raise ValueError(f"{path} is not a safetensors checkpoint ({e})") from None
    if raw.get("format") != FORMAT:
        raise ValueError(f"{path} is a safetensors file but not an osbc checkpoint (no osbc metadata)")
    try:
        meta = {"format": raw["format"], "version": raw.get("version", ""), "arch": raw["arch"],
                "kwargs": json.loads(raw.get("kwargs") or "{}"),
                "data": raw.get("data") or None,
                "frames": int(raw["frames"]) if raw.get("frames") else None,
                "info": json.loads(raw.get("info") or "{}")}
        if raw.get("storage"):
            meta["storage"] = json.loads(raw["storage"])
    except (KeyError, ValueError) as e:
        raise ValueError(f"{path}: damaged osbc metadata ({e})") from None
    return meta


def load(path: str | os.PathLike, *, device: str | torch.device = "cpu", model: nn.Module | None = None) -> nn.Module:
    """Rebuild the model stored at ``path`` (no pickles) and load its state; returns it in eval mode
    on ``device``. ``model.osbc_config`` holds ``arch``, ``kwargs``, ``data``, ``frames``, ``info``.
    Pass ``model`` to load the state into an existing module instead of rebuilding one."""
    path = Path(path)
    meta = read_meta(path)
    if model is None:
        try:
            model = _models.build(meta["arch"], **meta["kwargs"])
        except (TypeError, ValueError) as e:
            raise ValueError(f"{path}: cannot rebuild model {meta['arch']!r} ({e})") from None
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"{path}: cannot read tensors ({e})") from None
    if "storage" in meta:
        storage = _storage()
        if storage is None:
            raise ValueError(f"{path} is stored compactly but osbc.storage is not available")
        state = storage.decode_state_dict(tensors, meta["storage"])
    else:
        state = tensors
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise ValueError(f"{path}: the stored tensors do not fit model {meta['arch']!r}: "
                         f"{' '.join(s.strip() for s in first[:3])}") from None
    model.osbc_config = {"arch": meta["arch"], "kwargs": meta["kwargs"], "data": meta["data"],
                         "frames": meta["frames"], "info": meta["info"]}
    return model.to(device).eval()
