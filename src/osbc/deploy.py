"""After compression: fine-tune a pruned model without losing its zeros, and read the integer codes
of a quantized layer for a chip.

Fine-tuning::

    names = osbc.freeze_sparsity(res.model)     # zeros stay zero through any optimizer
    ...train...                                 # e.g. osbc.train(res.model, data, epochs=2)
    osbc.unfreeze_sparsity(res.model)           # plain weights again, ready for osbc.save

Integer codes::

    q = osbc.quantized_codes(layer)             # or a weight tensor
    q.codes, q.scale, q.bits                    # q.dequantize() == layer.weight, exactly

:func:`freeze_sparsity` uses torch's pruning re-parametrisation
(:func:`torch.nn.utils.prune.custom_from_mask`): the layer's ``weight`` becomes ``weight_orig *
weight_mask``, recomputed before every forward pass. A masked entry therefore stays exactly zero
whatever the optimizer does to ``weight_orig`` (Adam's momentum, weight decay), which re-masking by
hand after each step cannot promise for code that steps the optimizer without telling osbc.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.nn.utils import prune

from .errors import OsbcError
from .layers import is_weight_layer
from .griddetect import code_bits, detect_grid

__all__ = ["freeze_sparsity", "unfreeze_sparsity", "is_frozen", "quantized_codes", "QuantizedCodes"]


# ---- masks for fine-tuning ---------------------------------------------------------------------

def is_frozen(layer: nn.Module) -> bool:
    """Whether ``layer.weight`` is under a pruning mask (:func:`freeze_sparsity`, or torch's own
    ``torch.nn.utils.prune``)."""
    return any(isinstance(h, prune.BasePruningMethod) and h._tensor_name == "weight"
               for h in layer._forward_pre_hooks.values())


def freeze_sparsity(model: nn.Module) -> list[str]:
    """Keep every zero weight of ``model``'s Linear/Conv layers at zero through further training.

    Each weight layer with at least one zero weight gets its current nonzero pattern as a fixed mask
    (:func:`torch.nn.utils.prune.custom_from_mask`). The trainable parameter becomes
    ``weight_orig``; ``weight`` is ``weight_orig * weight_mask``, so a zero stays exactly zero under
    any optimizer, while the other weights train as before. Build the optimizer after this call (the
    parameters changed). ``layer.weight`` is recomputed by each forward pass, so right after an
    optimizer step it lags one step behind; :func:`unfreeze_sparsity` recomputes it.
    Layers without zeros, and layers already masked, are left as they are.
    Returns the names of the layers masked. :func:`unfreeze_sparsity` turns them back into plain
    weights (needed before :func:`osbc.save`, whose files hold plain weights)."""
    names = []
    for name, m in model.named_modules():
        if not is_weight_layer(m) or is_frozen(m):
            continue
        w = m.weight.detach()
        keep = w != 0
        if bool(keep.all()):
            continue
        prune.custom_from_mask(m, "weight", keep.to(w.dtype))
        names.append(name)
    return names


def unfreeze_sparsity(model: nn.Module) -> list[str]:
    """Make the masks of :func:`freeze_sparsity` permanent (:func:`torch.nn.utils.prune.remove`):
    every masked layer gets a plain ``weight`` parameter equal to ``weight_orig * weight_mask``
    (masked entries exactly zero), and the state dict has its usual keys again. Returns the names of
    the layers unmasked."""
    names = []
    for name, m in model.named_modules():
        if is_weight_layer(m) and is_frozen(m):
            prune.remove(m, "weight")
            names.append(name)
    return names


# ---- integer codes of a quantized layer ----------------------------------------------------------

class QuantizedCodes(NamedTuple):
    """The integer grid a quantized weight lies on: ``weight == codes * scale`` exactly.

    ``codes``: int8, the weight's shape (zero weights have code 0). ``scale``: float32, one per
    output row (``[R]``, the weight's first dim) or one for the whole layer (``[1]``, whenever one
    scale reproduces every row). ``bits``: the smallest symmetric width holding the codes,
    ``|code| <= 2^(bits-1) - 1`` (osbc's :class:`osbc.quant.Grid` convention, at least 2); codes
    from a full-range quantizer that use ``-2^(b-1)`` report ``b + 1``."""

    codes: Tensor
    scale: Tensor
    bits: int

    @property
    def per(self) -> str:
        """``"layer"`` (one scale) or ``"channel"`` (one per output row)."""
        return "layer" if self.scale.numel() == 1 else "channel"

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """``codes * scale`` (computed in float32, as the grid was detected), as ``dtype``."""
        s = self.scale.reshape(-1, *([1] * (self.codes.dim() - 1)))
        return (self.codes.to(torch.float32) * s).to(dtype)


def quantized_codes(layer_or_weight: nn.Module | Tensor) -> QuantizedCodes:
    """The integer codes and scale(s) of a quantized Linear/Conv layer or weight tensor.

    The grid is detected from the weights themselves (the detection :mod:`osbc.storage` uses for
    compact files): each row's nonzero weights must be integer multiples of one float32 scale, with
    codes of at most 8 bits; the largest such scale is taken, and one scale for the whole layer when
    one fits every row. ``dequantize()`` reproduces the weight bit for bit (a zero's sign aside).
    Works on any model quantized by :func:`osbc.quantize` (``per="channel"`` or ``"layer"``,
    ``pow2``), pruned or not. Weights that are not on such a grid are an :class:`OsbcError`."""
    if isinstance(layer_or_weight, nn.Module):
        if not is_weight_layer(layer_or_weight):
            raise OsbcError(f"{type(layer_or_weight).__name__} is not a Linear/Conv layer; pass a weight layer "
                            "or its weight tensor")
        what = f"{type(layer_or_weight).__name__} weight"
        weight = layer_or_weight.weight
    elif isinstance(layer_or_weight, Tensor):
        what, weight = "weight", layer_or_weight
    else:
        raise OsbcError(f"quantized_codes takes a Linear/Conv layer or a weight tensor, got "
                        f"{type(layer_or_weight).__name__}")
    if weight.dim() == 0:
        raise OsbcError(f"{what} is a scalar; pass a weight with output rows as its first dim")
    w = weight.detach().cpu()
    rows = w.shape[0]
    W2 = w.reshape(rows, -1)
    mask = W2 != 0
    codes = torch.zeros(W2.shape, dtype=torch.int8)
    if bool(mask.any()):
        grid = detect_grid(W2, mask)
        if grid is None:
            raise OsbcError(f"{what} {tuple(w.shape)} ({w.dtype}) is not on an integer grid of at most 8 bits "
                            "(one scale per row or per layer); quantize it first, e.g. osbc.quantize(model, calib, "
                            "bits=4)")
        codes[mask], scale, _ = grid
    else:  # all zero: every scale reproduces it
        scale = torch.ones(1, dtype=torch.float32)
    m = int(codes.abs().max())
    return QuantizedCodes(codes.reshape(w.shape).to(weight.device), scale.to(weight.device),
                          max(2, code_bits(-m, m)))
