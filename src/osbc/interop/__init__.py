"""Adapters that teach osbc other SNN libraries' neurons.

Each adapter registers, with :func:`osbc.kernels.register`, a library's neuron classes: their
membrane kernel (from the module's own parameters) and their state reset. osbc loads an adapter
the first time it meets a module whose class comes from that library (:func:`load_for`), so users
never need to import anything, and a model without norse modules never pays for importing norse
(about a second, with its plotting stack). :func:`load_all` loads every installed one;
:data:`AVAILABLE` lists the adapters loaded so far, :data:`FAILED` the libraries that are installed
but could not be imported.

=============  =====================================================================
library        neurons
=============  =====================================================================
spikingjelly   LIFNode, ParametricLIFNode, IFNode, SimpleLIFNode, SimpleIFNode
snntorch       Leaky, Synaptic (scalar or per-neuron beta / alpha)
norse          LIF, LIFCell, LIFBoxCell, IAF, IAFCell, LI, LICell, LIBoxCell
=============  =====================================================================
"""

from __future__ import annotations

import importlib
import warnings

__all__ = ["AVAILABLE", "FAILED", "LIBRARIES", "load", "load_for", "load_all"]

LIBRARIES = ("spikingjelly", "snntorch", "norse")
AVAILABLE: list[str] = []
#: library -> reason, for adapters whose library is installed but could not be imported
FAILED: dict[str, str] = {}
_tried: set[str] = set()


def load(name: str) -> bool:
    """Load the adapter of library ``name`` (once); whether it is registered."""
    if name not in _tried:
        _tried.add(name)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # libraries warn about optional CUDA / plotting backends
                importlib.import_module(f"{__name__}.{name}")
        except ImportError as e:  # library absent, or present without a dependency it needs
            if getattr(e, "name", None) not in (name, None):
                FAILED[name] = f"{type(e).__name__}: {e}"
        except Exception as e:  # noqa: BLE001 - a broken third-party install must not break osbc
            FAILED[name] = f"{type(e).__name__}: {e}"
        else:
            AVAILABLE.append(name)
    return name in AVAILABLE


def load_for(cls: type) -> bool:
    """Load the adapters of the supported libraries ``cls`` (or a base class) comes from; whether
    one was newly loaded."""
    new = False
    for c in cls.__mro__:
        root = (getattr(c, "__module__", None) or "").partition(".")[0]
        if root in LIBRARIES and root not in _tried:
            new |= load(root)
    return new


def load_all() -> list[str]:
    """Load every supported library's adapter that can be; returns :data:`AVAILABLE`."""
    for name in LIBRARIES:
        load(name)
    return AVAILABLE
