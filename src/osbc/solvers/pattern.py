"""How many weights a layer gives up (a sparsity's count, an N:M pattern's groups), and the
power-of-two rescaling that keeps the scores of huge and tiny weights in float32's range."""
from __future__ import annotations

import torch
from torch import Tensor

from ..errors import OsbcError

# The scores w^2 / [H^-1]_qq are float32 and [H^-1]_qq can be as small as 1e-12 (normalised), so
# |w| beyond ~1e13 could overflow them to +inf, where they tie with the removed positions' +inf
# and the greedy re-picks removed weights (a layer of 1e20 weights ended at 0.7% sparsity, not
# 92.8%); |w| under ~1e-19 underflows them to 0, where every weight ties (1e-30 weights: 1.8x
# the membrane error of the same layer at scale 1). Rows outside [_SMALL, _BIG] are rescaled to
# max |w| in [0.5, 1) for the solve.
_BIG = 2.0 ** 32
_SMALL = 2.0 ** -32


def _nm_groups(d: int, nm, device):
    """The N:M pattern on d inputs (keep n of every m consecutive): (group of each input [d],
    number of groups G, removals per group m - n, removals of the full pattern per row, padding
    per group [G]). When m does not divide d, the last group is read as padded with zeros up to
    m, which count as removed: it removes max(0, size - n) and keeps at most n, like the others."""
    n, m = nm
    if not (isinstance(n, int) and isinstance(m, int) and 0 <= n < m):
        raise OsbcError(f"nm must be (n, m) with 0 <= n < m, got {nm!r}")
    gid = torch.arange(d, device=device) // m
    G = (d + m - 1) // m
    size = torch.bincount(gid, minlength=G)
    return gid, G, m - n, int((size - n).clamp(min=0).sum()), m - size


def _budget(sparsity, R: int, d: int, nm) -> int:
    """Weights the layer [R, d] removes: round(sparsity * R * d), or (``sparsity=None`` with
    ``nm``) the full pattern."""
    if sparsity is None:
        if nm is None:
            raise OsbcError("sparsity is required without nm")
        return R * _nm_groups(d, nm, "cpu")[3]
    if not 0 <= float(sparsity) <= 1:
        raise OsbcError(f"sparsity must be in [0, 1], got {sparsity!r}")
    k = int(round(float(sparsity) * R * d))
    if nm is not None and k > R * _nm_groups(d, nm, "cpu")[3]:
        raise OsbcError(f"sparsity {sparsity} exceeds what the {nm[0]}:{nm[1]} pattern allows")
    return k


def pow2_row_scale(W: Tensor, per_layer: bool = False) -> Tensor | None:
    """Per row (or one for the layer) 2^e, float64, with max |w| / 2^e in [0.5, 1) where max |w|
    exceeds 2^32 or is under 2^-32 (and not 0), else 1; None when no row needs it. The pruning
    choices and compensations are the same for w and w / 2^e (losses scale by 4^-e), and dividing
    by a power of two is exact, so the result is that of the unscaled problem in exact arithmetic."""
    amax = W.detach().abs().amax(1).double() if W.numel() else W.new_zeros(W.shape[0], dtype=torch.float64)
    if per_layer:
        amax = amax.amax().expand(W.shape[0]) if W.numel() else amax
    out = (amax > _BIG) | ((amax < _SMALL) & (amax > 0))
    if not bool(out.any()):
        return None
    return torch.where(out, torch.exp2(torch.frexp(amax).exponent.double()), torch.ones_like(amax))
