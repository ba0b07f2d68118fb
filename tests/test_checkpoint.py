"""Checkpoints: pickle-free round trips of dense and compressed models, atomic writes, errors."""

import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import osbc
from osbc import models, snn
from osbc.checkpoint import load, read_meta, save


def _same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def _out(m, x):
    snn.reset(m)
    y = m(x)
    snn.reset(m)
    return y


def _conv():
    m = models.build("small_conv", in_shape=(2, 8, 8), channels=4, hidden=12)
    with torch.no_grad():  # non-trivial BN statistics and weights
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.5, 0.5)
                mod.running_var.uniform_(0.5, 2.0)
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.uniform_(-0.2, 0.2)
                mod.num_batches_tracked.fill_(7)
            if isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d)):
                mod.weight.mul_(3)
    return m.eval()


def test_dense_round_trip(tmp_path):
    m = _conv()
    p = save(m, tmp_path / "m.safetensors", data="digits", frames=7, info={"test_accuracy": 0.5})
    assert p.exists()
    m2 = load(p)
    _same_state(m, m2)
    assert type(m2) is type(m) and not m2.training
    assert m2.osbc_config == {"arch": "small_conv", "kwargs": {"in_shape": [2, 8, 8], "channels": 4, "hidden": 12},
                              "data": "digits", "frames": 7, "info": {"test_accuracy": 0.5}}
    x = torch.rand(3, 2, 2, 8, 8) * 3
    assert torch.equal(_out(m, x), _out(m2, x))
    # saving a loaded model keeps its metadata
    save(m2, tmp_path / "again.safetensors")
    meta = read_meta(tmp_path / "again.safetensors")
    assert meta["data"] == "digits" and meta["frames"] == 7 and meta["info"]["test_accuracy"] == 0.5


def test_file_is_plain_safetensors_with_string_metadata(tmp_path):
    m = models.build("nmnist_mlp", in_shape=(2, 4, 4), hidden=8)
    save(m, tmp_path / "m.safetensors", data="nmnist", frames=100)
    with safe_open(str(tmp_path / "m.safetensors"), framework="pt") as f:
        meta = f.metadata()
    assert meta["format"] == "osbc-checkpoint" and meta["arch"] == "nmnist_mlp"
    assert json.loads(meta["kwargs"]) == {"in_shape": [2, 4, 4], "hidden": 8}
    assert meta["data"] == "nmnist" and meta["frames"] == "100"


def test_neuron_parameters_survive(tmp_path):
    m = models.build("nmnist_mlp", in_shape=(2, 4, 4), hidden=8, neuron="plif", tau=3.0)
    with torch.no_grad():
        m.sn1.w.fill_(0.3)
    m2 = load(save(m, tmp_path / "plif.safetensors"))
    assert float(m2.sn1.w.detach()) == pytest.approx(0.3)
    assert isinstance(m2.sn2, snn.PLIF)


def test_pruned_model_is_stored_compactly_and_exactly(tmp_path):
    m = models.build("nmnist_mlp", in_shape=(2, 16, 16), hidden=64)
    dense = save(m, tmp_path / "dense.safetensors")
    with torch.no_grad():
        for lin in (m.fc1, m.fc2):
            mask = torch.rand_like(lin.weight) < 0.1
            lin.weight.mul_(mask)
    sparse = save(m, tmp_path / "sparse.safetensors")
    _same_state(m, load(sparse))
    assert os.path.getsize(sparse) < 0.4 * os.path.getsize(dense)


def test_quantized_model_is_stored_compactly_and_exactly(tmp_path):
    m = models.build("nmnist_mlp", in_shape=(2, 16, 16), hidden=64)
    with torch.no_grad():  # 4-bit symmetric grid, one scale per row
        for lin in (m.fc1, m.fc2):
            w = lin.weight
            scale = w.abs().amax(1, keepdim=True) / 7
            lin.weight.copy_(torch.clamp(torch.round(w / scale), -7, 7) * scale)
    dense_bytes = sum(v.numel() * 4 for v in m.state_dict().values())
    p = save(m, tmp_path / "q.safetensors")
    _same_state(m, load(p))
    assert os.path.getsize(p) < 0.25 * dense_bytes


def test_compressed_by_osbc_round_trip(tmp_path):
    m = models.build("nmnist_mlp", in_shape=(2, 6, 6), hidden=16)
    calib = (torch.rand(32, 4, 2, 6, 6) < 0.3).float() * 2
    res = osbc.prune(m, calib, sparsity=0.8, method="osbc", verbose=False)
    p = save(res.model, tmp_path / "pruned.safetensors", data="digits", frames=4)
    m2 = load(p)
    _same_state(res.model, m2)
    assert float((m2.fc1.weight == 0).float().mean()) > 0.5


def test_no_temporary_files_left(tmp_path):
    m = models.build("nmnist_mlp", in_shape=(2, 4, 4), hidden=8)
    save(m, tmp_path / "m.safetensors")
    save(m, tmp_path / "m.safetensors")  # overwrite in place
    assert sorted(os.listdir(tmp_path)) == ["m.safetensors"]


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    m = models.build("nmnist_mlp", in_shape=(2, 4, 4), hidden=8)
    save(m, tmp_path / "m.safetensors")
    before = (tmp_path / "m.safetensors").read_bytes()
    import safetensors.torch

    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        save(models.build("nmnist_mlp", in_shape=(2, 4, 4), hidden=9), tmp_path / "m.safetensors")
    assert sorted(os.listdir(tmp_path)) == ["m.safetensors"]
    assert (tmp_path / "m.safetensors").read_bytes() == before


def test_load_into_given_model(tmp_path):
    m = models.build("nmnist_mlp", in_shape=(2, 4, 4), hidden=8)
    p = save(m, tmp_path / "m.safetensors")
    target = models.build("nmnist_mlp", in_shape=(2, 4, 4), hidden=8)
    out = load(p, model=target)
    assert out is target
    _same_state(m, target)


def test_errors(tmp_path):
    m = models.build("nmnist_mlp", in_shape=(2, 4, 4), hidden=8)
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        load(tmp_path / "missing.safetensors")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        save(m, tmp_path / "no" / "dir.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"this is not a safetensors file")
    with pytest.raises(ValueError, match="not a safetensors"):
        load(tmp_path / "junk.safetensors")
    save_file({"w": torch.zeros(2)}, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(ValueError, match="not an osbc checkpoint"):
        load(tmp_path / "foreign.safetensors")
    with pytest.raises(ValueError, match="directory"):
        load(tmp_path)
    p = save(m, tmp_path / "m.safetensors")
    with pytest.raises(ValueError, match="do not fit"):
        load(p, model=models.build("nmnist_mlp", in_shape=(2, 4, 4), hidden=9))
    with pytest.raises(ValueError, match="not built by osbc.models.build"):
        save(torch.nn.Linear(2, 2), tmp_path / "plain.safetensors")


def test_pickle_free(tmp_path):
    # the whole file is a safetensors header + raw tensor bytes: no pickle opcodes anywhere
    p = save(_conv(), tmp_path / "m.safetensors")
    raw = p.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    assert "__metadata__" in header
    assert b"\x80\x04" not in raw[:8 + n]
