"""How many weights a layer gives up: a sparsity's count, or an N:M pattern's groups."""
from __future__ import annotations

import torch


def _nm_groups(d: int, nm, device):
    """(group of each input [d], number of groups G, removals per full group m - n, removals of
    the full pattern per row) for the N:M pattern on d inputs (keep n of every m consecutive)."""
    n, m = nm
    if not (isinstance(n, int) and isinstance(m, int) and 0 <= n < m):
        raise ValueError(f"nm must be (n, m) with 0 <= n < m, got {nm!r}")
    gid = torch.arange(d, device=device) // m
    G = (d + m - 1) // m
    size = torch.bincount(gid, minlength=G)
    cap = m - n
    return gid, G, cap, int(size.clamp(max=cap).sum())


def _budget(sparsity, R: int, d: int, nm) -> int:
    """Weights the layer [R, d] removes: round(sparsity * R * d), or (``sparsity=None`` with
    ``nm``) the full pattern."""
    if sparsity is None:
        if nm is None:
            raise ValueError("sparsity is required without nm")
        return R * _nm_groups(d, nm, "cpu")[3]
    if not 0 <= float(sparsity) <= 1:
        raise ValueError(f"sparsity must be in [0, 1], got {sparsity!r}")
    k = int(round(float(sparsity) * R * d))
    if nm is not None and k > R * _nm_groups(d, nm, "cpu")[3]:
        raise ValueError(f"sparsity {sparsity} exceeds what the {nm[0]}:{nm[1]} pattern allows")
    return k
