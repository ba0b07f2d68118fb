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
