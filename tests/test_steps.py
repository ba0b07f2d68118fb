"""Models written the way the snntorch, spikingjelly and norse tutorials write them, compressed
unchanged: single-step models driven by a user loop (osbc finds the loop itself), models that
repeat a static frame over time, time-first DataLoaders, a cap on calibration samples. Hessians are
checked against brute-force ones built from the inputs each layer sees while the model runs in the
user's own loop; compressed models run in their own library afterwards."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

snn = pytest.importorskip("snntorch")
norse = pytest.importorskip("norse.torch")
sj = pytest.importorskip("spikingjelly.activation_based")

import osbc  # noqa: E402
from osbc.drive import batches  # noqa: E402
from osbc.errors import OsbcError  # noqa: E402
from osbc.hessian import HessianAccumulator  # noqa: E402
from osbc.trace import Recorder, find_modules  # noqa: E402
from snntorch import utils as snn_utils  # noqa: E402
from spikingjelly.activation_based import functional, layer, neuron  # noqa: E402

from helpers import spikes  # noqa: E402

T, N = 6, 12
f64 = torch.float64


# ---- the models, each with the loop its tutorial runs it with ------------------------------------

def scaled(net, *gains):
    """``net`` in eval mode, its layers 0 and 4 scaled so that the random weights make spikes."""
    with torch.no_grad():
        for i, g in zip((0, 4), gains):
            net[i].weight.mul_(g)
    return net.eval()


def snntorch_net():
    """snntorch tutorial style: single-step layers in nn.Sequential, hidden state in the neurons."""
    torch.manual_seed(0)
    return scaled(nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.MaxPool2d(2), snn.Leaky(beta=0.8, init_hidden=True),
                                nn.Flatten(), nn.Linear(6 * 4 * 4, 5),
                                snn.Leaky(beta=0.8, init_hidden=True, output=True)), 4, 3)


def snntorch_loop(net, x_tb):
    snn_utils.reset(net)
    spk_rec = []
    for t in range(x_tb.shape[0]):
        spk, mem = net(x_tb[t])
        spk_rec.append(spk)
    return torch.stack(spk_rec)


def norse_net():
    """norse tutorial style: SequentialState of *Cell modules, the state passed in and out."""
    torch.manual_seed(0)
    return scaled(norse.SequentialState(nn.Conv2d(1, 6, 3, padding=1), norse.LIFCell(), nn.MaxPool2d(2),
                                        nn.Flatten(), nn.Linear(6 * 4 * 4, 5), norse.LICell()), 40)


def norse_loop(net, x_tb):
    s, out = None, []
    for t in range(x_tb.shape[0]):
        o, s = net(x_tb[t], s)
        out.append(o)
    return torch.stack(out)


def spikingjelly_net():
    """spikingjelly in its default single-step mode (step_mode='s')."""
    torch.manual_seed(0)
    return scaled(nn.Sequential(layer.Conv2d(1, 6, 3, padding=1), neuron.LIFNode(tau=5.0), layer.MaxPool2d(2),
                                layer.Flatten(), layer.Linear(6 * 4 * 4, 5), neuron.LIFNode(tau=5.0)), 6, 4)


def spikingjelly_loop(net, x_tb):
    functional.reset_net(net)
    out = torch.stack([net(x_tb[t]) for t in range(x_tb.shape[0])])
    functional.reset_net(net)
    return out


SINGLE_STEP = {  # builder, the user's loop, the weight layers, osbc's driver
    "snntorch": (snntorch_net, snntorch_loop, ("0", "4"), "step"),
    "norse": (norse_net, norse_loop, ("0", "4"), "state"),
    "spikingjelly": (spikingjelly_net, spikingjelly_loop, ("0", "4"), "step"),
}


# ---- brute force --------------------------------------------------------------------------------

def recorded(net, layers, run):
    """What each of ``layers`` receives while ``run()`` runs the model the user's way."""
    seen = {id(m): [] for m in layers}
    hooks = [m.register_forward_pre_hook(lambda m, a: seen[id(m)].append(a[0].detach().clone())) for m in layers]
    try:
        with torch.no_grad():
            run()
    finally:
        for h in hooks:
            h.remove()
    return [seen[id(m)] for m in layers]


