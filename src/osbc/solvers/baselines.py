"""Baselines without a Hessian: magnitude pruning and round-to-nearest quantization."""
from __future__ import annotations

import torch
from torch import Tensor

from ..quant import Grid
from .groups import check_weights
from .pattern import _budget, _nm_groups

__all__ = ["prune_magnitude", "quantize_rtn"]


def _smallest_mask(score: Tensor, k: int) -> Tensor:
    """Bool mask of the k smallest entries of score (any shape; ties: first in memory order)."""
    flat = score.reshape(-1)
    mask = torch.zeros_like(flat, dtype=torch.bool)
    if k > 0:
        mask[torch.sort(flat, stable=True).indices[:k]] = True
    return mask.view_as(score)



def prune_magnitude(W: Tensor, sparsity, *, nm=None):
    """The layer's round(sparsity * R * d) smallest |w|, no compensation. ``nm=(n, m)``: only each
    row's m - n smallest of every group of m are candidates (``sparsity=None``: all of them).
    Returns (W_new, keep_mask)."""
    check_weights(W, "prune_magnitude")
    R, d = W.shape
    k = _budget(sparsity, R, d, nm)
    score = W.detach().abs().to(torch.float64)
    if nm is not None:
        gid, G, cap, _, _ = _nm_groups(d, nm, W.device)
        m = nm[1]
        # a partial last group's padding ranks first: it counts as removed (see _nm_groups)
        pad = torch.full((R, G * m), -float("inf"), dtype=torch.float64, device=W.device)
        pad[:, :d] = score
        rank = torch.sort(torch.sort(pad.view(R, G, m), dim=2, stable=True).indices, dim=2).indices
        cand = (rank < cap).view(R, G * m)[:, :d]
        score = score.masked_fill(~cand, float("inf"))
    prune = _smallest_mask(score, k)
    return W * ~prune, ~prune


def quantize_rtn(W: Tensor, grid: Grid, *, keep_mask: Tensor | None = None) -> Tensor:
    """Round to nearest; pruned weights (keep_mask False) stay 0."""
    check_weights(W, "quantize_rtn", grid)
    q = grid.quantize(W.detach())
    return q if keep_mask is None else q * keep_mask.to(q.device)


def _finish_q(out: Tensor, grid: Grid, keep: Tensor | None, dtype) -> Tensor:
    out = grid.quantize(out.to(dtype))        # on the grid bit for bit (idempotent on grid values)
    return out if keep is None else out * keep
