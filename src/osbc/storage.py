"""Compact, exact storage of compressed models: sparse layouts and integer codes in safetensors.

A pruned or quantized model is still a dense float32 model in memory. On disk, every weight
matrix of a Linear/Conv layer is stored in the smallest of these forms (chosen per layer):

* **layout** of the stored entries: ``dense`` (all entries), ``bitmask`` (one bit per entry
  marks the nonzeros, then their values) or ``csr`` (row pointers, column indices of the
  nonzeros with the narrowest integer type that fits, then their values);
* **values**: ``float`` (the original dtype, bit for bit) or ``int`` - when every row's
  nonzeros are integer multiples of one scale (a symmetric grid of at most 8 bits, detected from
  the weights themselves), the values become ``b``-bit two's-complement codes packed
  ``8/b`` per byte, plus one float32 scale per row (``channel``) or per layer (``layer``).

Each candidate is decoded and compared bit for bit with the original before it is accepted, so a
round trip is exact: every nonzero weight comes back with its exact bit pattern (NaN and values off
any grid simply stay in float), and zeros come back as zeros - the single bit pattern not kept is
the sign of a zero (``-0.0`` loads as ``+0.0``; ``torch.equal`` holds, and no computation can tell).
Quantizers and ``w * mask`` produce ``-0.0`` all the time, and keeping its sign would cost a second
mask. Other tensors (biases, BatchNorm, neuron parameters) are stored as they are. The file is a
plain safetensors file with the layout in its JSON metadata, no pickles: :mod:`osbc.fileformat`
writes and reads it, for checkpoints too. Decoding checks the metadata and the stored parts first
(:func:`check_encoding`): a damaged encoding is an :class:`~osbc.errors.OsbcError`, never other weights.

Core (what :mod:`osbc.fileformat` stores)::

    tensors, meta = encode_state_dict(model.state_dict())
    state = decode_state_dict(tensors, meta)           # == model.state_dict(), bit for bit

Files::

    save_compressed(model, "net.safetensors", metadata={"note": "97% sparse"})
    model = load_compressed("net.safetensors", build_model)   # a module, or a callable making one
    size_report(model)   # {"dense_bytes", "compressed_bytes", "ratio", "layers": [...], ...}
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import Tensor, nn

from .errors import OsbcError
from .griddetect import MAX_BITS, detect_grid
from .layers import WEIGHT_LAYERS

__all__ = ["encode_state_dict", "decode_state_dict", "check_encoding", "state_and_keys", "size_report",
           "format_size_report", "encode_tensor", "decode_tensor", "FORMAT", "VERSION", "MAX_ELEMENTS"]

FORMAT = "osbc-compact"
VERSION = 1
_SEP = "::"  # separates a state-dict key from the part of its encoding (never in torch names)
_FLOATS = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}
_INDEX_TYPES = (torch.uint8, torch.int16, torch.int32, torch.int64)
# The most elements a stored state may decode to when no model says what to expect: 2^28 (1 GiB as
# float32), as osbc.models.MAX_PARAMETERS. A CSR entry's shape is not bounded by the file's size.
MAX_ELEMENTS = 1 << 28


# ---- bit-level helpers -------------------------------------------------------------------------

def _pack(values: np.ndarray, bits: int) -> np.ndarray:
    """Pack unsigned integers ``< 2^bits`` into ``ceil(n * bits / 8)`` bytes (little-endian bits)."""
    v = values.astype(np.uint8, copy=False).reshape(-1)
    if bits == 8:
        return v.copy()
    planes = (v[:, None] >> np.arange(bits, dtype=np.uint8)) & 1
    return np.packbits(planes.reshape(-1), bitorder="little")


def _unpack(data: np.ndarray, bits: int, n: int) -> np.ndarray:
    if bits == 8:
        return data.astype(np.uint8, copy=False)[:n]
    planes = np.unpackbits(data, count=n * bits, bitorder="little").reshape(n, bits)
    return (planes << np.arange(bits, dtype=np.uint8)).sum(1, dtype=np.uint8) if n else np.zeros(0, np.uint8)


def _index_dtype(limit: int) -> torch.dtype:
    """Narrowest integer dtype holding values in ``[0, limit)`` (uint8 / int16 / int32 / int64)."""
    if limit <= 1 << 8:
        return torch.uint8
    if limit <= 1 << 15:
        return torch.int16
    if limit <= 1 << 31:
        return torch.int32
    return torch.int64


def _nbytes(n: int, dtype: torch.dtype) -> int:
    return n * torch.empty(0, dtype=dtype).element_size()


# ---- one tensor ----------------------------------------------------------------------------------

def encode_tensor(t: Tensor, key: str = "w") -> tuple[dict[str, Tensor], dict]:
    """Encode one weight tensor (first dim = output rows) in its smallest exact form.
    Returns the tensors to store (named ``key::part``) and the entry's metadata."""
    t = t.detach().cpu().contiguous()
    shape = list(t.shape)
    R = shape[0]
    C = t.numel() // R if R else 0
    W2 = t.reshape(R, C)
    mask = W2 != 0  # NaN counts as stored; -0.0 is a zero and comes back as +0.0
    nnz = int(mask.sum())
    itemsize = t.element_size()
    numel = t.numel()

    grid = detect_grid(W2, mask) if nnz else None
    ptr_dtype = _index_dtype(nnz + 1)
    col_dtype = _index_dtype(C)
    layouts = {
        "dense": 0,
        "bitmask": (numel + 7) // 8,
        "csr": _nbytes(R + 1, ptr_dtype) + _nbytes(nnz, col_dtype),
    }
    counts = {"dense": numel, "bitmask": nnz, "csr": nnz}
    options = []
    for lay, idx_bytes in layouts.items():
        n = counts[lay]
        options.append((idx_bytes + n * itemsize, lay, "float"))
        if grid is not None:
            codes, scales, bits = grid
            options.append((idx_bytes + (n * bits + 7) // 8 + scales.numel() * 4, lay, "int"))
    size, layout, kind = min(options, key=lambda o: (o[0], o[1] != "dense", o[2] != "float"))

    meta = {"enc": "sparse", "shape": shape, "dtype": str(t.dtype).removeprefix("torch."), "layout": layout,
            "values": kind, "nnz": nnz, "bytes": int(size)}
    out: dict[str, Tensor] = {}
    if layout == "bitmask":
        out[f"{key}{_SEP}mask"] = torch.from_numpy(np.packbits(mask.reshape(-1).numpy(), bitorder="little"))
    elif layout == "csr":
        rowptr = torch.zeros(R + 1, dtype=torch.int64)
        rowptr[1:] = mask.sum(1).cumsum(0)
        cols = torch.nonzero(mask, as_tuple=True)[1]
        out[f"{key}{_SEP}rowptr"] = rowptr.to(ptr_dtype)
        out[f"{key}{_SEP}cols"] = cols.to(col_dtype)
    sel = None if layout == "dense" else mask
    if kind == "float":
        out[f"{key}{_SEP}values"] = (W2 if sel is None else W2[sel]).reshape(-1).clone()
    else:
        codes, scales, bits = grid
        if sel is None:  # dense: every entry gets a code, zeros are code 0
            full = torch.zeros(R, C, dtype=torch.int8)
            full[mask] = codes
            codes = full.reshape(-1)
        u = (codes.to(torch.int16) + (1 << (bits - 1))).to(torch.uint8).numpy()
        out[f"{key}{_SEP}codes"] = torch.from_numpy(_pack(u, bits))
        out[f"{key}{_SEP}scales"] = scales.to(torch.float32).clone()
        meta.update(bits=bits, scale="layer" if scales.numel() == 1 and R > 1 else "channel",
                    pow2=bool(torch.all(torch.frexp(scales)[0].abs() == 0.5)))
    return out, meta


def decode_tensor(parts: dict[str, Tensor], meta: dict, key: str = "w") -> Tensor:
    """Inverse of :func:`encode_tensor`."""
    shape = meta["shape"]
    dtype = _FLOATS[meta["dtype"]]
    numel = math.prod(shape)
    R = shape[0] if shape else 1
    C = numel // R if R else 0
    layout, kind, nnz = meta["layout"], meta["values"], int(meta["nnz"])
    if layout == "dense":
        pos = None
        n = numel
    elif layout == "bitmask":
        bits = np.unpackbits(parts[f"{key}{_SEP}mask"].numpy(), count=numel, bitorder="little")
        pos = torch.from_numpy(np.flatnonzero(bits))
        n = nnz
    elif layout == "csr":
        rowptr = parts[f"{key}{_SEP}rowptr"].to(torch.int64)
        cols = parts[f"{key}{_SEP}cols"].to(torch.int64)
        rows = torch.repeat_interleave(torch.arange(R), rowptr[1:] - rowptr[:-1])
        pos = rows * C + cols
        n = nnz
    else:
        raise OsbcError(f"{key}: unknown layout {layout!r}")
    if kind == "float":
        vals = parts[f"{key}{_SEP}values"].to(dtype)
    elif kind == "int":
        b = int(meta["bits"])
        u = _unpack(parts[f"{key}{_SEP}codes"].numpy(), b, n)
        codes = torch.from_numpy(u.astype(np.int16) - (1 << (b - 1)))
        scales = parts[f"{key}{_SEP}scales"].to(torch.float32)
        row_of = (torch.arange(n) if pos is None else pos) // max(C, 1)
        s = scales if scales.numel() == 1 else scales[row_of]
        vals = (codes.to(torch.float32) * s).to(dtype)
    else:
        raise OsbcError(f"{key}: unknown value kind {kind!r}")
    if pos is None:
        return vals.reshape(shape).clone()
    out = torch.zeros(numel, dtype=dtype)
    out[pos] = vals
    return out.reshape(shape)


# ---- state dicts -------------------------------------------------------------------------------

def _default_weight_keys(state: dict) -> list[str]:
    return [k for k, v in state.items()
            if isinstance(v, Tensor) and k.rsplit(".", 1)[-1] == "weight" and v.is_floating_point() and v.dim() >= 2]


def encode_state_dict(state_dict: dict, weight_keys=None) -> tuple[dict[str, Tensor], dict]:
    """Encode a state dict for safetensors: ``(tensors, meta)`` with ``meta`` JSON-serialisable.

    ``weight_keys``: the entries to encode compactly (default: floating ``*.weight`` tensors with
    two or more dims, i.e. Linear/Conv weights); everything else is stored unchanged. Encoding is
    lossless: :func:`decode_state_dict` returns the same tensors bit for bit."""
    keys = set(_default_weight_keys(state_dict) if weight_keys is None else weight_keys)
    tensors: dict[str, Tensor] = {}
    entries: dict[str, dict] = {}
    for k, v in state_dict.items():
        if not isinstance(v, Tensor):
            raise TypeError(f"state entry {k!r} is a {type(v).__name__}, not a tensor; osbc stores tensors only "
                            "(no pickles)")
        if _SEP in k:
            raise OsbcError(f"state key {k!r} contains {_SEP!r}")
        v = v.detach().cpu()
        if k in keys and v.is_floating_point() and v.dim() >= 1 and v.shape[0] > 0 and v.numel() > 0:
            parts, meta = encode_tensor(v, k)
            tensors.update(parts)
            entries[k] = meta
        else:
            tensors[k] = v.contiguous().clone()
            entries[k] = {"enc": "plain"}
    return tensors, {"format": FORMAT, "version": VERSION, "entries": entries}


def _bad(key: str, what: str) -> OsbcError:
    return OsbcError(f"tensor {key!r}: {what}")


def _count(v, lo: int, hi: int) -> bool:
    return type(v) is int and lo <= v <= hi


def _sparse_parts(key: str, e: dict) -> dict[str, tuple[tuple, tuple[int, ...]]]:
    """Check a ``sparse`` entry's fields; return the parts it needs: name -> (allowed dtypes,
    allowed lengths)."""
    shape = e.get("shape")
    if not (isinstance(shape, list) and 1 <= len(shape) <= 8 and all(_count(v, 0, MAX_ELEMENTS) for v in shape)):
        raise _bad(key, f"shape {shape!r} is not a list of 1 to 8 sizes in 0..{MAX_ELEMENTS:,}")
    numel = math.prod(shape)
    if shape[0] < 1 or not 1 <= numel <= MAX_ELEMENTS:
        raise _bad(key, f"shape {shape} holds {numel:,} elements, outside 1..{MAX_ELEMENTS:,}")
    dtype = _FLOATS.get(e.get("dtype")) if isinstance(e.get("dtype"), str) else None
    if dtype is None:
        raise _bad(key, f"dtype {e.get('dtype')!r} is not one of {', '.join(_FLOATS)}")
    layout, kind, nnz = e.get("layout"), e.get("values"), e.get("nnz")
    if layout not in ("dense", "bitmask", "csr"):
        raise _bad(key, f"unknown layout {layout!r}")
    if kind not in ("float", "int"):
        raise _bad(key, f"unknown value kind {kind!r}")
    if not _count(nnz, 0, numel):
        raise _bad(key, f"nnz {nnz!r} is not a count in 0..{numel}")
    R = shape[0]
    n = numel if layout == "dense" else nnz
    parts = {}
    if layout == "bitmask":
        parts["mask"] = ((torch.uint8,), ((numel + 7) // 8,))
    elif layout == "csr":
        parts["rowptr"] = (_INDEX_TYPES, (R + 1,))
        parts["cols"] = (_INDEX_TYPES, (nnz,))
    if kind == "float":
        parts["values"] = ((dtype,), (n,))
    else:
        bits = e.get("bits")
        if not _count(bits, 1, MAX_BITS):
            raise _bad(key, f"bits {bits!r} is not a width in 1..{MAX_BITS}")
        parts["codes"] = ((torch.uint8,), ((n * bits + 7) // 8,))
        parts["scales"] = ((torch.float32,), (1, R))
    return parts


def check_encoding(meta, tensors: dict[str, tuple[torch.dtype, tuple[int, ...]]]) -> dict:
    """Check encoding metadata ``meta`` against the stored tensors' dtypes and shapes (``name ->
    (dtype, shape)``, known before any data is read): every field's type and range, every part
    present with the dtype and length its entry implies, no stored tensor left over. Returns the
    decoded state's ``key -> (dtype, shape)``; raises :class:`~osbc.errors.OsbcError` naming the
    tensor. (The parts' contents are checked when decoding.)"""
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise OsbcError(f"not an {FORMAT} encoding")
    version = meta.get("version", 0)
    if not (_count(version, 0, VERSION) or version in [str(v) for v in range(VERSION + 1)]):
        raise OsbcError(f"{FORMAT} version {version!r} is not one this osbc reads (up to {VERSION})")
    entries = meta.get("entries")
    if not isinstance(entries, dict):
        raise OsbcError("the encoding lists no entries")
    used, out = set(), {}
    for k, e in entries.items():
        if _SEP in k or not isinstance(e, dict):
            raise _bad(k, "damaged encoding entry")
        if e.get("enc") == "plain":
            if k not in tensors:
                raise _bad(k, "missing from the file")
            used.add(k)
            out[k] = tensors[k]
            continue
        if e.get("enc") != "sparse":
            raise _bad(k, f"unknown encoding {e.get('enc')!r}")
        for part, (dtypes, lengths) in _sparse_parts(k, e).items():
            name = f"{k}{_SEP}{part}"
            if name not in tensors:
                raise _bad(k, f"its part {part!r} is missing from the file")
            dt, shp = tensors[name]
            if dt not in dtypes or len(shp) != 1 or shp[0] not in lengths:
                raise _bad(k, f"its part {part!r} is {str(dt).removeprefix('torch.')}{list(shp)}; expected "
                              f"{' or '.join(str(d).removeprefix('torch.') for d in dtypes)} of length "
                              f"{' or '.join(map(str, lengths))}")
            used.add(name)
        out[k] = (_FLOATS[e["dtype"]], tuple(e["shape"]))
    extra = sorted(set(tensors) - used)
    if extra:
        raise _bad(extra[0], "stored but not described by the encoding metadata")
    return out


def _check_parts(key: str, e: dict, parts: dict[str, Tensor]) -> None:
    """The contents a sparse entry's decoding relies on: the bitmask holds ``nnz`` ones; CSR row
    pointers run from 0 to ``nnz`` without decreasing, and the column indices of each row
    increase and stay below the row length."""
    numel = math.prod(e["shape"])
    C = numel // e["shape"][0]
    nnz = e["nnz"]
    if e["layout"] == "bitmask":
        ones = int(np.unpackbits(parts[f"{key}{_SEP}mask"].numpy(), count=numel).sum())
        if ones != nnz:
            raise _bad(key, f"its bitmask marks {ones} entries, its metadata says nnz={nnz}")
    elif e["layout"] == "csr":
        rowptr = parts[f"{key}{_SEP}rowptr"].to(torch.int64)
        cols = parts[f"{key}{_SEP}cols"].to(torch.int64)
        if int(rowptr[0]) != 0 or int(rowptr[-1]) != nnz or bool((rowptr[1:] < rowptr[:-1]).any()):
            raise _bad(key, f"its CSR row pointers do not run monotonically from 0 to nnz={nnz}")
        if nnz and (int(cols.min()) < 0 or int(cols.max()) >= C):
            raise _bad(key, f"a CSR column index lies outside 0..{C - 1}")
        rows = torch.repeat_interleave(torch.arange(e["shape"][0]), rowptr[1:] - rowptr[:-1])
        same_row = rows[1:] == rows[:-1]
        if bool((cols[1:] <= cols[:-1])[same_row].any()):
            raise _bad(key, "its CSR column indices repeat or are out of order within a row")


def decode_state_dict(tensors: dict[str, Tensor], meta: dict) -> dict[str, Tensor]:
    """Inverse of :func:`encode_state_dict` (keys in their original order). ``meta`` and the
    tensors are checked first (:func:`check_encoding`, then each part's contents): damaged input
    raises :class:`~osbc.errors.OsbcError` naming the tensor, never decodes to other weights."""
    check_encoding(meta, {n: (t.dtype, tuple(t.shape)) for n, t in tensors.items()})
    state: dict[str, Tensor] = {}
    for k, e in meta["entries"].items():
        if e["enc"] == "plain":
            state[k] = tensors[k]
        else:
            parts = {n: t for n, t in tensors.items() if n.startswith(k + _SEP)}
            _check_parts(k, e, parts)
            state[k] = decode_tensor(parts, e, k)
    return state


def _compressible_keys(model: nn.Module) -> list[str]:
    keys = []
    for name, m in model.named_modules():
        if isinstance(m, WEIGHT_LAYERS) and isinstance(getattr(m, "weight", None), Tensor):
            keys.append(f"{name}.weight" if name else "weight")
    return keys


# ---- files ---------------------------------------------------------------------------------------

def state_and_keys(model: nn.Module | dict):
    if isinstance(model, nn.Module):
        return model.state_dict(), _compressible_keys(model)
    return model, None


# ---- size report -------------------------------------------------------------------------------

def size_report(model: nn.Module | dict) -> dict:
    """Bytes of ``model`` as dense float32 vs as stored by this format.

    Returns ``{"dense_bytes", "compressed_bytes", "ratio", "weight_dense_bytes",
    "weight_compressed_bytes", "other_bytes", "layers": [...]}``; each layer record has ``name``,
    ``shape``, ``nnz``, ``sparsity``, ``layout`` (dense/bitmask/csr), ``values`` (float/int),
    ``bits`` (code width, or the float width), ``scale`` (channel/layer, for int), ``pow2``,
    ``dense_bytes`` (float32) and ``compressed_bytes``. ``other_bytes`` (biases, BatchNorm, neuron
    parameters, counted at their own width) is included in both totals; the safetensors header is not."""
    state, keys = state_and_keys(model)
    keys = set(_default_weight_keys(state) if keys is None else keys)
    layers, wd, wc, other = [], 0, 0, 0
    for k, v in state.items():
        if not isinstance(v, Tensor):
            continue
        if k in keys and v.is_floating_point() and v.numel() > 0:
            _, meta = encode_tensor(v, k)
            dense = v.numel() * 4
            rec = {"name": k[: -len(".weight")] if k.endswith(".weight") else k, "shape": list(v.shape),
                   "nnz": meta["nnz"], "sparsity": 1.0 - meta["nnz"] / v.numel(), "layout": meta["layout"],
                   "values": meta["values"], "bits": meta.get("bits", v.element_size() * 8),
                   "scale": meta.get("scale"), "pow2": meta.get("pow2"),
                   "dense_bytes": dense, "compressed_bytes": meta["bytes"]}
            layers.append(rec)
            wd += dense
            wc += meta["bytes"]
        else:
            other += v.numel() * (4 if v.is_floating_point() else v.element_size())
    total_d, total_c = wd + other, wc + other
    return {"dense_bytes": total_d, "compressed_bytes": total_c, "ratio": total_d / max(total_c, 1),
            "weight_dense_bytes": wd, "weight_compressed_bytes": wc, "other_bytes": other, "layers": layers}


def format_size_report(rep: dict) -> str:
    """A small text table of :func:`size_report`."""
    lines = [f"{'layer':<28} {'shape':<18} {'sparsity':>8} {'values':>8} {'layout':>8} {'dense':>10} {'stored':>10}"]
    for r in rep["layers"]:
        vals = f"int{r['bits']}" if r["values"] == "int" else f"f{r['bits']}"
        lines.append(f"{r['name']:<28} {'x'.join(map(str, r['shape'])):<18} {r['sparsity']:>8.1%} {vals:>8} "
                     f"{r['layout']:>8} {r['dense_bytes']:>10,} {r['compressed_bytes']:>10,}")
    lines.append(f"{'other (bias, BN, neurons)':<28} {'':<18} {'':>8} {'':>8} {'':>8} {rep['other_bytes']:>10,} "
                 f"{rep['other_bytes']:>10,}")
    lines.append(f"{'total':<28} {'':<18} {'':>8} {'':>8} {'':>8} {rep['dense_bytes']:>10,} "
                 f"{rep['compressed_bytes']:>10,}  ({rep['ratio']:.1f}x)")
    return "\n".join(lines)
