"""Models built by a user's function ("package.module:function"): osbc.save records the builder,
osbc.load rebuilds with it only when trusted, and the CLI builds such models with --builder or
--trust-builder. The models are the real libraries' (spikingjelly, snntorch)."""

import json
import sys
import textwrap

import pytest
import torch

import osbc
from osbc import cli, models
from osbc.checkpoint import load, read_meta, save, save_compressed
from osbc.errors import OsbcError

pytest.importorskip("spikingjelly")
pytest.importorskip("snntorch")

T = 4
SHAPE = (2, 17, 17)  # digits with --downsample 2
MOD = "osbc_user_nets"

NETS = textwrap.dedent('''
    """A user's own networks, as the libraries' tutorials write them."""
    import torch
    from torch import nn


    def sj_mlp(d_in=578, hidden=24, classes=10, tau=2.0):
        from spikingjelly.activation_based import functional, layer, neuron

        net = nn.Sequential(layer.Flatten(start_dim=1), layer.Linear(d_in, hidden, bias=False),
                            neuron.LIFNode(tau=tau), layer.Linear(hidden, classes, bias=False),
                            neuron.LIFNode(tau=tau))
        functional.set_step_mode(net, "m")
        return net


    class SnnTorchMLP(nn.Module):
        def __init__(self, d_in, hidden, classes, beta):
            super().__init__()
            import snntorch as snn

            self.fc1, self.lif1 = nn.Linear(d_in, hidden), snn.Leaky(beta=beta)
            self.fc2, self.lif2 = nn.Linear(hidden, classes), snn.Leaky(beta=beta)

        def forward(self, x):  # [T, B, ...] -> [T, B, classes]
            m1, m2 = self.lif1.init_leaky(), self.lif2.init_leaky()
            out = []
            for xt in x.flatten(2):
                s1, m1 = self.lif1(self.fc1(xt), m1)
                s2, m2 = self.lif2(self.fc2(s1), m2)
                out.append(s2)
            return torch.stack(out)


    def snntorch_mlp(d_in=578, hidden=24, classes=10, beta=0.8):
        return SnnTorchMLP(d_in, hidden, classes, beta)


    def not_a_model():
        return 42
''')


