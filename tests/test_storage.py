"""The compact format: exact round trips, layout choice, grid detection, files and size reports."""

import json
import os

import pytest
import torch
from torch import nn

from osbc import checkpoint, snn, storage
from osbc.griddetect import bits_of
from osbc.quant import fit_grid


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-identical, except that a zero's sign is not kept (-0.0 loads as +0.0)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    a = torch.where(a == 0, torch.zeros_like(a), a)
    return torch.equal(bits_of(a), bits_of(b))


def _roundtrip(w):
    parts, meta = storage.encode_tensor(w, "w")
    json.dumps(meta)
    out = storage.decode_tensor(parts, meta, "w")
    assert _same(w, out)
    stored = sum(t.numel() * t.element_size() for t in parts.values())
    return meta, stored


def _pruned(w, keep=0.03):
    return w * (torch.rand_like(w) < keep)


W = torch.randn(64, 300)


@pytest.mark.parametrize("case", ["dense", "pruned", "q4", "q8_layer_pow2", "q2_mse", "q4_pruned", "conv_q3",
                                  "zeros", "negzero_nan", "half", "double", "bf16_pruned", "one_row"])
def test_roundtrip_is_exact(case):
    w = {
        "dense": lambda: W.clone(),
        "pruned": lambda: _pruned(W),
        "q4": lambda: fit_grid(W, 4).quantize(W),
        "q8_layer_pow2": lambda: fit_grid(W, 8, per="layer", pow2=True).quantize(W),
        "q2_mse": lambda: fit_grid(W, 2, mse=True).quantize(W),
        "q4_pruned": lambda: _pruned(fit_grid(W, 4).quantize(W), 0.1),
        "conv_q3": lambda: fit_grid(torch.randn(16, 8 * 9), 3).quantize(torch.randn(16, 8 * 9)).reshape(16, 8, 3, 3),
        "zeros": lambda: torch.zeros(5, 7),
        "negzero_nan": lambda: torch.tensor([[-0.0, 1.5, float("nan")], [0.0, -0.0, float("inf")]]),
        "half": lambda: _pruned(W.half(), 0.2),
        "double": lambda: W.double(),
        "bf16_pruned": lambda: _pruned(W.bfloat16(), 0.2),
        "one_row": lambda: torch.randn(1, 10),
    }[case]()
    meta, stored = _roundtrip(w)
    assert stored == meta["bytes"]  # the size report counts exactly what is written
    assert meta["bytes"] <= w.numel() * w.element_size()


def test_layout_and_values_are_the_smallest():
    meta, _ = _roundtrip(W)
    assert (meta["layout"], meta["values"]) == ("dense", "float")
    meta, _ = _roundtrip(_pruned(W, 0.03))
    assert meta["layout"] == "csr" and meta["values"] == "float"  # few nonzeros: indices beat a bitmask
    meta, _ = _roundtrip(_pruned(W, 0.5))
    assert meta["layout"] == "bitmask"
    q = fit_grid(W, 4).quantize(W)
    meta, stored = _roundtrip(q)
    assert meta["values"] == "int" and meta["bits"] == 4 and meta["scale"] == "channel"
    # 4 bits per weight plus a float32 scale per row (zeros on the grid are code 0, so dense layout)
    assert stored <= W.numel() // 2 + 64 * 4 + (W.numel() + 7) // 8


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
def test_grid_bits_are_detected(bits):
    q = fit_grid(W, bits).quantize(W)
    meta, _ = _roundtrip(q)
    assert meta["values"] == "int" and meta["bits"] == bits


def test_per_layer_pow2_8bit_grid_is_one_scale():
    """Hardware grid: 8-bit weights, one power-of-two scale per layer (Loihi-style)."""
    g = fit_grid(W, 8, per="layer", pow2=True)
    q = g.quantize(W)
    meta, stored = _roundtrip(q)
    assert meta["values"] == "int" and meta["bits"] <= 8
    assert meta["scale"] == "layer" and meta["pow2"] is True
    assert stored <= W.numel() + 4  # one byte per weight and one scale


def test_values_off_the_grid_stay_float():
    q = fit_grid(W, 4).quantize(W)
    q[3, 5] = 0.123456  # one weight off its row's grid
    meta, _ = _roundtrip(q)
    assert meta["values"] == "float"


def test_csr_index_types_are_narrow():
    w = _pruned(torch.randn(4, 200), 0.02)
    parts, meta = storage.encode_tensor(w, "w")
    if meta["layout"] == "csr":
        assert parts["w::cols"].dtype == torch.uint8
    w = _pruned(torch.randn(4, 40000), 0.001)
    parts, meta = storage.encode_tensor(w, "w")
    assert meta["layout"] == "csr" and parts["w::cols"].dtype == torch.int32


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 8, 3, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.lif = snn.LIF(torch.linspace(2, 4, 8).reshape(8, 1, 1))
        self.plif = snn.PLIF(3.0)
        self.fc = nn.Linear(256, 64)
        self.emb = nn.Parameter(torch.randn(3, 3))  # a 2-D tensor that is not a layer weight

    def forward(self, x):
        return x


