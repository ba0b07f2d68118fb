"""Grouped Hessians: the rows of a layer that share one H.

A layer's rows may share one Hessian ([d, d]), have one each ([R, d, d]), or fall into groups
(neurons with clustered membrane kernels): a list of ``(rows, H)`` pairs, ``rows`` an index
tensor into the layer's rows, ``H`` [d, d] or [len(rows), d, d]. Every solver accepts all three;
``groups`` turns them into one form, with ``rows=None`` meaning all rows (no copy of W).
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..errors import OsbcError

Groups = list[tuple[Tensor | None, Tensor]]


def groups(H) -> Groups:
    """[(rows or None, H)] from a tensor or a list of (rows, H) pairs."""
    if isinstance(H, Tensor):
        return [(None, H)]
    out = [(rows, Hg) for rows, Hg in H]
    if not out:
        raise OsbcError("no Hessian groups given")
    return out


def check_weights(W, who: str, grid=None) -> None:
    """OsbcError naming ``who`` unless W is a 2-D real floating tensor of finite values (a NaN or
    Inf weight has no pruning loss or grid point and would spread through every compensation of
    its row) and ``grid`` (if given) has one scale per row of W."""
    if not isinstance(W, Tensor):
        raise OsbcError(f"{who}: W must be a torch tensor [rows, inputs], got {type(W).__name__}")
    if W.dim() != 2 or not W.is_floating_point():
        raise OsbcError(f"{who}: W must be a 2-D floating tensor [rows, inputs], got {W.dtype} of shape "
                        f"{tuple(W.shape)}")
    if not bool(torch.isfinite(W).all()):
        raise OsbcError(f"{who}: W holds NaN or Inf; only finite weights can be compressed")
    if grid is not None and tuple(grid.scale.shape) != (W.shape[0],):
        raise OsbcError(f"{who}: the grid has scales of shape {tuple(grid.scale.shape)}, W has {W.shape[0]} rows; "
                        f"fit the grid on this W")


def layer_groups(W, H, who: str, grid=None) -> Groups:
    """``groups(H)`` for the layer W [R, d], after ``check_weights`` and checking every H: a real
    tensor [d, d] or [rows, d, d], rows an index tensor into W's rows. OsbcError naming ``who``."""
    check_weights(W, who, grid)
    R, d = W.shape
    if not isinstance(H, (Tensor, list, tuple)):
        raise OsbcError(f"{who}: H must be a torch tensor [{d}, {d}] or a list of (rows, H) groups, "
                        f"got {type(H).__name__}")
    try:
        gs = groups(H)
    except (TypeError, ValueError) as e:
        if isinstance(e, OsbcError):
            raise
        raise OsbcError(f"{who}: H must be a torch tensor [{d}, {d}] or a list of (rows, H) pairs") from None
    for rows, Hg in gs:
        if rows is not None and not hasattr(rows, "__len__"):
            raise OsbcError(f"{who}: each group's rows must be an index tensor, got {type(rows).__name__}")
        n = R if rows is None else len(rows)
        if not isinstance(Hg, Tensor) or Hg.is_complex() or Hg.dtype == torch.bool:
            raise OsbcError(f"{who}: H must be a real torch tensor, got "
                            f"{type(Hg).__name__ if not isinstance(Hg, Tensor) else Hg.dtype}")
        if tuple(Hg.shape) not in ((d, d), (n, d, d)):
            raise OsbcError(f"{who}: H must be [{d}, {d}] or [{n}, {d}, {d}] for W {tuple(W.shape)}, "
                            f"got {tuple(Hg.shape)}")
    return gs


def take(x: Tensor | None, rows: Tensor | None):
    """x[rows] (any tensor with rows first), x itself for rows=None or x=None."""
    if x is None or rows is None:
        return x
    return x[rows.to(x.device)]


def restrict(gs: Groups, sel: Tensor) -> Groups:
    """The groups of the sub-layer of rows ``sel`` (ascending), re-indexed into it."""
    out = []
    for rows, Hg in gs:
        if rows is None:
            out.append((None, Hg if Hg.dim() == 2 else Hg[sel.to(Hg.device)]))
            continue
        rows = rows.to(sel.device)
        hit = torch.isin(rows, sel)
        if not bool(hit.any()):
            continue
        sub = torch.searchsorted(sel, rows[hit])
        out.append((sub, Hg if Hg.dim() == 2 else Hg[torch.nonzero(hit)[:, 0].to(Hg.device)]))
    return out


def per_group(W: Tensor, gs: Groups, fn):
    """fn(W[rows], H, rows) for every group, its rows gathered into tensors shaped like W's rows:
    one tensor, or a tuple when fn returns tuples."""
    if len(gs) == 1 and gs[0][0] is None:
        return fn(W, gs[0][1], None)
    outs = None
    for rows, Hg in gs:
        r = fn(W[rows.to(W.device)], Hg, rows)
        parts = r if isinstance(r, tuple) else (r,)
        if outs is None:
            outs = [p.new_empty((W.shape[0],) + tuple(p.shape[1:])) for p in parts]
        for o, p in zip(outs, parts):
            o[rows.to(o.device)] = p
    return tuple(outs) if isinstance(r, tuple) else outs[0]
