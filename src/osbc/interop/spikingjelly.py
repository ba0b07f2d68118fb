"""spikingjelly (``spikingjelly.activation_based``) neurons for osbc.

Membrane kernels, from the neuron's charge equation with the threshold ignored
(``H[t] = f(V[t-1], X[t])``; REFERENCE §2), checked against spikingjelly's own simulation in
``tests/test_interop_spikingjelly.py``:

* ``LIFNode(tau, decay_input=True)``:  ``H = V + (X - (V - V_reset)) / tau`` -> h[n] = (1/tau)(1 - 1/tau)^n
* ``LIFNode(tau, decay_input=False)``: ``H = V - (V - V_reset) / tau + X``  -> h[n] = (1 - 1/tau)^n
* ``ParametricLIFNode``: as LIF with ``1/tau = sigmoid(w)`` (``w`` learned)
* ``IFNode``: ``H = V + X`` -> h[n] = 1
* ``SimpleLIFNode`` / ``SimpleIFNode`` (pure-PyTorch variants): as above.

Both step modes ('s' and 'm') share these dynamics. A user subclass of one of these that changes
the dynamics is detected (overridden charge/forward methods) and probed with an impulse instead.

State: spikingjelly neurons keep ``v`` (and ``v_seq``) as memories; ``reset()`` restores them. Note
that ``copy.deepcopy`` of a spikingjelly network fails while a memory holds a non-leaf tensor from a
forward pass with autograd: reset first (``osbc.snn.reset(model)`` does, through this registry).
"""

from __future__ import annotations

import torch
from spikingjelly.activation_based import neuron as _sjn
from torch import nn

from ..kernels import Kernel, KernelError, probe_kernel, register

__all__ = ["lif_kernel", "plif_kernel", "if_kernel", "reset"]

# Methods through which a subclass could change the subthreshold dynamics.
_DYNAMICS = ("neuronal_charge", "single_step_functional_forward", "multi_step_functional_forward",
             "single_step_forward", "multi_step_forward", "forward")


def _overrides(m: nn.Module, base: type) -> bool:
    return any(getattr(type(m), a, None) is not getattr(base, a, None) for a in _DYNAMICS)


def _checked(m: nn.Module, base: type, analytic: Kernel, T: int = 32) -> Kernel:
    """The analytic kernel of ``base``, unless ``m`` is a subclass that changes the dynamics; then a
    kernel measured on ``m`` itself (its parameters are scalars in spikingjelly)."""
    if type(m) is base or not _overrides(m, base):
        return analytic
    try:
        probed = probe_kernel(m, (1,), T)
    except KernelError as e:
        raise KernelError(f"{type(m).__name__} subclasses spikingjelly {base.__name__} but changes its "
                          f"dynamics, and probing it failed ({e}); register it with osbc.kernels.register") from e
    h = probed.impulse(T).reshape(-1)
    if torch.allclose(h, analytic.impulse(T).reshape(-1), rtol=1e-4, atol=1e-6):
        return analytic
    return probed


def _lif_from_k(m: nn.Module, k: torch.Tensor, name: str, **params) -> Kernel:
    k = torch.as_tensor(k, dtype=torch.float64).detach().cpu()
    gain = k if getattr(m, "decay_input", True) else torch.ones_like(k)
    return Kernel.first_order(1.0 - k, gain, name=name, decay_input=bool(getattr(m, "decay_input", True)), **params)


def lif_kernel(m: nn.Module) -> Kernel:
    """``LIFNode`` / ``SimpleLIFNode``: decay ``1 - 1/tau``, gain ``1/tau`` (``decay_input``) or 1."""
    tau = torch.as_tensor(m.tau, dtype=torch.float64).detach().cpu()
    base = _sjn.SimpleLIFNode if isinstance(m, _sjn.SimpleLIFNode) else _sjn.LIFNode
    return _checked(m, base, _lif_from_k(m, 1.0 / tau, f"spikingjelly.{type(m).__name__}", tau=tau))


def plif_kernel(m: nn.Module) -> Kernel:
    """``ParametricLIFNode``: as LIF with ``1/tau = sigmoid(w)``."""
    k = torch.sigmoid(m.w.detach().double().cpu())
    return _checked(m, _sjn.ParametricLIFNode,
                    _lif_from_k(m, k, f"spikingjelly.{type(m).__name__}", tau=1.0 / k))


def if_kernel(m: nn.Module) -> Kernel:
    """``IFNode`` / ``SimpleIFNode``: a perfect integrator, h[n] = 1."""
    base = _sjn.SimpleIFNode if isinstance(m, _sjn.SimpleIFNode) else _sjn.IFNode
    return _checked(m, base, Kernel.first_order(1.0, 1.0, name=f"spikingjelly.{type(m).__name__}"))


def reset(m: nn.Module) -> None:
    """spikingjelly's own state reset (memories back to their reset values, ``v_seq`` cleared)."""
    m.reset()


register(_sjn.LIFNode, lif_kernel, reset)
register(_sjn.ParametricLIFNode, plif_kernel, reset)
register(_sjn.IFNode, if_kernel, reset)
register(_sjn.SimpleLIFNode, lif_kernel, reset)
register(_sjn.SimpleIFNode, if_kernel, reset)
