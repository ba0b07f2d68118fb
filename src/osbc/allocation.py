"""How a network-wide sparsity is shared among layers.

* ``uniform``: every layer gets the same sparsity.
* ``lamp``: LAMP scores (Lee et al. 2021) with power p, ranked across the network: the score of a
  weight is |w|^p divided by the sum of |w'|^p over the weights of its layer at least as large.
  p = 2 is the paper's default, p = 3 for deep nets.
* ``global``: from the OBS losses themselves. Each layer's greedy step losses (non-decreasing per
  row) are divided by that layer's total membrane energy sum_r w_r^T H_r w_r, making them relative
  errors that compare across layers; the network's k smallest are removed. Because each row's
  losses are non-decreasing, the selection is a prefix of every row's greedy path.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .errors import OsbcError

__all__ = ["uniform", "lamp", "layer_energy", "global_counts"]

def uniform(sizes: list[int], sparsity: float) -> list[float]:
    return [sparsity] * len(sizes)


def _kth_smallest_threshold(scores: Tensor, k: int) -> tuple[Tensor, int]:
    """Value v and how many ties to take at v so that exactly k entries are selected."""
    v = torch.kthvalue(scores, k).values
    below = int((scores < v).sum())
    return v, k - below


def _select(per_layer: list[Tensor], k: int) -> list[Tensor]:
    """Masks of the k smallest entries across all layers (ties broken by layer order, then index)."""
    if k == 0:
        return [torch.zeros_like(s, dtype=torch.bool) for s in per_layer]
    flat = torch.cat([s.reshape(-1).double().cpu() for s in per_layer])
    v, ties = _kth_smallest_threshold(flat, k)
    masks, out = flat < v, []
    tie_idx = torch.nonzero(flat == v).reshape(-1)[:ties]
    masks[tie_idx] = True
    start = 0
    for s in per_layer:
        out.append(masks[start:start + s.numel()].reshape(s.shape))
        start += s.numel()
    return out


def lamp(weights: list[Tensor], sparsity: float, power: float = 2.0) -> list[float]:
    """Per-layer sparsities from LAMP scores ranked globally."""
    scores = []
    for w in weights:
        a = w.detach().reshape(-1).abs().double().cpu() ** power
        srt, idx = torch.sort(a)
        # denominator: sum of a_j over j >= i in ascending order (the weight itself and larger)
        tail = torch.flip(torch.cumsum(torch.flip(srt, [0]), 0), [0])
        s = torch.empty_like(a)
        s[idx] = srt / tail.clamp_min(torch.finfo(torch.float64).tiny)
        scores.append(s)
    total = sum(w.numel() for w in weights)
    masks = _select(scores, round(sparsity * total))
    return [float(m.sum()) / m.numel() for m in masks]


def layer_energy(W: Tensor, hessians, row_scale: Tensor | None = None) -> float:
    """sum_r row_scale[r] w_r^T H_r w_r: the layer's membrane energy, which makes its OBS losses
    relative. ``hessians``: ``(rows, H)`` groups, H [d, d] shared by the group's rows."""
    return sum(float(((W[rows].double() @ H.to(W.device)) * W[rows].double()).sum(1)
                     .mul(1.0 if row_scale is None else row_scale[rows].to(W.device)).sum()) for rows, H in hessians)


def global_counts(losses: list[Tensor], energies: list[float], sparsity: float) -> list[Tensor]:
    """Per-row pruning counts for every layer from OBS path losses.

    ``losses[l]``: ``[R_l, S_l]`` non-decreasing step losses (already multiplied by any row scale;
    rows whose path is shorter than the row are padded with +inf); ``energies[l]``: the layer's
    sum_r w_r^T H_r w_r. Returns ``[R_l]`` int64 counts whose total is ``round(sparsity * numel)``
    over all weights (numel = sum of R_l * S_l)."""
    rel = [L / max(e, 1e-30) for L, e in zip(losses, energies)]
    total = sum(L.numel() for L in losses)
    k = round(sparsity * total)
    finite = sum(int(torch.isfinite(L).sum()) for L in losses)
    if k > finite:
        raise OsbcError(f"sparsity {sparsity} needs {k} removals but the layers' paths allow {finite}")
    return [m.sum(1).to(torch.int64) for m in _select(rel, k)]
