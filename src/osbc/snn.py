"""Multi-step spiking neurons with spikingjelly's semantics, and state reset.

Every neuron takes ``[T, B, ...]`` input currents and returns ``[T, B, ...]`` spikes. The membrane
potential ``v`` of the last step is kept between calls (so a long sequence can be fed in chunks)
until :func:`reset` clears it. Spikes use a Heaviside forward pass and a surrogate gradient, so
models built from these layers train with ordinary backprop through time.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from . import neurons

__all__ = ["LIF", "IF", "PLIF", "BaseNode", "reset", "surrogate_spike"]


class _Heaviside(torch.autograd.Function):
    """Spike = Heaviside(x); the backward pass is the subclass's surrogate derivative."""

    @staticmethod
    def forward(ctx, x: Tensor, alpha: float) -> Tensor:
        ctx.save_for_backward(x)
        ctx.alpha = alpha
        return (x >= 0).to(x.dtype)


class _ATan(_Heaviside):
    # spikingjelly's ATan(alpha=2): d spike / dx = (alpha/2) / (1 + (pi/2 * alpha * x)^2)
    @staticmethod
    def backward(ctx, grad: Tensor):
        (x,) = ctx.saved_tensors
        a = ctx.alpha
        return grad * (a / 2) / (1 + (math.pi / 2 * a * x) ** 2), None


class _Sigmoid(_Heaviside):
    @staticmethod
    def backward(ctx, grad: Tensor):
        (x,) = ctx.saved_tensors
        s = torch.sigmoid(ctx.alpha * x)
        return grad * ctx.alpha * s * (1 - s), None


_SURROGATES = {"atan": (_ATan, 2.0), "sigmoid": (_Sigmoid, 4.0)}


def surrogate_spike(x: Tensor, kind: str = "atan", alpha: float | None = None) -> Tensor:
    """Heaviside(x) with the gradient of a smooth surrogate (``"atan"`` or ``"sigmoid"``)."""
    fn, default_alpha = _SURROGATES[kind]
    return fn.apply(x, default_alpha if alpha is None else alpha)


def _as_param(value, name: str) -> Tensor:
    t = torch.as_tensor(value, dtype=torch.float32).clone()
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} must be finite, got {value!r}")
    return t


