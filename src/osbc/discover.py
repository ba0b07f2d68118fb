"""Find what to compress: weight layer -> optional BatchNorm -> spiking neuron, by execution order.

SNN forward passes loop over time, so ``torch.fx`` cannot trace them. Instead we run one
calibration batch with forward hooks on every leaf module and read the order in which they fire.
The same hooks tell how each weight layer is called, which is what turns its recorded inputs back
into a time-major ``[T, B, ...]`` tensor:

* ``"tb"``: once per forward with ``[T, B, ...]`` (Linear on multi-step tensors, spikingjelly layers);
* ``"flat"``: once with ``[T*B, ...]`` (convs wrapped so time is folded into the batch);
* ``"loop"``: T times with ``[B, ...]`` (snntorch-style models that loop over time in ``forward``).
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import kernels as K

__all__ = ["Target", "find_modules", "Recorder", "WEIGHT_TYPES"]

WEIGHT_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d)
# Modules that may sit between the weight layer (or its BN) and the neuron without changing the
# membrane objective: they act per element and identically at every time step.
_TRANSPARENT = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Flatten, nn.Unflatten, nn.Identity)
_BN = (nn.BatchNorm1d, nn.BatchNorm2d)


@dataclass
class Target:
    """One compressible module: a weight layer and what follows it."""

    name: str
    layer: nn.Module
    bn: nn.Module | None
    neuron: nn.Module | None
    neuron_name: str | None
    kernel: K.Kernel
    mode: str  # how the layer is called: "tb", "flat" or "loop"

    @property
    def kind(self) -> str:
        return type(self.layer).__name__

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.layer.weight.shape)

    @property
    def rows(self) -> int:
        return self.layer.weight.shape[0]

    @property
    def cols(self) -> int:
        return self.layer.weight[0].numel()

    def weight2d(self) -> Tensor:
        return self.layer.weight.detach().reshape(self.rows, -1)

    def bn_gain(self) -> Tensor | None:
        """a_c = gamma_c / sqrt(var_c + eps): BN's per-row gain on the membrane (eval mode)."""
        if self.bn is None:
            return None
        bn = self.bn
        g = bn.weight.detach() if bn.weight is not None else torch.ones_like(bn.running_var)
        return (g / torch.sqrt(bn.running_var + bn.eps)).double()

    def describe_kernel(self) -> str:
        return self.kernel.describe() if not self.kernel.is_identity else "identity (no neuron follows)"

    # -- the layer as a function of its weight (bias-free), on time-major input -----------------
    def apply(self, x_tb: Tensor, weight2d: Tensor) -> Tensor:
        """Output currents of the layer for input ``[T, B, ...]`` and weights ``[R, d]``, no bias."""
        w = weight2d.reshape(self.layer.weight.shape).to(x_tb.dtype)
        T, B = x_tb.shape[:2]
        if isinstance(self.layer, nn.Linear):
            return x_tb @ w.t()
        L = self.layer
        conv = F.conv1d if isinstance(L, nn.Conv1d) else F.conv2d
        if L.padding_mode != "zeros":
            raise ValueError(f"{self.name}: padding_mode={L.padding_mode!r} is not supported")
        y = conv(x_tb.flatten(0, 1), w, None, L.stride, L.padding, L.dilation, L.groups)
        return y.unflatten(0, (T, B))

    def patches(self, x_tb: Tensor) -> Tensor:
        """Time-major rows of the layer's input matrix: ``[T, samples, d]`` (conv: every output
        position of every sample is one row, unfolded as ``weight.reshape(R, -1)`` expects)."""
        T = x_tb.shape[0]
        L = self.layer
        if isinstance(L, nn.Linear):
            return x_tb.reshape(T, -1, x_tb.shape[-1])
        x = x_tb.flatten(0, 1)
        if isinstance(L, nn.Conv1d):
            x = x.unsqueeze(-2)
            k, s, p, d = (1, L.kernel_size[0]), (1, L.stride[0]), (0, L.padding[0]), (1, L.dilation[0])
        else:
            k, s, p, d = L.kernel_size, L.stride, L.padding, L.dilation
        cols = F.unfold(x, k, dilation=d, padding=p, stride=s)  # [T*B, d, positions]
        return cols.transpose(1, 2).reshape(T, -1, cols.shape[1])

    def samples_per_item(self, x_tb: Tensor) -> int:
        """How many Hessian rows one sample of ``x_tb`` yields (spatial positions for convs)."""
        return self.patches(x_tb[:1, :1]).shape[1]


