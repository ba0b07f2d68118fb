"""Which modules hold synapse weights, and which of those osbc can compress."""

from __future__ import annotations

from torch import nn

__all__ = ["WEIGHT_LAYERS", "is_weight_layer", "is_compressible"]

# Layers whose ``.weight`` is a synapse matrix (stored compactly, counted in sizes and SynOps).
WEIGHT_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def is_weight_layer(m: nn.Module) -> bool:
    return isinstance(m, WEIGHT_LAYERS)


def is_compressible(m: nn.Module) -> bool:
    """Linear, or a dense (groups=1) Conv1d/Conv2d: the layers whose inputs the Hessian pass can
    unfold. Conv3d and grouped convs are left as they are."""
    if isinstance(m, nn.Linear):
        return True
    return isinstance(m, (nn.Conv1d, nn.Conv2d)) and m.groups == 1