def brute(lay, x_tb, K):
    """H = 2 mean over (sample, position) of (K X)^T (K X), with X the layer's input rows."""
    steps = x_tb.shape[0]
    if isinstance(lay, nn.Conv2d):
        cols = F.unfold(x_tb.flatten(0, 1).double(), lay.kernel_size, padding=lay.padding, stride=lay.stride)
        P = cols.transpose(1, 2).reshape(steps, -1, cols.shape[1])
    else:
        P = x_tb.double().reshape(steps, -1, x_tb.shape[-1])
    M = torch.einsum("ts,snd->tnd", K, P).reshape(-1, P.shape[-1])
    return 2 * M.t() @ M / P.shape[1]


def osbc_hessians(net, xs, step_fn=None):
    """osbc's targets and Hessians of ``net`` on time-major batches ``xs``."""
    targets = find_modules(net, xs[0][:, :2], step_fn=step_fn)
    accs = {t.name: HessianAccumulator(t, t.kernel, "cpu") for t in targets}
    with Recorder(targets, lambda t, x: accs[t.name].add(x)) as rec:
        for x in xs:
            rec.run(net, x)
    return targets, {n: a.hessians()[0][1] for n, a in accs.items()}


def check_hessians(targets, hs, inputs, steps):
    for t, xs in zip(targets, inputs):
        x_tb = torch.stack(xs) if len(xs) > 1 else xs[0]
        assert x_tb.shape[0] == steps and x_tb.abs().sum() > 0
        assert torch.allclose(hs[t.name], brute(t.layer, x_tb, t.kernel.toeplitz(steps)), rtol=1e-5, atol=1e-8)


# ---- 1. single-step models, the time loop outside ------------------------------------------------

@pytest.mark.parametrize("lib", sorted(SINGLE_STEP))
def test_single_step_models_are_driven_step_by_step(lib):
    build, loop, names, kind = SINGLE_STEP[lib]
    net = build()
    calib = spikes(N, T, 1, 8, 8, rate=0.4)
    targets, hs = osbc_hessians(net, list(batches(calib, 5)))
    assert [(t.name, t.mode, t.driver.kind) for t in targets] == [(n, "loop", kind) for n in names]
    assert [t.kind for t in targets] == ["Conv2d", "Linear"]
    assert all(not t.kernel.is_identity for t in targets)
    x_tb = calib.transpose(0, 1)
    check_hessians(targets, hs, recorded(net, [t.layer for t in targets], lambda: loop(net, x_tb)), T)
    one = find_modules(net, x_tb[:1, :2])  # a single frame is one step, not a batch without time
    assert [(t.mode, t.driver.kind) for t in one] == [("loop", kind)] * 2


def test_single_step_kernels_are_the_libraries_neurons():
    n = torch.arange(T, dtype=f64)
    t_snn, _ = find_modules(snntorch_net(), spikes(2, T, 1, 8, 8).transpose(0, 1))
    assert torch.allclose(t_snn.kernel.impulse(T).reshape(-1), 0.8 ** n)
    t_sj, _ = find_modules(spikingjelly_net(), spikes(2, T, 1, 8, 8).transpose(0, 1))
    assert torch.allclose(t_sj.kernel.impulse(T).reshape(-1), 0.2 * 0.8 ** n)


