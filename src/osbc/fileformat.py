"""The one osbc file format: a safetensors file holding a state dict encoded by :mod:`osbc.storage`.

Checkpoints (:func:`osbc.save` / :func:`osbc.load`) and compact files
(:func:`osbc.checkpoint.save_compressed` / :func:`~osbc.checkpoint.load_compressed`) are both written by
:func:`write` and read by :func:`read_header` + :func:`read_state`; they differ only in the string
fields the caller adds to the metadata (``format``, an architecture, user metadata). The metadata
key ``storage`` holds the encoding (:func:`osbc.storage.encode_state_dict`) and a content hash of
every stored tensor (its dtype, shape and raw bytes) plus one hash of the metadata itself (the
encoding and the other fields: architecture, arguments, frames), so flipped bits, a relabelled dtype or
an edited field are caught instead of loading as different weights or a different model. Files without hashes (osbc before they were added)
still load; compact files of that era kept the encoding under ``osbc`` instead of ``storage``.

Reading trusts nothing in the file, and every problem is an :class:`~osbc.errors.OsbcError` that
names the file and the tensor or field. Nothing is allocated that the file or the caller's
expected shapes do not justify: the header is parsed and bounded first, the encoding is checked
against the stored tensors' dtypes and shapes, the decoded shapes against ``expect`` (the model's),
and only then is tensor data read (at most the file's size) and decoded.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from . import storage
from .atomic import atomic_write
from .errors import OsbcError

__all__ = ["Header", "write", "read_header", "read_state", "digest", "parse_json"]

_MAX_HEADER = 100 << 20  # safetensors' own limit on the JSON header
# safetensors' dtype names -> torch (the ones osbc writes, plus the integer types a file may use)
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


def digest(t: Tensor) -> str:
    """Content hash of a tensor: blake2b-128 of its dtype, shape and raw bytes (hex)."""
    t = t.detach().cpu().contiguous()
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{str(t.dtype).removeprefix('torch.')}{list(t.shape)}".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy())  # the buffer itself, no copy
    return h.hexdigest()


_ENCODING_KEYS = {"format", "version", "entries", "hashes", "encoding_hash"}


def _encoding_digest(enc: dict, fields: dict) -> str:
    """Hash of the metadata itself: the encoding (layouts, shapes, bit widths, scales kept in JSON) and
    the other string fields (architecture, its arguments, frames). A flipped byte there would turn
    intact tensors into different weights, or rebuild a different model around them."""
    body = {k: v for k, v in enc.items() if k not in ("hashes", "encoding_hash")}
    other = {k: v for k, v in fields.items() if k != "storage"}
    return hashlib.blake2b(json.dumps([body, other], sort_keys=True).encode(), digest_size=16).hexdigest()


def parse_json(path: Path, field: str, text, kind: type):
    """``json.loads(text)``, which must give a ``kind``; OsbcError naming the file and field."""
    if not isinstance(text, str):
        raise OsbcError(f"{path}: damaged osbc metadata: {field} is not a string")
    try:
        value = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise OsbcError(f"{path}: damaged osbc metadata: {field} is not valid JSON ({e})") from None
    if not isinstance(value, kind):
        raise OsbcError(f"{path}: damaged osbc metadata: {field} must be a JSON {kind.__name__}, "
                        f"got {type(value).__name__}")
    return value


def write(path: str | os.PathLike, state: dict, weight_keys, fields: dict[str, str]) -> Path:
    """Encode ``state`` (``weight_keys`` compactly, see :func:`osbc.storage.encode_state_dict`), hash
    every stored tensor and write them atomically with ``fields`` as the string metadata."""
    from safetensors.torch import save_file

    tensors, enc = storage.encode_state_dict(state, weight_keys)
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    enc["hashes"] = {k: digest(v) for k, v in tensors.items()}
    enc["encoding_hash"] = _encoding_digest(enc, fields)
    meta = dict(fields, storage=json.dumps(enc))
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


@dataclass
class Header:
    """A safetensors file's header, checked: string ``meta``data and ``tensors`` (name ->
    (torch dtype, shape)), all bounded by the file's size."""

    path: Path
    meta: dict[str, str]
    tensors: dict[str, tuple[torch.dtype, tuple[int, ...]]]


def _not_safetensors(path: Path, why: str):
    return OsbcError(f"{path} is not a safetensors checkpoint ({why})")


