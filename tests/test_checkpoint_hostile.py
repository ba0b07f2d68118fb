"""Hostile checkpoints, generated here: every bad file is an OsbcError naming the file and the culprit,
nothing is allocated before the stored shapes are checked, and damaged tensor data is detected."""

import builtins
import json
import struct

import pytest
import torch
from safetensors.torch import save_file

import osbc
from osbc import checkpoint, models, storage
from osbc.checkpoint import load, read_meta, save
from osbc.errors import OsbcError


def _model():
    """nmnist_mlp with fc1 97% pruned (CSR) and fc2 on a 4-bit grid (int codes)."""
    torch.manual_seed(0)
    m = models.build("nmnist_mlp", in_shape=[2, 8, 8], hidden=16)
    with torch.no_grad():
        m.fc1.weight.mul_(torch.rand_like(m.fc1.weight) < 0.03)
        w = m.fc2.weight
        s = w.abs().amax(1, keepdim=True) / 7
        w.copy_(torch.round(w / s).clamp(-7, 7) * s)
    return m


@pytest.fixture
def ckpt(tmp_path):
    p = save(_model(), tmp_path / "m.safetensors", data="digits", frames=5)
    enc = json.loads(read_meta_raw(p)["__metadata__"]["storage"])
    assert enc["entries"]["fc1.weight"]["layout"] == "csr" and enc["entries"]["fc2.weight"]["values"] == "int"
    return p


def read_meta_raw(path):
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8:8 + n])


def rewrite(path, edit):
    """Apply ``edit(header)`` to the safetensors header JSON of ``path`` in place (data untouched)."""
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    edit(header)
    h = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(h)) + h + raw[8 + n:])


def edit_meta(key, fn):
    def edit(header):
        header["__metadata__"][key] = fn(header["__metadata__"][key])
    return edit


def edit_storage(fn):
    def edit(s):
        enc = json.loads(s)
        fn(enc)
        return json.dumps(enc)
    return edit_meta("storage", edit)


def _entry(key, field, value):
    def fn(enc):
        enc["entries"][key][field] = value
    return fn


def _expect_error(path, *names):
    with pytest.raises(OsbcError) as ei:
        load(path)
    msg = str(ei.value)
    assert str(path) in msg and "\n" not in msg
    for name in names:
        assert name in msg, msg
    return msg


def test_round_trip_of_the_fixture(ckpt):
    m = load(ckpt)
    ref = _model()
    for k, v in ref.state_dict().items():
        assert torch.equal(v, m.state_dict()[k]), k


@pytest.mark.parametrize("kwargs,name", [('{"hidden": 1000000000}', "hidden"), ('{"hidden": -1}', "hidden"),
                                         ('{"in_shape": [2, 10]}', "in_shape"), ('[1]', "kwargs"),
                                         ('{"hidden": 16', "kwargs"), ('{"widht": 3}', "widht")])
def test_bad_architecture_arguments(ckpt, kwargs, name):
    rewrite(ckpt, edit_meta("kwargs", lambda s: kwargs))
    _expect_error(ckpt, name)


def test_shapes_are_checked_before_the_model_is_allocated(ckpt, monkeypatch):
    # hidden=50000 at 2x34x34 is 116M parameters (464 MB): under the budget, but not what the file holds
    rewrite(ckpt, edit_meta("kwargs", lambda s: '{"in_shape": [2, 34, 34], "hidden": 50000}'))

    def no_build(*a, **k):
        raise AssertionError("the model was allocated before the file was checked")
    monkeypatch.setattr(models, "build", no_build)
    _expect_error(ckpt, "do not fit", "fc1.weight")


