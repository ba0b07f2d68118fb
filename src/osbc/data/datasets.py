"""The datasets by name: :func:`load_dataset`."""

from __future__ import annotations

import os
import re
from typing import Any

from ..errors import OsbcError
from .base import EventDataset
from .cifar10dvs import CIFAR10DVS
from .dvsgesture import DVSGesture
from .nmnist import NMNIST
from .saccade import Digits

__all__ = ["load_dataset"]


def load_dataset(name: str, root: str | os.PathLike | None = None, train: bool = True,
                 frames: int | None = 20, **kw: Any) -> EventDataset:
    """``name`` in {"digits", "nmnist", "dvsgesture", "cifar10dvs"} (case, '-' and '_' ignored)."""
    table: dict[str, type[EventDataset]] = {
        "digits": Digits, "nmnist": NMNIST, "dvsgesture": DVSGesture, "dvs128gesture": DVSGesture,
        "cifar10dvs": CIFAR10DVS,
    }
    key = re.sub(r"[^a-z0-9]", "", str(name).lower())
    if key not in table:
        raise OsbcError(f"unknown dataset {name!r}: choose digits, nmnist, dvsgesture or cifar10dvs")
    return table[key](root, train=train, frames=frames, **kw)
