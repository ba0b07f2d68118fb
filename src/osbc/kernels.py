"""Membrane kernels: the linear filter from a neuron's input current to its membrane potential.

With reset and threshold ignored, every common spiking neuron is a small linear time-invariant
system, so ``u = K I`` with ``K`` lower-triangular Toeplitz, ``K[t, s] = h[t - s]``. A
:class:`Kernel` stores that system in state-space form (``s[t] = A s[t-1] + B i[t]``,
``u[t] = C s[t]``), which applies ``K`` as an O(T) recurrence and also covers measured (FIR)
kernels exactly. Coefficients carry a leading parameter shape so that per-neuron time constants
give each output row its own kernel.

Neuron families are registered with :func:`register` (kernel + state reset); anything else that
looks like a neuron is probed numerically with an impulse while spiking is switched off.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor, nn

from . import snn

__all__ = ["Kernel", "register", "kernel_of", "is_neuron", "reset_module", "probe_kernel", "KernelError"]


class KernelError(ValueError):
    """A neuron whose membrane kernel cannot be determined."""


@dataclass
class Kernel:
    """A causal LTI kernel as a state-space system with parameter shape ``P`` (``()`` = shared).

    ``A``: ``[*P, S, S]``, ``B``: ``[*P, S]``, ``C``: ``[*P, S]`` (float64).
    """

    A: Tensor
    B: Tensor
    C: Tensor
    name: str = "kernel"
    params: dict = field(default_factory=dict)

    # ---- constructors -------------------------------------------------------------------------
    @staticmethod
    def _t(v) -> Tensor:
        return torch.as_tensor(v, dtype=torch.float64).detach().cpu()

    @classmethod
    def first_order(cls, decay, gain=1.0, name="kernel", **params) -> "Kernel":
        """h[n] = gain * decay^n (LIF, IF, leaky integrators); ``decay``/``gain`` may be tensors."""
        decay, gain = torch.broadcast_tensors(cls._t(decay), cls._t(gain))
        return cls(decay[..., None, None].clone(), gain[..., None].clone(), torch.ones_like(gain)[..., None],
                   name, params)

    @classmethod
    def second_order(cls, d1, d2, gain=1.0, name="kernel", **params) -> "Kernel":
        """h[n] = gain * sum_{i+j=n} d1^i d2^j: a current filter (decay d1) feeding a membrane
        (decay d2). Equals gain (d2^(n+1) - d1^(n+1)) / (d2 - d1), and gain (n+1) d^n when equal,
        without the division (the cascade form is exact for equal decays too)."""
        d1, d2, gain = torch.broadcast_tensors(cls._t(d1), cls._t(d2), cls._t(gain))
        z = torch.zeros_like(d1)
        A = torch.stack([torch.stack([d1, z], -1), torch.stack([d1, d2], -1)], -2)  # s2 += s1_new
        B = torch.stack([torch.ones_like(d1), torch.ones_like(d1)], -1)
        C = torch.stack([z, gain], -1)
        return cls(A, B, C, name, params)

    @classmethod
    def fir(cls, h, name="measured", **params) -> "Kernel":
        """An explicit impulse response ``h`` of shape ``[*P, L]`` (shift-register state)."""
        h = cls._t(h)
        L = h.shape[-1]
        A = torch.diag_embed(torch.ones(L - 1, dtype=torch.float64), offset=-1).expand(*h.shape[:-1], L, L)
        B = torch.zeros(L, dtype=torch.float64)
        B[0] = 1
        return cls(A.clone(), B.expand(*h.shape[:-1], L).clone(), h.clone(), name, params)

    @classmethod
    def identity(cls) -> "Kernel":
        """h = [1, 0, 0, ...]: the loss on the input current (OBC)."""
        return cls.first_order(0.0, 1.0, name="identity")

    # ---- properties ---------------------------------------------------------------------------
    @property
    def shape(self) -> torch.Size:
        return self.B.shape[:-1]

    @property
    def states(self) -> int:
        return self.B.shape[-1]

    @property
    def is_identity(self) -> bool:
        return self.name == "identity"

    def impulse(self, T: int) -> Tensor:
        """h[0..T-1], shape ``[*P, T]``."""
        x = torch.zeros(T, *self.shape, dtype=torch.float64)
        x[0] = 1
        return self._run(x, self.A, self.B, self.C).movedim(0, -1)

    def toeplitz(self, T: int) -> Tensor:
        """The explicit ``[*P, T, T]`` matrix K (for tests and small problems)."""
        h = self.impulse(T)
        idx = torch.arange(T)
        lag = idx[:, None] - idx[None, :]
        K = h[..., lag.clamp(min=0)]
        return K * (lag >= 0)

    def describe(self, n: int = 4) -> str:
        args = ", ".join(f"{k}={_fmt(v)}" for k, v in self.params.items())
        if self.shape.numel() == 1:
            h = ", ".join(f"{v:.3g}" for v in self.impulse(n).reshape(-1).tolist())
            return f"{self.name}({args}) h=[{h}, ...]"
        return f"{self.name}({args}) per-neuron x{self.shape.numel()}"

    # ---- application --------------------------------------------------------------------------
    def apply(self, x: Tensor, channel_dim: int | None = None) -> Tensor:
        """Filter ``x`` along dim 0 (time). A shared kernel (``P = ()``) applies to every element;
        a per-row kernel (``P = (R,)``) maps its rows onto ``channel_dim`` of ``x``."""
        A, B, C = (t.to(device=x.device, dtype=x.dtype) for t in (self.A, self.B, self.C))
        if self.shape.numel() == 1:
            return self._run(x, A.reshape(self.states, self.states), B.reshape(-1), C.reshape(-1))
        if channel_dim is None or x.shape[channel_dim] != self.shape.numel():
            raise ValueError(f"per-row kernel with {self.shape.numel()} rows needs channel_dim of that size")
        xm = x.movedim(channel_dim, -1)
        S = self.states
        y = self._run(xm, A.reshape(-1, S, S), B.reshape(-1, S), C.reshape(-1, S))
        return y.movedim(-1, channel_dim)

    @staticmethod
    def _run(x: Tensor, A: Tensor, B: Tensor, C: Tensor) -> Tensor:
        # The coefficients' leading shape (if any) broadcasts against x's trailing dims.
        S = B.shape[-1]
        out = torch.empty_like(x)
        if S == 1:
            a, b, c = A[..., 0, 0], B[..., 0], C[..., 0]
            s = torch.zeros_like(x[0])
            for t in range(x.shape[0]):
                s = a * s + b * x[t]
                out[t] = c * s
            return out
        s = torch.zeros(*x.shape[1:], S, dtype=x.dtype, device=x.device)
        At = A.transpose(-1, -2)
        for t in range(x.shape[0]):
            s = (s.unsqueeze(-2) @ At).squeeze(-2) + x[t].unsqueeze(-1) * B
            out[t] = (s * C).sum(-1)
        return out

    # ---- per-row views ------------------------------------------------------------------------
    def for_rows(self, feature_shape: tuple[int, ...], channel_axis: int, layer: str = "layer") -> "Kernel":
        """Map the kernel's parameter shape onto the output rows of the layer before the neuron.

        ``feature_shape`` is one time step of one sample at the neuron (e.g. ``(R,)`` or
        ``(C, H, W)``), ``channel_axis`` the axis of the weight layer's output rows in it. Returns a
        shared kernel when all neurons agree, else one with ``P = (R,)``."""
        if self.shape.numel() == 1:
            return Kernel(self.A.reshape(self.states, self.states), self.B.reshape(-1), self.C.reshape(-1),
                          self.name, self.params)
        S = self.states
        try:
            coef = torch.cat([self.A.reshape(*self.shape, S * S), self.B, self.C], -1)
            coef = coef.expand(*feature_shape, coef.shape[-1])
        except RuntimeError as e:
            raise KernelError(f"{layer}: neuron parameters of shape {tuple(self.shape)} do not broadcast to "
                              f"the neuron's input {tuple(feature_shape)}") from e
        coef = coef.movedim(channel_axis, 0).reshape(feature_shape[channel_axis], -1, coef.shape[-1])
        if not torch.all(coef == coef[:, :1]):
            raise KernelError(f"{layer}: neuron parameters vary within an output channel (e.g. per pixel); "
                              "osbc needs one kernel per output row")
        coef = coef[:, 0]
        if torch.all(coef == coef[:1]):
            coef = coef[0]
        A = coef[..., : S * S].reshape(*coef.shape[:-1], S, S)
        return Kernel(A, coef[..., S * S: S * S + S], coef[..., S * S + S:], self.name, self.params)

    def groups(self, rows: int) -> list[tuple[Tensor, "Kernel"]]:
        """Rows that share identical coefficients, as ``(row_indices, shared_kernel)`` pairs, so that
        one Hessian serves each group."""
        if len(self.shape) == 0:
            return [(torch.arange(rows), self)]
        S = self.states
        coef = torch.cat([self.A.reshape(-1, S * S), self.B.reshape(-1, S), self.C.reshape(-1, S)], -1)
        uniq, inv = torch.unique(coef, dim=0, return_inverse=True)
        out = []
        for g in range(uniq.shape[0]):
            rows = torch.nonzero(inv == g).reshape(-1)
            r = rows[0]
            out.append((rows, Kernel(self.A.reshape(-1, S, S)[r], self.B.reshape(-1, S)[r],
                                     self.C.reshape(-1, S)[r], self.name, self.params)))
        return out


def _fmt(v) -> str:
    if isinstance(v, Tensor):
        return f"{v.item():.4g}" if v.numel() == 1 else f"<{v.numel()} values>"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


# ---- registry ---------------------------------------------------------------------------------

@dataclass
class _Family:
    kernel: Callable[[nn.Module], Kernel]
    reset: Callable[[nn.Module], None] | None


_REGISTRY: dict[type, _Family] = {}
_NEURON_NAME = re.compile(r"(LIF|IF|Node|Neuron|Leaky|Synaptic|Spik|IAF|Izhikevich|Alpha|Lapicque|CUBA)", re.I)


def register(cls: type, kernel: Callable[[nn.Module], Kernel], reset: Callable[[nn.Module], None] | None = None):
    """Teach osbc a neuron type: ``kernel(module) -> Kernel`` and an optional state ``reset``."""
    _REGISTRY[cls] = _Family(kernel, reset)


def _lookup(cls: type) -> _Family | None:
    return next((_REGISTRY[c] for c in cls.__mro__ if c in _REGISTRY), None)


def _family(m: nn.Module) -> _Family | None:
    fam = _lookup(type(m))
    if fam is None:
        from . import interop   # another library's neuron: its adapter registers it on first sight
        if interop.load_for(type(m)):
            fam = _lookup(type(m))
    return fam


def is_neuron(m: nn.Module) -> bool:
    """Registered neuron types, and leaf modules that look like spiking neurons (a threshold
    attribute or a neuron-like class name) - the latter get a probed kernel."""
    if _family(m) is not None:
        return True
    if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.modules.batchnorm._BatchNorm)):
        return False
    if any(True for _ in m.children()):
        return False
    return hasattr(m, "v_threshold") or hasattr(m, "threshold") or bool(_NEURON_NAME.search(type(m).__name__))


def reset_module(m: nn.Module) -> None:
    fam = _family(m)
    if fam is not None and fam.reset is not None:
        fam.reset(m)
    elif fam is None and hasattr(m, "reset") and callable(m.reset) and is_neuron(m):
        m.reset()


def kernel_of(m: nn.Module, feature_shape: tuple[int, ...] | None = None, T: int = 32) -> Kernel:
    """The membrane kernel of neuron module ``m`` (registered family, else an impulse probe over
    ``feature_shape`` and ``T`` steps)."""
    fam = _family(m)
    if fam is not None:
        return fam.kernel(m)
    if feature_shape is None:
        raise KernelError(f"{type(m).__name__}: unknown neuron type and no input shape to probe it with")
    return probe_kernel(m, feature_shape, T)


# ---- probing ----------------------------------------------------------------------------------

_THRESHOLD_ATTRS = ("v_threshold", "threshold", "v_th", "thresh")
_STATE_ATTRS = ("v", "mem", "v_mem", "membrane", "u")
_THRESHOLD_OFF = 1e30


def probe_kernel(m: nn.Module, feature_shape: tuple[int, ...], T: int = 32, amplitude: float = 1e-3) -> Kernel:
    """Measure h[n] of an unknown neuron: drive a copy with an impulse while spiking is off.

    Spiking is switched off by ``spiking = False`` (osbc's neurons) or by an infinite threshold
    attribute; the membrane is read from the output (osbc) or from a state attribute after each
    single-step call. Response to zero input is subtracted so constant leaks cancel."""
    name = type(m).__name__
    try:
        probe = copy.deepcopy(m)
    except Exception as e:  # noqa: BLE001 - any copy failure means we cannot probe safely
        raise KernelError(f"{name}: cannot copy the neuron to probe its kernel ({e}); "
                          "register it with osbc.kernels.register") from e
    probe.train(False)
    if isinstance(probe, snn.BaseNode):
        probe.spiking = False
        read = None
    else:
        thr = [a for a in _THRESHOLD_ATTRS if hasattr(probe, a)]
        if not thr:
            raise KernelError(f"{name}: no threshold attribute ({', '.join(_THRESHOLD_ATTRS)}) to switch spiking "
                              "off; register the neuron with osbc.kernels.register")
        for a in thr:
            v = getattr(probe, a)
            # A huge finite threshold, not inf: a soft reset computes v - spike * threshold, and
            # 0 * inf = nan would poison the trace.
            setattr(probe, a, torch.full_like(v, _THRESHOLD_OFF) if isinstance(v, Tensor) else _THRESHOLD_OFF)
        read = next((a for a in _STATE_ATTRS if hasattr(probe, a)), None)
        if read is None:
            raise KernelError(f"{name}: no membrane state attribute ({', '.join(_STATE_ATTRS)}) to read; "
                              "register the neuron with osbc.kernels.register")

    def response(amp: float, dtype=torch.float64) -> Tensor:
        # float64 where the neuron allows it: the response to a small impulse is a difference.
        x = torch.zeros(T, 1, *feature_shape, dtype=dtype)
        x[0] = amp
        reset_module(probe)
        if hasattr(probe, "v") and read is None:
            probe.reset()
        with torch.no_grad():
            if read is None:
                return probe(x)[:, 0].double()
            out = []
            for t in range(T):
                probe(x[t: t + 1])
                v = getattr(probe, read)
                if not isinstance(v, Tensor):
                    v = torch.full((1, *feature_shape), float(v))
                out.append(v.reshape(1, *feature_shape)[0].double())
            return torch.stack(out)

    try:
        dtype = torch.float64
        try:
            base = response(0.0, dtype)
        except RuntimeError:  # a neuron with float32-only ops
            dtype = torch.float32
            base = response(0.0, dtype)
        r1 = (response(amplitude, dtype) - base) / amplitude
        r2 = (response(2 * amplitude, dtype) - base) / (2 * amplitude)
    except Exception as e:  # noqa: BLE001
        raise KernelError(f"{name}: probing the kernel failed ({type(e).__name__}: {e}); "
                          "register the neuron with osbc.kernels.register") from e
    if not torch.isfinite(r1).all() or not torch.allclose(r1, r2, rtol=1e-3, atol=1e-6):
        raise KernelError(f"{name}: the membrane response is not linear with spiking switched off; "
                          "register the neuron with osbc.kernels.register")
    h = r1.movedim(0, -1)  # [*feature_shape, T]
    return Kernel.fir(h, name=f"probed {name}")


# ---- osbc's own neurons -----------------------------------------------------------------------

def _lif_kernel(m: nn.Module) -> Kernel:
    tau = m.tau.detach().double()
    k = 1.0 / tau
    gain = k if m.decay_input else torch.ones_like(k)
    return Kernel.first_order(1.0 - k, gain, name=type(m).__name__, tau=tau, decay_input=m.decay_input)


register(snn.LIF, _lif_kernel, snn.BaseNode.reset)
register(snn.PLIF, _lif_kernel, snn.BaseNode.reset)
register(snn.IF, lambda m: Kernel.first_order(1.0, 1.0, name="IF"), snn.BaseNode.reset)
