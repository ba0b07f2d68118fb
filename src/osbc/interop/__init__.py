"""Adapters that teach osbc other SNN libraries' neurons.

Each adapter registers a library's neuron classes in the neuron registry (:mod:`osbc.neurons`):
their dynamics (from the module's own parameters; the membrane kernel and the NIR node follow from
them) and their state reset. The registry loads an adapter the first time it meets a module whose
class comes from that library (:func:`load_for`), so users never need to import anything, and a
model without norse modules never pays for importing norse (about a second, with its plotting
stack). :func:`load_all` loads every installed one; :data:`AVAILABLE` lists the adapters loaded so
far, :data:`FAILED` the libraries that are installed but could not be imported.

=============  =====================================================================
library        neurons
=============  =====================================================================
spikingjelly   LIFNode, ParametricLIFNode, IFNode, SimpleLIFNode, SimpleIFNode
snntorch       Leaky, Synaptic (scalar or per-neuron beta / alpha)
norse          LIF, LIFCell, LIFBoxCell, IAF, IAFCell, LI, LICell, LIBoxCell
=============  =====================================================================
"""

from __future__ import annotations

from ..neurons import AVAILABLE, FAILED, LIBRARIES, load_all, load_for
from ..neurons import load_adapter as load

__all__ = ["AVAILABLE", "FAILED", "LIBRARIES", "load", "load_for", "load_all"]