def _compressed_net():
    net = Net()
    with torch.no_grad():
        net.conv.weight.copy_(_pruned(net.conv.weight, 0.1))
        w = net.fc.weight
        net.fc.weight.copy_(fit_grid(w, 4).quantize(w))
        net.bn.running_mean.uniform_()
    return net


def test_state_dict_roundtrip_and_plain_entries():
    net = _compressed_net()
    sd = net.state_dict()
    tensors, meta = storage.encode_state_dict(sd, storage._compressible_keys(net))
    json.dumps(meta)
    assert meta["entries"]["emb"]["enc"] == "plain" and meta["entries"]["fc.bias"]["enc"] == "plain"
    assert meta["entries"]["fc.weight"]["values"] == "int"
    back = storage.decode_state_dict(tensors, meta)
    assert list(back) == list(sd)
    for k in sd:
        assert _same(sd[k], back[k]), k
    # default selection: every floating *.weight with >= 2 dims (what osbc.checkpoint uses)
    tensors, meta = storage.encode_state_dict(sd)
    assert meta["entries"]["conv.weight"]["enc"] == "sparse" and meta["entries"]["bn.weight"]["enc"] == "plain"
    assert all(_same(sd[k], v) for k, v in storage.decode_state_dict(tensors, meta).items())


def test_encode_rejects_non_tensors():
    with pytest.raises(TypeError, match="no pickles"):
        storage.encode_state_dict({"a": torch.zeros(2), "b": {"x": 1}})


def test_save_load_file(tmp_path):
    net = _compressed_net()
    path = tmp_path / "net.safetensors"
    checkpoint.save_compressed(net, path, metadata={"note": "97%", "acc": 0.9})
    assert [p.name for p in tmp_path.iterdir()] == ["net.safetensors"]  # no temporary left behind
    # a plain safetensors file: header JSON, no pickle opcodes anywhere
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        assert f.metadata()["format"] == storage.FORMAT
    loaded = checkpoint.load_compressed(path, Net)  # a builder
    for k, v in net.state_dict().items():
        assert _same(v, loaded.state_dict()[k]), k
    sd, meta = checkpoint.read_compressed(path)
    assert meta == {"note": "97%", "acc": 0.9}
    other = Net()
    assert checkpoint.load_compressed(path, other) is other
    assert os.path.getsize(path) < sum(v.numel() * v.element_size() for v in net.state_dict().values())


def test_read_rejects_other_files(tmp_path):
    from safetensors.torch import save_file

    p = tmp_path / "plain.safetensors"
    save_file({"a": torch.zeros(2)}, str(p))
    with pytest.raises(ValueError, match="not an osbc compact file"):
        checkpoint.read_compressed(p)


def test_size_report():
    net = _compressed_net()
    rep = storage.size_report(net)
    names = [r["name"] for r in rep["layers"]]
    assert names == ["conv", "fc"]  # Linear/Conv only
    conv, fc = rep["layers"]
    assert conv["dense_bytes"] == 8 * 2 * 9 * 4 and conv["sparsity"] > 0.5
    assert fc["values"] == "int" and fc["bits"] == 4
    assert rep["dense_bytes"] == rep["weight_dense_bytes"] + rep["other_bytes"]
    assert rep["compressed_bytes"] == rep["weight_compressed_bytes"] + rep["other_bytes"]
    assert rep["compressed_bytes"] < rep["dense_bytes"] and rep["ratio"] > 1
    text = storage.format_size_report(rep)
    assert "total" in text and "int4" in text


def test_quantized_model_per_layer_pow2_stores_compactly():
    """osbc.quantize with a hardware grid (8-bit, one power-of-two scale per layer) -> int8 codes."""
    import osbc

    from helpers import MLP  # noqa: E402 - tests/ is on sys.path under pytest

    torch.manual_seed(0)
    model = MLP(d_in=24, hidden=16, out=4)
    x = (torch.rand(16, 6, 24) < 0.3).float()
    res = osbc.quantize(model, x, bits=8, per="layer", pow2=True, method="rtn", verbose=False)
    rep = storage.size_report(res.model)
    for r in rep["layers"]:
        assert r["values"] == "int" and r["bits"] <= 8 and r["scale"] == "layer" and r["pow2"]
    assert rep["weight_compressed_bytes"] <= rep["weight_dense_bytes"] // 4 + 8