def test_spikingjelly_linear_single_step_model_is_not_fed_the_sequence_as_one_step():
    """Linear layers and single-step neurons accept [T, B, F] as one big step, silently: osbc must
    see the neurons took the whole sequence and drive the model step by step."""
    torch.manual_seed(0)
    net = nn.Sequential(layer.Linear(20, 10), neuron.IFNode(), layer.Linear(10, 4), neuron.IFNode()).eval()
    calib = spikes(N, T, 20, rate=0.4)
    targets, hs = osbc_hessians(net, list(batches(calib, 4)))
    assert [(t.mode, t.driver.kind) for t in targets] == [("loop", "step")] * 2
    x_tb = calib.transpose(0, 1)
    check_hessians(targets, hs, recorded(net, [net[0], net[2]], lambda: spikingjelly_loop(net, x_tb)), T)


@pytest.mark.parametrize("lib", sorted(SINGLE_STEP))
def test_single_step_models_prune_unchanged_and_run_in_their_library(lib):
    build, loop, names, _ = SINGLE_STEP[lib]
    net = build()
    calib = spikes(24, T, 1, 8, 8, rate=0.4, seed=1)
    kw = dict(sparsity=0.6, allocation="uniform", verbose=False, device="cpu")
    res = osbc.prune(net, calib, method="osbc", **kw)
    obc = osbc.prune(net, calib, method="obc", **kw)
    e_osbc = [lay.membrane_error for lay in res.report.layers]
    e_obc = [lay.membrane_error for lay in obc.report.layers]
    assert sum(e_osbc) < sum(e_obc)
    with torch.no_grad():
        out = loop(res.model, calib.transpose(0, 1))
    assert out.shape[:2] == (T, 24) and torch.isfinite(out).all()
    for name in names:
        w = res.model.get_submodule(name).weight
        assert abs(float((w == 0).float().mean()) - 0.6) <= 0.02


