"""Streaming membrane-potential Hessians: H = 2 E[(K X)^T (K X)].

Rows of a layer whose neurons share a kernel share one Hessian; per-neuron time constants give
one Hessian per distinct kernel (clustered when there are too many to hold). Inputs arrive batch
by batch (see :class:`osbc.trace.Recorder`); conv inputs are unfolded a few samples at a time
so memory stays bounded. Products run in float32 and accumulate in float64.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .trace import Target
from .kernels import Kernel

__all__ = ["HessianAccumulator", "kernel_groups"]


def kernel_groups(kernel: Kernel, rows: int, max_groups: int = 16, seed: int = 0,
                  T: int = 32) -> tuple[list[tuple[Tensor, Kernel]], bool]:
    """Row groups that share a kernel, and whether they had to be clustered.

    Each distinct kernel needs a ``d x d`` Hessian; with more than ``max_groups`` of them (learned
    per-neuron decays) rows are k-means clustered on their impulse responses and each cluster uses
    its most central member's kernel - an approximation reported as such."""
    groups = kernel.groups(rows)
    if len(groups) <= max_groups:
        return groups, False
    h = kernel.impulse(T).reshape(rows, T)
    g = torch.Generator().manual_seed(seed)
    centers = h[torch.randperm(rows, generator=g)[:max_groups]].clone()
    for _ in range(50):
        assign = torch.cdist(h, centers).argmin(1)
        new = torch.stack([h[assign == c].mean(0) if (assign == c).any() else centers[c] for c in range(max_groups)])
        if torch.allclose(new, centers):
            break
        centers = new
    out = []
    S = kernel.states
    for c in range(max_groups):
        rows_c = torch.nonzero(assign == c).reshape(-1)
        if rows_c.numel() == 0:
            continue
        r = rows_c[torch.cdist(h[rows_c], centers[c:c + 1]).argmin()]
        out.append((rows_c, Kernel(kernel.A.reshape(-1, S, S)[r], kernel.B.reshape(-1, S)[r],
                                   kernel.C.reshape(-1, S)[r], kernel.name, kernel.params)))
    return out, True


class HessianAccumulator:
    """Accumulates one Hessian per kernel group of a target's rows."""

    def __init__(self, target: Target, kernel: Kernel, device: torch.device | str,
                 max_chunk_bytes: int = 256 << 20, max_groups: int = 16, seed: int = 0):
        self.target = target
        self.groups, self.clustered = kernel_groups(kernel, target.rows, max_groups, seed)
        d = target.cols
        self.H = [torch.zeros(d, d, dtype=torch.float64, device=device) for _ in self.groups]
        self.count = 0
        self.max_chunk_bytes = max_chunk_bytes

    def add(self, x_tb: Tensor) -> None:
        """Add a time-major batch ``[T, B, ...]`` of the layer's inputs."""
        t = self.target
        T, B = x_tb.shape[:2]
        per_sample = t.samples_per_item(x_tb) * t.cols * T * 4
        step = max(1, self.max_chunk_bytes // max(per_sample, 1))
        for b0 in range(0, B, step):
            P = t.patches(x_tb[:, b0:b0 + step].float())  # [T, samples, d]
            self.count += P.shape[1]
            for (_, kern), H in zip(self.groups, self.H):
                KP = P if kern.is_identity else kern.apply(P)
                M = KP.reshape(-1, P.shape[-1])
                H += M.t() @ M     # float32 GEMM, added into float64 (no float64 temporary)

    def hessians(self, release: bool = False) -> list[tuple[Tensor, Tensor]]:
        """``(rows, H)`` per group, H = 2 E[(KX)^T (KX)] over the samples seen. ``release=True``
        scales the accumulators in place and hands them over (one d x d float64 copy fewer while the
        layer is solved); the accumulator is spent after that."""
        if self.H is None:
            raise RuntimeError(f"{self.target.name}: this accumulator's Hessians were already released")
        if self.count == 0:
            raise ValueError(f"{self.target.name}: no calibration inputs reached this layer")
        if not release:
            return [(rows, H * (2.0 / self.count)) for (rows, _), H in zip(self.groups, self.H)]
        out = [(rows, H.mul_(2.0 / self.count)) for (rows, _), H in zip(self.groups, self.H)]
        self.H = None
        return out