def read_header(path: str | os.PathLike, what: str = "checkpoint") -> Header:
    """Parse and check the header of the safetensors file at ``path``. FileNotFoundError when it
    does not exist; OsbcError when it cannot be read (naming the cause) or is not safetensors."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if not 2 <= n <= min(_MAX_HEADER, size - 8):
                raise _not_safetensors(path, "no valid header length")
            raw = f.read(n)
    except FileNotFoundError:
        raise FileNotFoundError(f"no such {what}: {path}") from None
    except IsADirectoryError:
        raise OsbcError(f"{path} is a directory, not a {what} file") from None
    except OSError as e:
        raise OsbcError(f"{path}: cannot read the {what}: {e.strerror or e}") from None
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError):
        raise _not_safetensors(path, "the header is not JSON") from None
    if not isinstance(doc, dict):
        raise _not_safetensors(path, "the header is not a JSON object")
    meta = doc.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise _not_safetensors(path, "its metadata is not a string map")
    data_len = size - 8 - n
    tensors = {}
    for name, t in doc.items():
        ok = isinstance(t, dict) and isinstance(t.get("dtype"), str) and t["dtype"] in _DTYPES
        ok = ok and isinstance(t.get("shape"), list) and len(t["shape"]) <= 16
        ok = ok and all(type(s) is int and s >= 0 for s in t["shape"])
        off = t.get("data_offsets") if ok else None
        ok = ok and isinstance(off, list) and len(off) == 2 and all(type(o) is int for o in off)
        if not ok or not 0 <= off[0] <= off[1]:
            raise _not_safetensors(path, f"bad header entry for tensor {name!r}")
        if off[1] > data_len:
            raise OsbcError(f"{path} is truncated: tensor {name!r} ends {off[1] - data_len} bytes past its end; "
                            "write it again")
        dtype = _DTYPES[t["dtype"]]
        if off[1] - off[0] != math.prod(t["shape"]) * dtype.itemsize:
            raise _not_safetensors(path, f"tensor {name!r}: its byte range does not match its shape")
        tensors[name] = (dtype, tuple(t["shape"]))
    return Header(path, meta, tensors)


def _encoding(h: Header) -> dict:
    """The file's encoding metadata; a file with none (an old checkpoint saved with compact=False)
    stores each state entry as itself."""
    key = "storage" if "storage" in h.meta else "osbc" if "osbc" in h.meta else None
    if key is None:
        return {"format": storage.FORMAT, "version": storage.VERSION,
                "entries": {k: {"enc": "plain"} for k in h.tensors}}
    return parse_json(h.path, key, h.meta[key], dict)


def _fits(h: Header, shapes: dict, expect: dict) -> None:
    missing = [k for k in expect if k not in shapes]
    extra = [k for k in shapes if k not in expect]
    if missing or extra:
        parts = ([f"missing {', '.join(missing[:5])}"] if missing else []) + \
                ([f"unexpected {', '.join(extra[:5])}"] if extra else [])
        raise OsbcError(f"{h.path}: the stored tensors do not fit the model: {'; '.join(parts)}")
    for k, (dtype, shape) in expect.items():
        got = shapes[k]
        if got != (dtype, tuple(shape)):
            raise OsbcError(f"{h.path}: the stored tensors do not fit the model: {k} is "
                            f"{str(got[0]).removeprefix('torch.')}{list(got[1])} in the file, "
                            f"{str(dtype).removeprefix('torch.')}{list(shape)} in the model")


def read_state(h: Header, expect: dict[str, tuple[torch.dtype, tuple[int, ...]]] | None = None) -> dict:
    """The state dict stored in the file of header ``h``, checked and decoded. ``expect`` (state
    key -> (dtype, shape), e.g. from a model on the meta device): the stored state must match it
    exactly, checked before anything is decoded; without it, the decoded state may hold at most
    :data:`osbc.storage.MAX_ELEMENTS` elements."""
    from safetensors import safe_open

    enc = _encoding(h)
    try:
        shapes = storage.check_encoding(enc, h.tensors)
    except OsbcError as e:
        raise OsbcError(f"{h.path}: {e}") from None
    if expect is not None:
        _fits(h, shapes, expect)
    elif sum(math.prod(s) for _, s in shapes.values()) > storage.MAX_ELEMENTS:
        raise OsbcError(f"{h.path}: the stored state would decode to more than {storage.MAX_ELEMENTS:,} "
                        "elements; not loading it")
    # a file without hashes loads unchecked (older osbc), so hashes must not vanish by damage: a key
    # renamed by a flipped bit is an unknown key, and the two integrity keys come together or not at all
    unknown = set(enc) - _ENCODING_KEYS
    if unknown or ("hashes" in enc) != ("encoding_hash" in enc):
        raise OsbcError(f"{h.path}: damaged osbc metadata: the encoding's keys are "
                        f"{sorted(enc)}, expected {sorted(_ENCODING_KEYS)}")
    hashes = enc.get("hashes")
    if hashes is not None and (not isinstance(hashes, dict) or set(hashes) != set(h.tensors)):
        raise OsbcError(f"{h.path}: damaged osbc metadata: the content hashes do not list the stored tensors")
    if hashes is not None and enc.get("encoding_hash") != _encoding_digest(enc, h.meta):
        raise OsbcError(f"{h.path}: damaged osbc metadata: the encoding does not match its hash; "
                        "the file was damaged after it was written")
    tensors = {}
    try:
        with safe_open(str(h.path), framework="pt") as f:
            for name in h.tensors:
                tensors[name] = f.get_tensor(name)
    except OSError as e:
        raise OsbcError(f"{h.path}: cannot read the tensors: {e.strerror or e}") from None
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for bad files
        raise OsbcError(f"{h.path}: cannot read the tensors ({e})") from None
    for name, t in tensors.items():
        if hashes is not None and digest(t) != hashes[name]:
            raise OsbcError(f"{h.path}: tensor {name!r} is corrupted (its content hash does not match); "
                            "the file was damaged after it was written")
    try:
        return storage.decode_state_dict(tensors, enc)
    except OsbcError as e:
        raise OsbcError(f"{h.path}: {e}") from None
