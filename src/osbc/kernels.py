"""Membrane kernels: the linear filter from a neuron's input current to its membrane potential.

With reset and threshold ignored, every common spiking neuron is a small linear time-invariant
system, so ``u = K I`` with ``K`` lower-triangular Toeplitz, ``K[t, s] = h[t - s]``. A
:class:`Kernel` stores that system in state-space form (``s[t] = A s[t-1] + B i[t]``,
``u[t] = C s[t]``), which applies ``K`` as an O(T) recurrence and also covers measured (FIR)
kernels exactly. Coefficients carry a leading parameter shape so that per-neuron time constants
give each output row its own kernel.

Which kernel a given neuron module has is the neuron registry's business (:mod:`osbc.neurons`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from .errors import OsbcError

__all__ = ["Kernel", "KernelError"]


class KernelError(OsbcError):
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
