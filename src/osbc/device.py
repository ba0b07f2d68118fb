"""The one place that turns a ``device`` argument into a ``torch.device``."""

from __future__ import annotations

import torch

from .errors import OsbcError

__all__ = ["resolve_device", "pinned_threads"]


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


class pinned_threads:
    """Run a block with ``n`` intra-op CPU threads (``None``, or a non-CPU device: as set), then
    restore the caller's count. Two uses: torch splits a CPU product or sum among its threads and
    the split sets the order of the float additions, so a seeded CPU run repeats bit for bit only at
    the same thread count; and the exact greedy's per-step ops are small, so one thread does them as
    fast as two and avoids barrier stalls on a busy machine."""

    def __init__(self, n: int | None, device: str | torch.device = "cpu"):
        if n is not None and n < 1:
            raise OsbcError(f"threads must be >= 1, got {n}")
        self.n = n if (n is not None and torch.device(device).type == "cpu") else None

    def __enter__(self):
        if self.n is not None:
            self.prev = torch.get_num_threads()
            if self.prev != self.n:
                torch.set_num_threads(self.n)
        return self

    def __exit__(self, *exc):
        if self.n is not None and torch.get_num_threads() != self.prev:
            torch.set_num_threads(self.prev)