def _leaf(m: nn.Module) -> bool:
    return next(m.children(), None) is None


def _is_weight(m: nn.Module) -> bool:
    return isinstance(m, WEIGHT_TYPES) and (not isinstance(m, (nn.Conv1d, nn.Conv2d)) or m.groups == 1)


def run_model(model: nn.Module, x_tb: Tensor) -> Tensor:
    """One clean forward: neuron state cleared before and after."""
    from .snn import reset

    reset(model)
    try:
        return model(x_tb)
    finally:
        reset(model)


def find_modules(model: nn.Module, sample: Tensor, include: list[str] | str | None = None,
                 exclude: list[str] | str | None = None) -> list[Target]:
    """The compressible modules of ``model`` in execution order.

    ``sample``: a time-major batch ``[T, B, ...]``. ``include``/``exclude``: glob patterns on module
    names (``"fc*"``, ``"features.0"``). Raises ``ValueError`` when the model rejects the sample or
    nothing is left to compress."""
    T, B = sample.shape[:2]
    names = {m: n for n, m in model.named_modules()}
    events: list[tuple[nn.Module, tuple]] = []

    def hook(m, inp, out):
        x = inp[0] if inp and isinstance(inp[0], Tensor) else None
        events.append((m, tuple(x.shape) if x is not None else ()))

    # Neurons may own child modules (spikingjelly's surrogate functions): hook the neuron, not them.
    inside = {id(c) for n in model.modules() if K.is_neuron(n) for c in n.modules() if c is not n}
    handles = [m.register_forward_hook(hook) for m in model.modules()
               if id(m) not in inside and (_leaf(m) or _is_weight(m) or K.is_neuron(m))]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            run_model(model, sample)
    except Exception as e:  # noqa: BLE001 - a model rejecting the input is a user error
        raise ValueError(f"the model rejected calibration input of shape {tuple(sample.shape)} "
                         f"(time-major [T, B, ...]): {type(e).__name__}: {e}") from e
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)

    calls: dict[nn.Module, list[tuple]] = {}
    for m, shp in events:
        calls.setdefault(m, []).append(shp)

    def mode_of(m: nn.Module) -> str:
        shapes = calls[m]
        s = shapes[0]
        if T > 1 and len(shapes) == T and s and s[0] == B:
            return "loop"
        if len(shapes) == 1 and s:
            batched = next((n for c, n in ((nn.Conv1d, 3), (nn.Conv2d, 4)) if isinstance(m, c)), None)
            if batched is None:  # Linear: any number of feature dims
                if len(s) >= 3 and s[:2] == (T, B):
                    return "tb"
                if s[0] == T * B:
                    return "flat"
            elif len(s) == batched + 1 and s[:2] == (T, B):
                return "tb"
            elif len(s) == batched and s[0] == T * B:
                return "flat"
        raise ValueError(f"{names[m]}: cannot tell time from batch in its calls {shapes[:3]} for a "
                         f"[T={T}, B={B}] input; feed [T, B, ...] tensors to the model")

    inc = [include] if isinstance(include, str) else include
    exc = [exclude] if isinstance(exclude, str) else (exclude or [])
    targets, seen = [], set()
    for i, (m, _) in enumerate(events):
        if not _is_weight(m) or m in seen:
            continue
        seen.add(m)
        name = names[m]
        if inc is not None and not any(fnmatch.fnmatchcase(name, p) for p in inc):
            continue
        if any(fnmatch.fnmatchcase(name, p) for p in exc):
            continue
        bn = neuron = None
        for nxt, _ in events[i + 1:]:
            if isinstance(nxt, _BN) and bn is None:
                bn = nxt
            elif isinstance(nxt, _TRANSPARENT):
                continue
            elif K.is_neuron(nxt):
                neuron = nxt
                break
            else:
                break
        mode = mode_of(m)
        if neuron is None:
            kernel = K.Kernel.identity()
        else:
            nshape = calls[neuron][0]
            nmode = "tb" if len(calls[neuron]) == 1 and nshape[:2] == (T, B) else "other"
            feat = nshape[2:] if nmode == "tb" else nshape[1:]
            axis = len(feat) - 1 if isinstance(m, nn.Linear) else 0
            try:
                kernel = K.kernel_of(neuron, feat, T).for_rows(tuple(feat), axis, names[neuron])
            except K.KernelError as e:
                raise K.KernelError(f"{names[neuron]} (after {name}): {e}") from e
        targets.append(Target(name, m, bn, neuron, names.get(neuron), kernel, mode))
    if not targets:
        raise ValueError("found nothing to compress: the model has no Linear/Conv1d/Conv2d layer that runs "
                         "on this input" + (" and matches include/exclude" if inc or exc else ""))
    return targets


