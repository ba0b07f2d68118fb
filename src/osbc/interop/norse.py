"""norse neurons for osbc.

norse neurons are forward-Euler discretisations with step ``dt`` (``module.dt``) of
continuous-time models whose parameters live in ``module.p``. Dynamics (hence membrane kernels), with
``a = dt * p.tau_mem_inv`` and ``b = 1 - dt * p.tau_syn_inv``, from norse's step functions with
the threshold ignored and checked against norse's own simulation in
``tests/test_interop_norse.py``:

* ``LIF`` / ``LIFCell`` (``lif_feed_forward_step``): the input current jumps first
  (``j = i + I``), then ``v <- v + a (v_leak - v + j)`` and ``i <- b j``. So with ``j[t] = b j[t-1]
  + I[t]`` and ``v[t] = (1 - a) v[t-1] + a j[t]``: h[n] = a sum_{i+j=n} b^i (1-a)^j
  = a ((1-a)^(n+1) - b^(n+1)) / ((1-a) - b): the current enters the membrane in the same step it
  arrives (the simulation confirms h[0] = a, not 0).
* ``LIFBoxCell``: ``v <- v + a (I + v_leak - v)`` -> h[n] = a (1 - a)^n
* ``IAF`` / ``IAFCell``: ``v <- v + I`` -> h[n] = 1
* ``LI`` / ``LICell`` (leaky integrator readouts, no spikes: the membrane is the output), same
  update as LIF -> same kernel; ``LIBoxCell`` -> a (1 - a)^n.

Parameters may be tensors (per-neuron time constants). Constant terms (``v_leak``, the initial
``v = v_leak``) cancel in the loss and do not enter the kernel.

State: norse modules keep no state between calls; they take ``state`` as an argument and
return the new one (``None`` = start from the initial state), so there is nothing to reset. The
``*Cell`` modules take one time step: a model built of them that does not loop over time itself
(``SequentialState``) is driven as ``out, s = model(x[t], s)`` (:mod:`osbc.drive`).
"""

from __future__ import annotations

import torch
from norse.torch.module import iaf as _iaf
from norse.torch.module import leaky_integrator as _li
from norse.torch.module import leaky_integrator_box as _libox
from norse.torch.module import lif as _lif
from norse.torch.module import lif_box as _lifbox
from torch import nn

from ..neurons import Dynamics, register

__all__ = ["lif_dynamics", "box_dynamics", "iaf_dynamics"]


def _t(v) -> torch.Tensor:
    return torch.as_tensor(v, dtype=torch.float64).detach().cpu()


def _dt(m: nn.Module) -> float:
    return float(getattr(m, "dt", 1e-3))


def _spikes(m: nn.Module) -> dict:
    """Threshold and reset of spiking modules (hard reset to ``v_reset``); leaky integrators
    (``LI*``, no ``v_th``) never spike."""
    p = m.p
    if not hasattr(p, "v_th"):
        return dict(v_rest=p.v_leak, reset_mode="none")
    return dict(threshold=p.v_th, v_rest=getattr(p, "v_leak", 0.0), v_reset=getattr(p, "v_reset", 0.0))


def lif_dynamics(m: nn.Module) -> Dynamics:
    """``LIF``, ``LIFCell``, ``LI``, ``LICell``: current (decay b) feeding the membrane (decay 1-a)."""
    dt = _dt(m)
    a = dt * _t(m.p.tau_mem_inv)
    b = 1.0 - dt * _t(m.p.tau_syn_inv)
    return Dynamics(1.0 - a, a, f"norse.{type(m).__name__}", syn_decay=b, **_spikes(m),
                    params=dict(tau_mem=1.0 / _t(m.p.tau_mem_inv), tau_syn=1.0 / _t(m.p.tau_syn_inv), dt=dt))


def box_dynamics(m: nn.Module) -> Dynamics:
    """``LIFBoxCell``, ``LIBoxCell``: the membrane alone, h[n] = a (1 - a)^n."""
    dt = _dt(m)
    a = dt * _t(m.p.tau_mem_inv)
    return Dynamics(1.0 - a, a, f"norse.{type(m).__name__}", **_spikes(m),
                    params=dict(tau_mem=1.0 / _t(m.p.tau_mem_inv), dt=dt))


def iaf_dynamics(m: nn.Module) -> Dynamics:
    """``IAF``, ``IAFCell``: h[n] = 1 (``dt`` unused by norse's IAF step; no leak)."""
    return Dynamics(1.0, 1.0, f"norse.{type(m).__name__}", threshold=m.p.v_th, v_reset=m.p.v_reset)


# norse modules are stateless between calls: no reset needed (None). The *Cell modules take one
# time step and pass their state in and out; LIF, LI and IAF loop over [T, B, ...] themselves.
for _cls, _dyn in ((_lif.LIF, lif_dynamics), (_li.LI, lif_dynamics), (_iaf.IAF, iaf_dynamics)):
    register(_cls, _dyn, None)
for _cls, _dyn in ((_lif.LIFCell, lif_dynamics), (_li.LICell, lif_dynamics), (_lifbox.LIFBoxCell, box_dynamics),
                   (_libox.LIBoxCell, box_dynamics), (_iaf.IAFCell, iaf_dynamics)):
    register(_cls, _dyn, None, step="passed")
