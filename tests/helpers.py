"""Small SNNs and spike data shared by the tests."""

import torch
from torch import nn

from osbc import snn


class TB(nn.Module):
    """Apply a per-frame module to [T, B, ...] by folding time into the batch."""

    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, x):
        return self.m(x.flatten(0, 1)).unflatten(0, x.shape[:2])


class MLP(nn.Module):
    def __init__(self, d_in=64, hidden=32, out=10, tau=2.0, bias=False):
        super().__init__()
        self.flat = nn.Flatten(2)
        self.fc1 = nn.Linear(d_in, hidden, bias=bias)
        self.lif1 = snn.LIF(tau)
        self.fc2 = nn.Linear(hidden, out, bias=bias)
        self.lif2 = snn.LIF(tau)

    def forward(self, x):
        return self.lif2(self.fc2(self.lif1(self.fc1(self.flat(x)))))


class LoopMLP(MLP):
    """Same network, written snntorch-style: a Python loop over time calling single steps."""

    def forward(self, x):
        outs = []
        for t in range(x.shape[0]):
            h = self.lif1(self.fc1(self.flat(x[t:t + 1])[0]).unsqueeze(0))
            outs.append(self.lif2(self.fc2(h[0]).unsqueeze(0))[0])
        return torch.stack(outs)


class ConvNet(nn.Module):
    def __init__(self, c_in=2, ch=8, size=8, out=10):
        super().__init__()
        self.conv = TB(nn.Conv2d(c_in, ch, 3, padding=1, bias=False))
        self.bn = TB(nn.BatchNorm2d(ch))
        self.lif1 = snn.LIF(2.0)
        self.pool = TB(nn.AvgPool2d(2))
        self.flat = nn.Flatten(2)
        self.fc = nn.Linear(ch * (size // 2) ** 2, out, bias=False)
        self.lif2 = snn.LIF(2.0)
        self.readout = nn.Linear(out, 3)

    def forward(self, x):
        x = self.pool(self.lif1(self.bn(self.conv(x))))
        return self.readout(self.lif2(self.fc(self.flat(x))))


def spikes(n, T, *shape, rate=0.2, dead=0.25, seed=0):
    """Bernoulli spike trains [n, T, *shape] with a fraction of inputs that never fire."""
    g = torch.Generator().manual_seed(seed)
    p = torch.rand(*shape, generator=g) * 2 * rate
    p[torch.rand(*shape, generator=g) < dead] = 0
    return (torch.rand(n, T, *shape, generator=g) < p).float()


# ---- shared by the interop tests (tests/test_interop_*.py) ---------------------------------------

TT, D, C = 8, 40, 4  # frames, input features, classes of the toy task below


def prototype_data(n, seed):
    """A toy spiking classification task: ``[n, TT, D]`` Bernoulli spikes around one rate
    prototype per class (the prototypes are fixed, the samples drawn from ``seed``), and labels."""
    g = torch.Generator().manual_seed(seed)
    proto = torch.rand(C, D, generator=torch.Generator().manual_seed(99)) * 0.6
    y = torch.randint(0, C, (n,), generator=g)
    return (torch.rand(n, TT, D, generator=g) < proto[y][:, None]).float(), y


def train_briefly(net, n=192, epochs=5, after_step=None):
    """Fit ``net`` (``[T, B, D] -> [T, B, C]`` spikes) to :func:`prototype_data` with Adam and the
    MSE of the time-mean output to one-hot labels; ``after_step(net)`` runs after every step
    (e.g. a library's state reset). Returns the net in eval mode."""
    x, y = prototype_data(n, 1)
    opt = torch.optim.Adam(net.parameters(), 1e-2)
    for _ in range(epochs):
        for i in range(0, len(x), 32):
            out = net(x[i:i + 32].transpose(0, 1)).mean(0)
            loss = nn.functional.mse_loss(out, nn.functional.one_hot(y[i:i + 32], C).float())
            opt.zero_grad()
            loss.backward()
            opt.step()
            if after_step is not None:
                after_step(net)
    return net.eval()


def accuracy(net, x, y, after=None):
    """Accuracy of the time-mean output on ``[N, T, D]`` samples; ``after(net)`` runs afterwards."""
    with torch.no_grad():
        out = net(x.transpose(0, 1)).mean(0)
    if after is not None:
        after(net)
    return float((out.argmax(1) == y).float().mean())


def check_prune_and_quantize(trained, layers, after=None):
    """One-shot compression of a trained third-party model: 80% pruning keeps it accurate and
    beats OBC on the membrane error, 4-bit quantization stores int codes. ``layers(model)`` lists
    its two weight layers. Returns (the model's targets, the osbc pruning result, the quantized one)."""
    import osbc
    from osbc import storage

    x, y = prototype_data(64, 2)
    calib = x[:48]
    assert accuracy(trained, x, y, after) > 0.6
    targets = osbc.inspect(trained, calib)

    res = osbc.prune(trained, calib, sparsity=0.8, method="osbc", allocation="uniform", verbose=False)
    obc = osbc.prune(trained, calib, sparsity=0.8, method="obc", allocation="uniform", verbose=False)
    for lay in layers(res.model):
        assert abs(float((lay.weight == 0).float().mean()) - 0.8) <= 0.01
    assert accuracy(res.model, x, y, after) >= 0.5  # still runs in its own library
    e_osbc = [lay.membrane_error for lay in res.report.layers]
    e_obc = [lay.membrane_error for lay in obc.report.layers]
    assert sum(e_osbc) < sum(e_obc)
    assert e_osbc[0] < e_obc[0]

    q = osbc.quantize(trained, calib, bits=4, verbose=False)
    rep = storage.size_report(q.model)
    assert [r["values"] for r in rep["layers"]] == ["int", "int"] and all(r["bits"] <= 4 for r in rep["layers"])
    assert accuracy(q.model, x, y, after) >= 0.5
    return targets, res, q
