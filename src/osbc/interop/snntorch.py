"""snntorch neurons for osbc.

Dynamics from snntorch's state functions (membrane kernels with the reset term ignored),
checked against snntorch's own simulation in ``tests/test_interop_snntorch.py``:

* ``Leaky(beta)``: ``mem = beta * mem + input`` -> h[n] = beta^n
* ``Synaptic(alpha, beta)``: ``syn = alpha * syn + input; mem = beta * mem + syn``
  -> h[n] = sum_{i+j=n} alpha^i beta^j = (beta^(n+1) - alpha^(n+1)) / (beta - alpha)

snntorch clamps ``alpha`` and ``beta`` to [0, 1] in the forward pass; so do the kernels. Both may
be scalars or per-neuron tensors (e.g. ``[features]`` or ``[C, 1, 1]``): the kernel then carries
that parameter shape and osbc gives every output row its own Hessian. ``learn_beta`` parameters are
read as they are now (detached).

snntorch neurons are single-step: models loop over time in ``forward``. State lives in the
``mem`` (and ``syn``) buffers when ``init_hidden=True``, or is passed in and out by the model (in
which case the model re-initialises it itself, usually with ``init_leaky()``); the reset below
zeroes the buffers either way (``reset_mem``), and a neuron re-sizes its state on the next call.
"""

from __future__ import annotations

import snntorch as _snn
import torch
from torch import nn

from ..neurons import Dynamics, register

__all__ = ["leaky_dynamics", "synaptic_dynamics", "reset"]


def _decay(v) -> torch.Tensor:
    return torch.as_tensor(v, dtype=torch.float64).detach().cpu().clamp(0, 1)


def _spikes(m: nn.Module) -> dict:
    # reset_mechanism: "subtract" (snntorch's default), "zero" or "none"; the membrane rests at 0
    return dict(threshold=m.threshold.detach(), reset_mode=getattr(m, "reset_mechanism", "subtract"))


def leaky_dynamics(m: nn.Module) -> Dynamics:
    """``Leaky``: h[n] = beta^n (beta clamped to [0, 1] as snntorch does)."""
    beta = _decay(m.beta)
    return Dynamics(beta, 1.0, "snntorch.Leaky", params=dict(beta=beta), **_spikes(m))


def synaptic_dynamics(m: nn.Module) -> Dynamics:
    """``Synaptic``: a synaptic current (decay alpha) feeding the membrane (decay beta)."""
    alpha, beta = _decay(m.alpha), _decay(m.beta)
    return Dynamics(beta, 1.0, "snntorch.Synaptic", syn_decay=alpha, params=dict(alpha=alpha, beta=beta),
                    **_spikes(m))


def reset(m: nn.Module) -> None:
    """Zero the hidden state buffers (``mem``, and ``syn`` for Synaptic) like snntorch's
    ``reset_mem``. snntorch overwrites the attribute ``reset`` with a tensor during forward, so
    never call ``m.reset``."""
    if hasattr(m, "reset_mem"):
        m.reset_mem()
        return
    for name in ("syn", "mem"):
        v = getattr(m, name, None)
        if isinstance(v, torch.Tensor):
            setattr(m, name, torch.zeros_like(v))


# single-step: a model built of them either loops over time itself or is driven step by step
register(_snn.Leaky, leaky_dynamics, reset, step="hidden")
register(_snn.Synaptic, synaptic_dynamics, reset, step="hidden")
