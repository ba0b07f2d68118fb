"""spikingjelly (``spikingjelly.activation_based``) neurons for osbc.

Dynamics from the neuron's charge equation ``H[t] = f(V[t-1], X[t])`` (membrane kernels with the
threshold ignored), checked against spikingjelly's own simulation in
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

from ..kernels import Kernel, KernelError
from ..neurons import Dynamics, probe_kernel, register

__all__ = ["lif_dynamics", "plif_dynamics", "if_dynamics", "reset", "step"]

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
                          f"dynamics, and probing it failed ({e}); register it with osbc.neurons.register") from e
    h = probed.impulse(T).reshape(-1)
    if torch.allclose(h, analytic.impulse(T).reshape(-1), rtol=1e-4, atol=1e-6):
        return analytic
    return probed


def _first_order(m: nn.Module, decay, gain, **params) -> Dynamics:
    rest = 0.0 if m.v_reset is None else m.v_reset
    return Dynamics(decay, gain, f"spikingjelly.{type(m).__name__}", threshold=m.v_threshold, v_rest=rest,
                    v_reset=rest, reset_mode="subtract" if m.v_reset is None else "zero", params=params)


def _lif(m: nn.Module, k: torch.Tensor, **params) -> Dynamics:
    """``H = V + (X - (V - V_reset)) k`` (decay_input) or ``H = V - (V - V_reset) k + X``."""
    k = torch.as_tensor(k, dtype=torch.float64).detach().cpu()
    decay_input = bool(getattr(m, "decay_input", True))
    gain = k if decay_input else torch.ones_like(k)
    return _first_order(m, 1.0 - k, gain, decay_input=decay_input, **params)


def lif_dynamics(m: nn.Module) -> Dynamics:
    """``LIFNode`` / ``SimpleLIFNode``: decay ``1 - 1/tau``, gain ``1/tau`` (``decay_input``) or 1."""
    tau = torch.as_tensor(m.tau, dtype=torch.float64).detach().cpu()
    return _lif(m, 1.0 / tau, tau=tau)


def plif_dynamics(m: nn.Module) -> Dynamics:
    """``ParametricLIFNode``: as LIF with ``1/tau = sigmoid(w)``."""
    k = torch.sigmoid(m.w.detach().double().cpu())
    return _lif(m, k, tau=1.0 / k)


def if_dynamics(m: nn.Module) -> Dynamics:
    """``IFNode`` / ``SimpleIFNode``: a perfect integrator, h[n] = 1."""
    return _first_order(m, 1.0, 1.0)


def _kernel(base: type, dynamics):
    """The kernel of ``base``'s dynamics, checked against subclasses that change them."""
    def kernel(m: nn.Module) -> Kernel:
        return _checked(m, base, dynamics(m).kernel())
    return kernel


def _exact(base: type, dynamics):
    """``base``'s dynamics, or None for a subclass that changes them (osbc then knows only its
    measured kernel, and cannot export it to NIR)."""
    def exact(m: nn.Module) -> Dynamics | None:
        d = dynamics(m)
        analytic = d.kernel()
        return d if _checked(m, base, analytic) is analytic else None
    return exact


def reset(m: nn.Module) -> None:
    """spikingjelly's own state reset (memories back to their reset values, ``v_seq`` cleared)."""
    m.reset()


def step(m: nn.Module) -> str | None:
    """Single-step in spikingjelly's default ``step_mode="s"``; multi-step in ``"m"``."""
    return "hidden" if getattr(m, "step_mode", "s") == "s" else None


for _cls, _dyn in ((_sjn.LIFNode, lif_dynamics), (_sjn.ParametricLIFNode, plif_dynamics), (_sjn.IFNode, if_dynamics),
                   (_sjn.SimpleLIFNode, lif_dynamics), (_sjn.SimpleIFNode, if_dynamics)):
    register(_cls, _exact(_cls, _dyn), reset, kernel=_kernel(_cls, _dyn), step=step)