@pytest.mark.parametrize("field,value,name", [
    ("frames", "-5", "frames"), ("frames", "1000000000", "frames"), ("frames", "x", "frames"),
    ("info", "[1]", "info"), ("info", "{", "info"), ("arch", "resnet", "resnet"), ("arch", "", "arch"),
    ("version", "99", "version"), ("storage", "{", "storage"), ("storage", "[]", "storage"),
    ("storage", '{"format": "osbc-compact"}', "entries"),
])
def test_bad_checkpoint_fields(ckpt, field, value, name):
    rewrite(ckpt, edit_meta(field, lambda s: value))
    _expect_error(ckpt, name)


def _drop(key):
    def fn(enc):
        del enc["entries"][key]
    return fn


def _hashes_off(enc):
    """The encoding as osbc wrote it before the integrity keys."""
    enc.pop("hashes", None)
    enc.pop("encoding_hash", None)


@pytest.mark.parametrize("fn,names", [
    (_entry("fc1.weight", "shape", [16, 10 ** 12]), ["fc1.weight", "shape"]),
    (_entry("fc1.weight", "shape", [16, -128]), ["fc1.weight", "shape"]),
    (_entry("fc1.weight", "shape", "16x128"), ["fc1.weight", "shape"]),
    (_entry("fc1.weight", "shape", [8, 256]), ["fc1.weight"]),
    (_entry("fc1.weight", "dtype", "load"), ["fc1.weight", "dtype"]),
    (_entry("fc1.weight", "dtype", "int32"), ["fc1.weight", "dtype"]),
    (_entry("fc1.weight", "layout", "coo"), ["fc1.weight", "layout"]),
    (_entry("fc1.weight", "values", "complex"), ["fc1.weight", "value kind"]),
    (_entry("fc1.weight", "nnz", -1), ["fc1.weight", "nnz"]),
    (_entry("fc1.weight", "nnz", "61"), ["fc1.weight", "nnz"]),
    (_entry("fc1.weight", "nnz", 10 ** 30), ["fc1.weight", "nnz"]),
    (_entry("fc1.weight", "enc", "zip"), ["fc1.weight", "encoding"]),
    (_entry("fc2.weight", "bits", 0), ["fc2.weight", "bits"]),
    (_entry("fc2.weight", "bits", 9), ["fc2.weight", "bits"]),
    (_entry("fc2.weight", "bits", "4"), ["fc2.weight", "bits"]),
    (_entry("fc2.weight", "bits", 3), ["fc2.weight", "codes"]),
    (_entry("fc2.weight", "layout", "bitmask"), ["fc2.weight", "mask"]),
    (_entry("fc1.weight", "values", "int"), ["fc1.weight", "bits"]),
    (_drop("fc1.weight"), ["fc1.weight"]),
    (lambda enc: enc["entries"].__setitem__("fc1.weight", [1]), ["fc1.weight"]),
    (lambda enc: enc.__setitem__("entries", []), ["entries"]),
    (lambda enc: enc.__setitem__("version", 99), ["version"]),
    (lambda enc: enc.__setitem__("format", "zip"), ["encoding"]),
    (lambda enc: enc["hashes"].pop("fc2.weight::codes"), ["hashes"]),
    (lambda enc: enc.__setitem__("hashes", "abc"), ["hashes"]),
])
def test_bad_storage_metadata(ckpt, fn, names):
    rewrite(ckpt, edit_storage(fn))
    _expect_error(ckpt, *names)


def _data_offset(path, name):
    header = read_meta_raw(path)
    n = struct.unpack("<Q", path.read_bytes()[:8])[0]
    return 8 + n + header[name]["data_offsets"][0], header[name]


def _flip(path, name, byte=0, bit=0):
    off, _ = _data_offset(path, name)
    raw = bytearray(path.read_bytes())
    raw[off + byte] ^= 1 << bit
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("tensor", ["fc1.weight::values", "fc1.weight::cols", "fc2.weight::codes",
                                    "fc2.weight::scales", "sn1.tau"])
def test_bit_flips_are_detected(ckpt, tensor):
    _flip(ckpt, tensor, bit=3)
    _expect_error(ckpt, tensor, "corrupted")


