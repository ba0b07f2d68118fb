"""Adapters that teach osbc other SNN libraries' neurons.

Importing this package registers, with :func:`osbc.kernels.register`, the neuron classes of every
supported library that is installed: its membrane kernel (from the module's own parameters) and its
state reset. Libraries that are not installed (or fail to import) are skipped silently;
:data:`AVAILABLE` lists the ones that registered. :func:`osbc.kernels.kernel_of` imports this
package lazily, so users never need to import it themselves.

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

__all__ = ["AVAILABLE", "FAILED"]

AVAILABLE: list[str] = []
#: library -> reason, for adapters whose library is installed but could not be imported
FAILED: dict[str, str] = {}

for _name in ("spikingjelly", "snntorch", "norse"):
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # libraries warn about optional CUDA / plotting backends
            importlib.import_module(f"{__name__}.{_name}")
    except ImportError as _e:  # library absent, or present without a dependency it needs
        if getattr(_e, "name", None) not in (_name, None):
            FAILED[_name] = f"{type(_e).__name__}: {_e}"
        continue
    except Exception as _e:  # noqa: BLE001 - a broken third-party install must not break osbc
        FAILED[_name] = f"{type(_e).__name__}: {_e}"
        continue
    AVAILABLE.append(_name)