class BaseNode(nn.Module):
    """Shared machinery: threshold, reset, surrogate, state. Subclasses define :meth:`charge`."""

    def __init__(self, v_threshold: float = 1.0, v_reset: float | None = 0.0, surrogate: str = "atan",
                 detach_reset: bool = False):
        super().__init__()
        if surrogate not in _SURROGATES:
            raise ValueError(f"surrogate must be one of {sorted(_SURROGATES)}, got {surrogate!r}")
        self.v_threshold = float(v_threshold)
        self.v_reset = None if v_reset is None else float(v_reset)
        self.surrogate = surrogate
        self.detach_reset = detach_reset
        self.v: Tensor | float = self._v0
        # Switching spikes off turns the neuron into its linear membrane filter (used to probe kernels).
        self.spiking = True

    @property
    def _v0(self) -> float:
        return 0.0 if self.v_reset is None else self.v_reset

    def reset(self) -> None:
        self.v = self._v0

    def charge(self, x: Tensor, v: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        v = self.v if isinstance(self.v, Tensor) else torch.full_like(x[0], self.v)
        out = []
        for t in range(x.shape[0]):
            v = self.charge(x[t], v)
            if not self.spiking:
                out.append(v)
                continue
            s = surrogate_spike(v - self.v_threshold, self.surrogate)
            sr = s.detach() if self.detach_reset else s
            if self.v_reset is None:
                v = v - sr * self.v_threshold
            else:
                v = v * (1 - sr) + self.v_reset * sr
            out.append(s)
        self.v = v
        return torch.stack(out)

    def extra_repr(self) -> str:
        return f"v_threshold={self.v_threshold}, v_reset={self.v_reset}, surrogate={self.surrogate!r}"


class LIF(BaseNode):
    """Leaky integrate-and-fire, spikingjelly ``LIFNode`` semantics.

    ``decay_input=True``:  v <- v + (x - (v - v_reset)) / tau
    ``decay_input=False``: v <- v - (v - v_reset) / tau + x
    (``v_reset=None`` = soft reset: subtract the threshold, decay towards 0.)
    ``tau`` is a float or a tensor of per-neuron time constants broadcastable to one time step
    ``[B, ...]`` of the input, e.g. ``[features]`` or ``[C, 1, 1]``.
    """

    def __init__(self, tau: float | Tensor = 2.0, decay_input: bool = True, v_threshold: float = 1.0,
                 v_reset: float | None = 0.0, surrogate: str = "atan", detach_reset: bool = False):
        super().__init__(v_threshold, v_reset, surrogate, detach_reset)
        tau = _as_param(tau, "tau")
        if (tau <= 1).any():
            raise ValueError(f"LIF tau must be > 1 (discrete-time decay 1 - 1/tau), got {tau.tolist()}")
        self.register_buffer("tau", tau)
        self.decay_input = decay_input

    def charge(self, x: Tensor, v: Tensor) -> Tensor:
        v0 = self._v0
        if self.decay_input:
            return v + (x - (v - v0)) / self.tau
        return v - (v - v0) / self.tau + x

    def extra_repr(self) -> str:
        tau = self.tau.item() if self.tau.numel() == 1 else f"tensor{tuple(self.tau.shape)}"
        return f"tau={tau}, decay_input={self.decay_input}, " + super().extra_repr()


class PLIF(BaseNode):
    """Parametric LIF (spikingjelly ``ParametricLIFNode``): 1/tau = sigmoid(w) with w learned."""

    def __init__(self, init_tau: float = 2.0, decay_input: bool = True, v_threshold: float = 1.0,
                 v_reset: float | None = 0.0, surrogate: str = "atan", detach_reset: bool = False):
        super().__init__(v_threshold, v_reset, surrogate, detach_reset)
        if init_tau <= 1:
            raise ValueError(f"PLIF init_tau must be > 1, got {init_tau}")
        self.w = nn.Parameter(torch.tensor(-math.log(init_tau - 1.0)))
        self.decay_input = decay_input

    @property
    def tau(self) -> Tensor:
        return 1.0 / torch.sigmoid(self.w.detach())

    def charge(self, x: Tensor, v: Tensor) -> Tensor:
        k = torch.sigmoid(self.w)
        v0 = self._v0
        if self.decay_input:
            return v + (x - (v - v0)) * k
        return v - (v - v0) * k + x


class IF(BaseNode):
    """Integrate-and-fire: v <- v + x."""

    def charge(self, x: Tensor, v: Tensor) -> Tensor:
        return v + x


def reset(model: nn.Module) -> nn.Module:
    """Clear the state of every stateful neuron in ``model`` (ours and, where installed, other
    libraries' - see :mod:`osbc.interop`), each the way the neuron registry says. Returns the model."""
    for m in model.modules():
        neurons.reset_module(m)
    return model


# ---- what the neuron registry knows about these neurons ------------------------------------------

def _reset_rule(m: BaseNode) -> dict:
    rest = 0.0 if m.v_reset is None else m.v_reset
    return dict(threshold=m.v_threshold, v_rest=rest, v_reset=rest,
                reset_mode="subtract" if m.v_reset is None else "zero")


def _lif_dynamics(m: nn.Module) -> neurons.Dynamics:
    # v <- v + (x - (v - v_rest)) / tau (decay_input) or v - (v - v_rest) / tau + x
    tau = m.tau.detach().double()
    k = 1.0 / tau
    gain = k if m.decay_input else torch.ones_like(k)
    return neurons.Dynamics(1.0 - k, gain, type(m).__name__, params=dict(tau=tau, decay_input=m.decay_input),
                            **_reset_rule(m))


def _if_dynamics(m: nn.Module) -> neurons.Dynamics:
    return neurons.Dynamics(1.0, 1.0, "IF", **_reset_rule(m))


neurons.register(LIF, _lif_dynamics, BaseNode.reset)
neurons.register(PLIF, _lif_dynamics, BaseNode.reset)
neurons.register(IF, _if_dynamics, BaseNode.reset)