def test_dtype_relabel_is_detected(ckpt):
    rewrite(ckpt, lambda h: h["fc1.weight::values"].__setitem__("dtype", "I32"))
    _expect_error(ckpt, "fc1.weight")


def _legacy(path):
    """The file as osbc wrote it before content hashes."""
    rewrite(path, edit_storage(_hashes_off))


@pytest.mark.parametrize("key", ["hashes", "encoding_hash"])
def test_a_damaged_integrity_key_does_not_make_a_legacy_file(ckpt, key):
    """A bit flip that renames "hashes" would leave a file without hashes, which loads unchecked
    (older osbc): with a flip in the data too, different weights would load silently (the seeded
    fuzz test found this). An unknown or unpaired integrity key is damage."""
    rewrite(ckpt, edit_storage(lambda enc: enc.__setitem__(key.replace("h", "j", 1), enc.pop(key))))
    _flip(ckpt, "fc1.weight::values", bit=3)
    _expect_error(ckpt, "damaged", "encoding")


def test_files_without_hashes_still_load(ckpt):
    _legacy(ckpt)
    m = load(ckpt)
    for k, v in _model().state_dict().items():
        assert torch.equal(v, m.state_dict()[k]), k


def test_old_compact_false_checkpoint_loads(tmp_path):
    # osbc before the shared format stored compact=False checkpoints with no encoding at all
    m = _model()
    meta = {"format": "osbc-checkpoint", "version": "1", "arch": "nmnist_mlp",
            "kwargs": json.dumps({"in_shape": [2, 8, 8], "hidden": 16}), "data": "", "frames": "", "info": "{}"}
    p = tmp_path / "old.safetensors"
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(p), metadata=meta)
    m2 = load(p)
    assert all(torch.equal(v, m2.state_dict()[k]) for k, v in m.state_dict().items())
    meta["kwargs"] = json.dumps({"in_shape": [2, 8, 8], "hidden": 17})
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(p), metadata=meta)
    _expect_error(p, "do not fit")


@pytest.mark.parametrize("case", ["rowptr_down", "rowptr_end", "col_out", "col_repeat"])
def test_corrupted_csr_without_hashes(ckpt, case):
    """Old files have no hashes: the CSR structure itself is checked before decoding."""
    _legacy(ckpt)
    off, info = _data_offset(ckpt, "fc1.weight::rowptr")
    coff, cinfo = _data_offset(ckpt, "fc1.weight::cols")
    assert info["dtype"] == "U8" and cinfo["dtype"] == "U8"
    raw = bytearray(ckpt.read_bytes())
    rowptr = list(raw[off:off + 17])
    cols = list(raw[coff:coff + rowptr[-1]])
    r = next(i for i in range(16) if rowptr[i + 1] - rowptr[i] >= 2)  # a row with two entries
    if case == "rowptr_down":
        raw[off + r + 1] = 0 if rowptr[r + 1] else 255
    elif case == "rowptr_end":
        raw[off + 16] += 1
    elif case == "col_out":
        raw[coff + rowptr[r]] = 200  # the row length is 128
    else:
        raw[coff + rowptr[r] + 1] = cols[rowptr[r]]
    ckpt.write_bytes(bytes(raw))
    _expect_error(ckpt, "fc1.weight", "CSR")


def test_truncated_and_junk_files(ckpt, tmp_path):
    raw = ckpt.read_bytes()
    for cut in (0, 4, 8, 100, len(raw) - 1):
        p = tmp_path / f"cut{cut}.safetensors"
        p.write_bytes(raw[:cut])
        with pytest.raises(OsbcError, match=str(p)):
            load(p)
    p = tmp_path / "huge_header.safetensors"
    p.write_bytes(struct.pack("<Q", 1 << 62) + b"{}")
    with pytest.raises(OsbcError, match="not a safetensors"):
        load(p)