@pytest.fixture
def nets(tmp_path, monkeypatch):
    """The user's module, importable as MOD (a fresh import in each test)."""
    (tmp_path / f"{MOD}.py").write_text(NETS)
    (tmp_path / "broken_nets.py").write_text("import a_module_that_is_not_installed\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, MOD, raising=False)
    return tmp_path


def reset(net):
    from spikingjelly.activation_based import functional

    functional.reset_net(net)  # the snntorch model starts from zero itself (init_leaky)


def sample(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(T, n, *SHAPE, generator=g) < 0.3).float()


def pruned(builder, kwargs):
    model = models.build_with(f"{MOD}:{builder}", kwargs)
    calib = (torch.rand(64, T, *SHAPE, generator=torch.Generator().manual_seed(1)) < 0.3).float()
    return osbc.prune(model, calib, sparsity=0.5, solver="exact", verbose=False).model


@pytest.mark.parametrize("builder,kwargs", [("sj_mlp", {"hidden": 20}), ("snntorch_mlp", {"hidden": 20, "beta": 0.7})])
def test_save_load_with_trust_is_exact(nets, tmp_path, builder, kwargs):
    model = pruned(builder, kwargs)
    path = save(model, tmp_path / "net.safetensors", frames=T, in_shape=SHAPE)  # builder from osbc_config
    meta = read_meta(path)
    assert meta["builder"] == f"{MOD}:{builder}" and meta["arch"] is None
    assert meta["kwargs"] == kwargs and meta["in_shape"] == list(SHAPE) and meta["frames"] == T
    back = load(path, trust_builder=True)
    assert type(back) is type(model) and back.osbc_config["builder"] == f"{MOD}:{builder}"
    a, b = model.state_dict(), back.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert float((a[next(k for k in a if k.endswith("weight"))] == 0).float().mean()) >= 0.4  # pruned
    x = sample()
    model.eval()
    with torch.no_grad():
        reset(model)
        ya = model(x)
        reset(back)
        yb = back(x)
    assert torch.equal(ya, yb) and ya.shape == (T, 8, 10)


def test_explicit_builder_argument_and_load_without_trust(nets, tmp_path):
    model = torch.nn.Sequential(torch.nn.Flatten(2), torch.nn.Linear(578, 10))  # no osbc_config
    with pytest.raises(OsbcError, match="builder='package.module:function'"):
        save(model, tmp_path / "x.safetensors")
    real = pruned("sj_mlp", {"hidden": 12})
    path = save(real, tmp_path / "sj.safetensors", builder=f"{MOD}:sj_mlp", builder_kwargs={"hidden": 12})
    with pytest.raises(OsbcError) as e:
        load(path)
    msg = str(e.value)
    assert f"{MOD}:sj_mlp" in msg and "trust_builder=True" in msg and "--trust-builder" in msg and "\n" not in msg
    # naming the builder yourself is trusting it; its kwargs default to the file's
    back = load(path, builder=f"{MOD}:sj_mlp")
    assert torch.equal(back[1].weight, real[1].weight)
    # into a model you built: no builder is run
    mine = models.build_with(f"{MOD}:sj_mlp", {"hidden": 12})
    assert load(path, model=mine) is mine and torch.equal(mine[1].weight, real[1].weight)


def test_builder_on_state_only_files(nets, tmp_path):
    from safetensors.torch import save_file

    real = pruned("snntorch_mlp", {"hidden": 16})
    compact = save_compressed(real, tmp_path / "c.safetensors")
    plain = tmp_path / "p.safetensors"
    save_file({k: v.contiguous() for k, v in real.state_dict().items()}, str(plain), metadata={"format": "pt"})
    for path in (compact, plain):
        with pytest.raises(OsbcError, match="not an osbc checkpoint"):
            load(path)
        back = load(path, builder=f"{MOD}:snntorch_mlp", builder_kwargs={"hidden": 16})
        assert all(torch.equal(v, back.state_dict()[k]) for k, v in real.state_dict().items())
        assert back.osbc_config["builder"] == f"{MOD}:snntorch_mlp" and back.osbc_config["kwargs"] == {"hidden": 16}


@pytest.mark.parametrize("spec,match", [
    ("no_colon", "not of the form package.module:function"),
    ("a-b:make", "not of the form"),
    ("pkg.:make", "not of the form"),
    ("pkg:", "not of the form"),
    ("pkg:make;import os", "not of the form"),
    ("a_module_nobody_has:make", "cannot import a_module_nobody_has"),
    ("broken_nets:make", "cannot import broken_nets (ModuleNotFoundError"),
    (f"{MOD}:no_such_function", f"module {MOD} has no function no_such_function"),
    (f"{MOD}:not_a_model", "not a torch.nn.Module"),
])
def test_bad_builders_are_one_line_errors(nets, spec, match):
    with pytest.raises(OsbcError, match=match.replace("(", r"\(")) as e:
        models.build_with(spec, {})
    assert "\n" not in str(e.value) and (spec in str(e.value) or repr(spec) in str(e.value))


def test_wrong_shapes_and_arguments(nets, tmp_path):
    path = save(pruned("sj_mlp", {"hidden": 12}), tmp_path / "n.safetensors")
    with pytest.raises(OsbcError, match=r"do not fit the model: 1.weight is float32\[12, 578\] in the file, "
                                        r"float32\[13, 578\] in the model"):
        load(path, builder=f"{MOD}:sj_mlp", builder_kwargs={"hidden": 13})
    with pytest.raises(OsbcError, match="cannot rebuild model .*unexpected keyword argument 'width'"):
        load(path, builder=f"{MOD}:sj_mlp", builder_kwargs={"width": 3})
    with pytest.raises(OsbcError, match="in_shape: .* is not a frame shape"):
        save(pruned("sj_mlp", {"hidden": 12}), tmp_path / "m.safetensors", in_shape=(0, 3))
    with pytest.raises(OsbcError, match="builder 'x y:z' is not of the form"):
        save(pruned("sj_mlp", {"hidden": 12}), tmp_path / "m.safetensors", builder="x y:z")


def test_damaged_builder_metadata(nets, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = save(pruned("sj_mlp", {"hidden": 12}), tmp_path / "n.safetensors", in_shape=SHAPE)
    with safe_open(str(path), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    for field, value, match in [("builder", "os:system; rm", "damaged osbc metadata: builder"),
                                ("in_shape", "[2, -1]", "damaged osbc metadata: in_shape"),
                                ("in_shape", json.dumps([1 << 13] * 3), "not a frame shape")]:
        save_file(tensors, str(tmp_path / "bad.safetensors"), metadata=dict(meta, **{field: value}))
        with pytest.raises(OsbcError, match=match):
            load(tmp_path / "bad.safetensors", trust_builder=True)


# ---- the command line -----------------------------------------------------------------------------

def inproc(capsys, *argv):
    try:
        code = cli.main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    cap = capsys.readouterr()
    return code, cap.out, cap.err


@pytest.fixture
def digits(tmp_path_factory, monkeypatch):
    from osbc.data import load_dataset

    monkeypatch.setattr(sys, "path", list(sys.path))  # the CLI adds the current folder to it
    cache = tmp_path_factory.getbasetemp() / "builder-cache"
    monkeypatch.setenv("OSBC_CACHE", str(cache))
    root = cache / "digits"
    if not root.exists():
        load_dataset("digits", root=root, train=True, frames=T, cache=False)
    return ["--data", "digits", "--root", root, "--frames", T, "--downsample", 2, "--device", "cpu"]


def test_cli_on_a_builder_checkpoint(nets, tmp_path, digits, capsys):
    path = save(pruned("sj_mlp", {"hidden": 16}), tmp_path / "sj.safetensors", data="digits", frames=T,
                in_shape=SHAPE, info={"downsample": 2})
    code, out, err = inproc(capsys, "info", "--model", path)
    assert code == 1 and err.count("\n") == 1 and "--trust-builder" in err and f"{MOD}:sj_mlp" in err
    code, out, err = inproc(capsys, "info", "--model", path, "--trust-builder")
    assert code == 0, err
    assert f"model {MOD}:sj_mlp" in out and "2 compressible modules" in out
    code, out, err = inproc(capsys, "eval", "--model", path, "--trust-builder", *digits, "--max-samples", 40)
    assert code == 0, err
    assert "accuracy" in out
    pruned_out = tmp_path / "sj-90.safetensors"
    code, out, err = inproc(capsys, "prune", "--model", path, "--builder", f"{MOD}:sj_mlp", "--builder-arg",
                            "hidden=16", "-s", 0.9, *digits, "--calib-samples", 32, "--no-eval", "-o", pruned_out)
    assert code == 0, err
    meta = read_meta(pruned_out)
    assert meta["builder"] == f"{MOD}:sj_mlp" and meta["kwargs"] == {"hidden": 16} and meta["in_shape"] == list(SHAPE)
    back = load(pruned_out, trust_builder=True)
    assert back[1].weight.shape == (16, 578) and float((back[1].weight == 0).float().mean()) > 0.8


def test_cli_builder_on_a_plain_state_dict(nets, tmp_path, digits, capsys):
    from safetensors.torch import save_file

    real = pruned("snntorch_mlp", {"hidden": 16})
    plain = tmp_path / "plain.safetensors"
    save_file({k: v.contiguous() for k, v in real.state_dict().items()}, str(plain))
    spec = ["--builder", f"{MOD}:snntorch_mlp", "--builder-arg", "hidden=16"]
    code, out, err = inproc(capsys, "info", "--model", plain, *spec)
    assert code == 1 and err.count("\n") == 1 and "--in-shape" in err
    code, out, err = inproc(capsys, "info", "--model", plain, *spec, "--in-shape", "2,17,17", "--frames", T)
    assert code == 0, err
    assert "2 compressible modules" in out
    code, out, err = inproc(capsys, "eval", "--model", plain, *spec, *digits, "--max-samples", 40)
    assert code == 0, err
    # wrong --in-shape for the data, wrong sizes, a bad spec: one line each
    for extra, match in [(["--in-shape", "2,34,34"], "expects input (2, 34, 34) per frame"),
                         (["--builder-arg", "hidden=17"], "do not fit the model"),
                         (["--builder", "nope"], "not of the form package.module:function")]:
        code, out, err = inproc(capsys, "eval", "--model", plain, *spec, *extra, *digits, "--max-samples", 8)
        assert code == 1 and err.count("\n") == 1 and match in err, err
    code, out, err = inproc(capsys, "eval", "--model", plain, "--builder-arg", "hidden=16", *digits)
    assert code == 1 and "--builder-arg needs --builder" in err


def test_cli_finds_the_builder_in_the_current_folder(nets, tmp_path, digits, capsys, monkeypatch):
    real = pruned("sj_mlp", {"hidden": 8})
    path = save_compressed(real, tmp_path / "w.safetensors")
    here = tmp_path / "project"
    here.mkdir()
    (here / "cwd_nets.py").write_text(NETS)  # importable only from the current folder
    monkeypatch.chdir(here)
    spec = ["--builder", "cwd_nets:sj_mlp", "--builder-arg", "hidden=8", "--in-shape", "2,17,17"]
    code, out, err = inproc(capsys, "info", "--model", path, *spec, "--frames", T)
    assert code == 0, err
    assert "model cwd_nets:sj_mlp" in out and "2 compressible modules" in out


def test_cli_export_nir_of_a_builder_checkpoint(nets, tmp_path, digits, capsys):
    pytest.importorskip("nir")
    path = save(pruned("sj_mlp", {"hidden": 8}), tmp_path / "sj.safetensors", in_shape=SHAPE)
    code, out, err = inproc(capsys, "export-nir", "--model", path, "--trust-builder", "-o", tmp_path / "sj.nir")
    assert code == 0, err
    assert "LIF" in out and (tmp_path / "sj.nir").exists()
    code, out, err = inproc(capsys, "info", "--arch", "nmnist_mlp", "--builder", f"{MOD}:sj_mlp")
    assert code == 1 and err.count("\n") == 1 and "with --arch use --arch-arg" in err
