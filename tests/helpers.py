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