def test_permission_denied_is_reported_as_such(ckpt, monkeypatch):
    real_open = builtins.open

    def denied(file, *a, **k):
        if str(file) == str(ckpt):
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *a, **k)
    monkeypatch.setattr(builtins, "open", denied)
    with pytest.raises(OsbcError, match="Permission denied") as ei:
        load(ckpt)
    assert str(ckpt) in str(ei.value) and "No such file" not in str(ei.value)
    monkeypatch.setattr(builtins, "open", real_open)

    import safetensors

    def denied_safe_open(*a, **k):
        raise PermissionError(13, "Permission denied", str(ckpt))
    monkeypatch.setattr(safetensors, "safe_open", denied_safe_open)
    with pytest.raises(OsbcError, match="Permission denied"):
        load(ckpt)


def test_compact_files_are_checked_too(tmp_path):
    m = _model()
    p = checkpoint.save_compressed(m, tmp_path / "c.safetensors", metadata={"a": 1})
    _flip(p, "fc1.weight::values")
    with pytest.raises(OsbcError, match="corrupted"):
        checkpoint.read_compressed(p)
    p = checkpoint.save_compressed(m, tmp_path / "c.safetensors")
    rewrite(p, edit_storage(_entry("fc1.weight", "shape", [16, 1 << 27])))  # 2^31 elements: over the cap
    with pytest.raises(OsbcError, match="fc1.weight"):
        checkpoint.read_compressed(p)
    rewrite(p, edit_storage(_entry("fc1.weight", "shape", [16, 1 << 20])))  # under the cap: the model says no
    with pytest.raises(OsbcError, match="do not fit"):
        checkpoint.load_compressed(p, _model())
    p = checkpoint.save_compressed(m, tmp_path / "c.safetensors")
    rewrite(p, edit_meta("user", lambda s: "[1]"))
    with pytest.raises(OsbcError, match="user"):
        checkpoint.read_compressed(p)


def test_old_compact_files_still_load(tmp_path):
    # osbc before the shared format: encoding under "osbc", no hashes
    m = _model()
    tensors, enc = storage.encode_state_dict(m.state_dict(), storage._compressible_keys(m))
    p = tmp_path / "old.safetensors"
    save_file(tensors, str(p), metadata={"format": storage.FORMAT, "osbc": json.dumps(enc),
                                         "user": json.dumps({"n": 1})})
    state, user = checkpoint.read_compressed(p)
    assert user == {"n": 1}
    assert all(torch.equal(v, state[k]) for k, v in m.state_dict().items())
    assert osbc.load_compressed(p, _model) is not None


@pytest.mark.parametrize("argv,culprit", [
    (["--arch", "small_conv", "--arch-arg", "hidden=1000000000"], "hidden"),
    (["--arch", "small_conv", "--arch-arg", "hidden=-1"], "hidden"),
    (["--arch", "dvsgesture_net", "--arch-arg", "in_shape=[2,10,10]"], "in_shape"),
    (["--model", "{ckpt}"], "frames"),
])
def test_cli_reports_one_line(ckpt, capsys, argv, culprit):
    from osbc.cli import main

    rewrite(ckpt, edit_meta("frames", lambda s: "-5"))
    rc = main(["info"] + [a.format(ckpt=ckpt) for a in argv])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and err.startswith("osbc: error:") and "\n" not in err and culprit in err, err


@pytest.mark.parametrize("edit,names", [
    # well-formed, in range, and still the same shapes: only the metadata hash can tell
    (edit_meta("kwargs", lambda s: s.replace('"hidden": 16', '"hidden": 16, "tau": 3.0')), ["metadata"]),
    (edit_meta("frames", lambda s: "6"), ["metadata"]),
    (edit_storage(lambda enc: enc["entries"]["fc2.weight"].__setitem__("pad", 1)), ["metadata"]),
])
def test_metadata_edits_that_pass_every_check_are_caught_by_the_hash(ckpt, edit, names):
    rewrite(ckpt, edit)
    _expect_error(ckpt, *names)
