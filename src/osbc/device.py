"""The one place that turns a ``device`` argument into a ``torch.device``."""

from __future__ import annotations

import torch

from .errors import OsbcError

__all__ = ["resolve_device"]


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``None`` or ``"auto"``: CUDA when available, else CPU. A CUDA request without CUDA, or a
    string torch does not know, is an :class:`OsbcError`."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise OsbcError(f"device {device!r} is not a valid torch device (try 'cpu' or 'cuda')") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise OsbcError(f"device {device!r} requested but CUDA is not available here; use device='cpu'")
    return dev