class Recorder:
    """Hooks on target layers that hand each forward's inputs, time-major, to ``callback``.

    ``stop_after``: the target after whose input the forward may be abandoned (sequential
    calibration needs nothing downstream of the layer being compressed)."""

    class _Stop(Exception):
        pass

    def __init__(self, targets: list[Target], callback: Callable[[Target, Tensor], None],
                 stop_after: Target | None = None):
        self.targets, self.callback, self.stop_after = targets, callback, stop_after
        self._buf: dict[int, list[Tensor]] = {}
        self._handles = []

    def __enter__(self) -> "Recorder":
        for i, t in enumerate(self.targets):
            self._handles.append(t.layer.register_forward_pre_hook(self._make_hook(i)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _make_hook(self, i: int):
        t = self.targets[i]

        def hook(m, inp):
            self._buf.setdefault(i, []).append(inp[0].detach())
            if t is self.stop_after and t.mode != "loop":
                raise Recorder._Stop

        return hook

    def run(self, model: nn.Module, x_tb: Tensor) -> None:
        """One forward of ``model`` on ``x_tb``; then deliver what each target saw."""
        self._buf.clear()
        T, B = x_tb.shape[:2]
        try:
            with torch.no_grad():
                run_model(model, x_tb)
        except Recorder._Stop:
            from .snn import reset

            reset(model)
        for i, xs in self._buf.items():
            t = self.targets[i]
            if t.mode == "loop":
                x = torch.stack(xs[:T])
            elif t.mode == "flat":
                x = xs[0].unflatten(0, (T, B))
            else:
                x = xs[0]
            self.callback(t, x)
        self._buf.clear()


def batches(calib, batch_size: int = 32) -> Iterator[Tensor]:
    """Calibration data as time-major ``[T, B, ...]`` float batches.

    ``calib``: a tensor ``[N, T, ...]`` or an iterable of ``x`` / ``(x, y, ...)`` batches
    ``[B, T, ...]`` (the dataset convention)."""
    if isinstance(calib, Tensor):
        if calib.dim() < 3:
            raise ValueError(f"calibration tensor must be [N, T, ...], got shape {tuple(calib.shape)}")
        items: Iterator = iter(calib.split(batch_size))
    else:
        try:
            items = iter(calib)
        except TypeError:
            raise ValueError(f"calib must be a tensor [N, T, ...] or an iterable of batches, "
                             f"got {type(calib).__name__}") from None
    for x in items:
        if isinstance(x, (tuple, list)):
            x = x[0]
        if not isinstance(x, Tensor):
            x = torch.as_tensor(x)
        if x.dim() < 3:
            raise ValueError(f"calibration batches must be [B, T, ...], got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            x = x.float()
        if not torch.isfinite(x).all():
            raise ValueError("calibration data contains NaN or Inf; clean the inputs")
        yield x.transpose(0, 1)