def test_user_step_fn_drives_what_osbc_cannot_guess():
    """snntorch without init_hidden, the state passed as extra arguments: osbc cannot guess them;
    the error says to pass step_fn, and with it the model compresses."""

    class Explicit(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.lif1 = nn.Linear(20, 10), snn.Leaky(beta=0.7)
            self.fc2, self.lif2 = nn.Linear(10, 4), snn.Leaky(beta=0.7)

        def forward(self, x, mem1, mem2):
            spk1, mem1 = self.lif1(self.fc1(x), mem1)
            spk2, mem2 = self.lif2(self.fc2(spk1), mem2)
            return spk2, mem1, mem2

    torch.manual_seed(0)
    net = Explicit().eval()
    with torch.no_grad():
        net.fc1.weight.mul_(3)
    calib = spikes(N, T, 20, rate=0.4)
    with pytest.raises(OsbcError, match="pass step_fn=") as err:
        find_modules(net, calib[:2].transpose(0, 1))
    assert "\n" not in str(err.value)

    def step_fn(model, x_t, state):
        mems = state if state is not None else (model.lif1.init_leaky(), model.lif2.init_leaky())
        spk, m1, m2 = model(x_t, *mems)
        return spk, (m1, m2)

    targets, hs = osbc_hessians(net, list(batches(calib, 5)), step_fn=step_fn)
    assert [(t.name, t.mode, t.driver.kind) for t in targets] == [("fc1", "loop", "user"), ("fc2", "loop", "user")]

    def loop():
        m1, m2 = net.lif1.init_leaky(), net.lif2.init_leaky()
        for t in range(T):
            _, m1, m2 = net(calib[:, t], m1, m2)

    check_hessians(targets, hs, recorded(net, [net.fc1, net.fc2], loop), T)


# ---- 2. static input repeated over time inside forward -------------------------------------------

class Tutorial5(nn.Module):
    """snntorch tutorial 5: a static image [B, 64] fed at every one of ``num_steps`` steps."""

    def __init__(self, num_steps):
        super().__init__()
        self.num_steps = num_steps
        self.fc1, self.lif1 = nn.Linear(64, 16), snn.Leaky(beta=0.9)
        self.fc2, self.lif2 = nn.Linear(16, 5), snn.Leaky(beta=0.9)

    def forward(self, x):
        mem1, mem2 = self.lif1.init_leaky(), self.lif2.init_leaky()
        spk2_rec, mem2_rec = [], []
        for _ in range(self.num_steps):
            spk1, mem1 = self.lif1(self.fc1(x), mem1)
            spk2, mem2 = self.lif2(self.fc2(spk1), mem2)
            spk2_rec.append(spk2)
            mem2_rec.append(mem2)
        return torch.stack(spk2_rec), torch.stack(mem2_rec)


class CSNN(nn.Module):
    """spikingjelly's conv_fashion_mnist CSNN: multi-step layers after ``x.unsqueeze(0).repeat(T, ...)``."""

    def __init__(self, T):
        super().__init__()
        self.T = T
        self.conv_fc = nn.Sequential(
            layer.Conv2d(1, 6, 3, padding=1, bias=False), layer.BatchNorm2d(6), neuron.IFNode(),
            layer.MaxPool2d(2), layer.Flatten(), layer.Linear(6 * 4 * 4, 5, bias=False), neuron.IFNode())
        functional.set_step_mode(self, step_mode="m")

    def forward(self, x):
        x_seq = x.unsqueeze(0).repeat(self.T, 1, 1, 1, 1)
        return self.conv_fc(x_seq).mean(0)


STATIC = {  # builder, frame shape, weight layers, their layout
    "snntorch": (lambda: Tutorial5(T), (64,), ("fc1", "fc2"), "loop"),
    "spikingjelly": (lambda: CSNN(T), (1, 8, 8), ("conv_fc.0", "conv_fc.5"), "tb"),
}


@pytest.mark.parametrize("lib", sorted(STATIC))
def test_static_input_models_are_called_on_the_frame(lib):
    build, shape, names, mode = STATIC[lib]
    torch.manual_seed(0)
    net = build().eval()
    with torch.no_grad():
        for name in names:
            net.get_submodule(name).weight.mul_(3)
    frames = torch.rand(N, *shape, generator=torch.Generator().manual_seed(0))
    xs = list(batches(frames, 5, time_steps=T))
    assert [x.shape[:2] for x in xs] == [(T, 5), (T, 5), (T, 2)]
    targets, hs = osbc_hessians(net, xs)
    assert [(t.name, t.mode, t.driver.kind) for t in targets] == [(n, mode, "static") for n in names]
    lays = [net.get_submodule(n) for n in names]
    check_hessians(targets, hs, recorded(net, lays, lambda: (functional.reset_net(net), net(frames))), T)
    # a wrong repeat count is named, and no time_steps says what to pass
    with pytest.raises(OsbcError, match=f"pass time_steps={T}"):
        find_modules(net, next(batches(frames[:2], time_steps=T + 2)))
    if len(shape) > 1:
        with pytest.raises(OsbcError, match="time_steps=T"):
            find_modules(net, next(batches(frames[:2])))


def test_static_frames_repeated_for_a_multi_step_model():
    """time_steps also serves models that take [T, B, ...]: the repeated frames are a sequence."""
    from helpers import ConvNet

    net = ConvNet(c_in=1).eval()
    frames = torch.rand(N, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    xs = list(batches(frames, 5, time_steps=T))
    assert all(torch.equal(x, frames[i * 5:(i + 1) * 5].expand(T, *x.shape[1:])) for i, x in enumerate(xs))
    targets = find_modules(net, xs[0][:, :2])
    assert [(t.name, t.driver.kind) for t in targets] == [(n, "sequence") for n in ("conv.m", "fc", "readout")]


def test_static_model_prunes_and_runs_in_spikingjelly():
    torch.manual_seed(0)
    net = CSNN(T).eval()
    with torch.no_grad():
        net.conv_fc[0].weight.mul_(3)
        net.conv_fc[5].weight.mul_(3)
    frames = torch.rand(24, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    kw = dict(sparsity=0.5, allocation="uniform", verbose=False, device="cpu")
    # compress.py does not take time_steps yet: give it the repeated batches directly
    calib = [x.transpose(0, 1) for x in batches(frames, 8, time_steps=T)]
    res = osbc.prune(net, calib, method="osbc", **kw)
    obc = osbc.prune(net, calib, method="obc", **kw)
    assert sum(r.membrane_error for r in res.report.layers) < sum(r.membrane_error for r in obc.report.layers)
    functional.reset_net(res.model)
    with torch.no_grad():
        assert res.model(frames).shape == (24, 5)


# ---- 3. time-first DataLoaders, 5. a cap on samples ----------------------------------------------

class Recordings(torch.utils.data.Dataset):
    """Event recordings of different lengths, as tonic gives them: ([T_i, F], label)."""

    def __init__(self, n):
        g = torch.Generator().manual_seed(0)
        self.items = [((torch.rand(T - i % 3, 10, generator=g) < 0.3).float(), i % 4) for i in range(n)]
        self.drawn = 0

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        self.drawn += 1
        return self.items[i]


def test_time_first_loader_is_detected_or_read_as_told():
    from tonic.collation import PadTensors

    data = Recordings(20)
    loader = torch.utils.data.DataLoader(data, batch_size=8, collate_fn=PadTensors(batch_first=False))
    with pytest.raises(OsbcError, match="time_first=True"):
        list(batches(loader))
    xs = list(batches(loader, time_first=True))
    assert [x.shape[1] for x in xs] == [8, 8, 4]
    assert all(x.shape[0] == T for x in xs)
    # the same samples as a batch-first loader gives
    ref = list(batches(torch.utils.data.DataLoader(data, batch_size=8, collate_fn=PadTensors(batch_first=True))))
    assert all(torch.equal(a, b) for a, b in zip(xs, ref))
    # a time-first tensor [T, N, ...] reads as the batch-first one
    x = spikes(N, T, 3)
    assert all(torch.equal(a, b) for a, b in zip(batches(x.transpose(0, 1), 5, time_first=True), batches(x, 5)))
    # time_first=False: the user says so, nothing is checked
    assert [x.shape[1] for x in batches(loader, time_first=False)] == [T] * 3


def test_max_samples_stops_consuming_the_loader():
    data = Recordings(40)
    loader = torch.utils.data.DataLoader(data, batch_size=8, collate_fn=lambda b: (
        torch.stack([torch.cat([x, torch.zeros(T - len(x), 10)]) for x, _ in b]), torch.tensor([y for _, y in b])))
    xs = list(batches(loader, max_samples=13))
    assert [x.shape[1] for x in xs] == [8, 5]
    assert data.drawn == 16  # two batches drawn, not five
    assert sum(x.shape[1] for x in batches(torch.zeros(30, T, 3), 7, max_samples=100)) == 30
    for bad in (dict(max_samples=0), dict(time_steps=-1), dict(time_first="yes"), dict(time_steps=3, time_first=True)):
        with pytest.raises(OsbcError):
            next(batches(torch.zeros(4, T, 3), **bad))


@pytest.mark.parametrize("lib", sorted(SINGLE_STEP))
def test_evaluate_drives_single_step_models_like_their_loop(lib):
    build, loop, _, _ = SINGLE_STEP[lib]
    net = build()
    x = spikes(N, T, 1, 8, 8, rate=0.4, seed=3)              # [N, T, 1, 8, 8]
    y = torch.arange(N) % 5
    with torch.no_grad():
        rates = loop(net, x.transpose(0, 1)).float().mean(0)   # the user's own loop
    ev = osbc.evaluate(net, (x, y), batch_size=5, stats=False)
    assert ev.samples == N
    assert ev.accuracy == pytest.approx(float((rates.argmax(-1) == y).float().mean()))
