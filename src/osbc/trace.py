"""One hooked forward pass: which layers a model calls, in what order, on what shapes.

SNN forward passes loop over time, so ``torch.fx`` cannot trace them. Instead :func:`trace` runs
one batch (the way the model wants to be called: whole sequence, step by step, or one static frame;
see :mod:`osbc.drive`, chosen by :func:`_choose`) with forward hooks on every leaf module (a neuron counts as a leaf: spikingjelly's call
their surrogate function as a child module) and records each module's calls with their shapes, and
which module calls each one's input was computed from (:attr:`Call.sources`): every module output
is tagged with its call, and the tags follow the tensors through the operations between modules
(``a + b``, views, indexing, stacking). That one record serves

* discovery (:func:`find_modules`): weight layer -> optional BatchNorm -> spiking neuron;
* calibration (:class:`Recorder`): a target layer's inputs, turned back into ``[T, B, ...]``;
* NIR export (:mod:`osbc.nir_export`): the chain of layers with per-sample feature shapes.

How a module is called tells time from batch (:attr:`Call.mode`):

* ``"tb"``: once per forward with ``[T, B, ...]`` (Linear on multi-step tensors, spikingjelly layers);
* ``"flat"``: once with ``[T*B, ...]`` (convs wrapped so time is folded into the batch);
* ``"loop"``: T times with ``[B, ...]`` (snntorch-style models that loop over time in ``forward``,
  and single-step models that osbc drives step by step);
* ``"batch"``: once with ``[B, ...]`` (e.g. a readout on the time-averaged output).

Discovery follows the data flow back from each neuron's input: through element-wise modules
(Dropout, Flatten, Identity), at most one BatchNorm, pooling (behind convs only) and the
operations between modules, so both convs of a spiking ResNet block whose neuron follows
``out += shortcut`` get that neuron's kernel. Pooling layers are per channel and the same at every
step, so a conv's rows stay the neuron's channels. Average pooling is linear and commutes with the
kernel: the membrane error is the pool of the filtered per-position errors, and osbc minimises the
filtered error at every position before the pool (an upper bound: the square of a mean is at most
the mean of the squares). Max pooling is not linear; osbc applies the neuron's kernel to the conv's
output as if the pool were absent (the Hessian of the conv uses the neuron's K at every position),
which is exact for the positions the max selects as long as the selection does not change.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils.weak import WeakIdKeyDictionary

from . import neurons
from .drive import (SEQUENCE, STATIC, Driver, StepFn, _first_tensor, _tensors, batches, repeat_count, run_model,
                    step_driver)
from .errors import OsbcError
from .kernels import Kernel, KernelError
from .layers import is_compressible
from .snn import reset

__all__ = ["Call", "Trace", "trace", "Target", "find_modules", "Recorder", "time_major", "batches", "run_model",
           "Driver"]

# Modules that may sit between the weight layer (or its BN) and the neuron without changing the
# membrane objective: they act per element and identically at every time step.
_TRANSPARENT = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Flatten, nn.Unflatten, nn.Identity)
BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)
# Per-channel, time-invariant: a neuron after them still filters each conv output channel.
_POOLS = (nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d,
          nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d)
_CONV_DIMS = ((nn.Conv1d, 3), (nn.Conv2d, 4))  # dims of one batched call


# ---- the record ---------------------------------------------------------------------------------

class _Flow(TorchFunctionMode):
    """Tags every tensor computed outside the hooked modules with the module calls it came from
    (the union of its inputs' tags); the hooks tag each module's outputs with its own call."""

    def __init__(self):
        super().__init__()
        self.tags: WeakIdKeyDictionary = WeakIdKeyDictionary()

    def sources(self, x: Tensor | None) -> frozenset:
        return self.tags.get(x, frozenset()) if x is not None else frozenset()

    def mark(self, out, tag: frozenset) -> None:
        for t in _tensors(out):
            self.tags[t] = tag

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        src = frozenset().union(*(self.tags.get(t, ()) for t in _tensors((args, kwargs))))
        if src:
            # x[i] = y writes into x and returns nothing
            self.mark(args[0] if getattr(func, "__name__", "") == "__setitem__" else out, src)
        return out


def _layout(m: nn.Module | None, shapes: list[tuple], T: int, B: int) -> str | None:
    """How ``m`` was called (see the module docs), from the shapes of its calls; None if unclear."""
    if not shapes or not shapes[0]:
        return None
    s, n = shapes[0], len(shapes)
    if T > 1 and n == T and s[0] == B:
        return "loop"
    if n != 1:
        return None
    dims = next((d for c, d in _CONV_DIMS if isinstance(m, c)), None)
    if dims is not None:  # a conv's input rank says whether time is folded in
        return ("tb" if len(s) == dims + 1 and s[:2] == (T, B) else
                "flat" if len(s) == dims and s[0] == T * B else
                "batch" if len(s) == dims and s[0] == B else None)
    if s[:2] == (T, B) and len(s) >= (3 if isinstance(m, nn.Linear) else 2):
        return "tb"
    if s[0] == T * B:
        return "flat"
    return "batch" if s[0] == B else None


@dataclass(eq=False)
class Call:
    """A module's calls during a traced forward: input / output shapes of each call (calls without
    tensors left out), the call layout, the module calls whose outputs its (first) input was
    computed from, over all its calls, and - for pooling layers, where it matters (max pooling is
    an OR on spikes) - whether every input was binary."""

    module: nn.Module
    name: str
    in_shapes: list[tuple] = field(default_factory=list)
    out_shapes: list[tuple] = field(default_factory=list)
    binary_in: bool = True
    mode: str | None = None      # layout of the inputs (see the module docs)
    out_mode: str | None = None  # layout of the outputs (a Flatten(0, 1) turns "tb" into "flat")
    sources: set["Call"] = field(default_factory=set)
    index: int = 0               # place in the order of first calls

    @staticmethod
    def _feat(shapes: list[tuple], mode: str | None) -> tuple[int, ...]:
        if not shapes:
            return ()
        return shapes[0][2:] if mode == "tb" else shapes[0][1:]

    @property
    def feat_in(self) -> tuple[int, ...]:
        """One time step of one sample of the input (e.g. ``(C, H, W)``)."""
        return self._feat(self.in_shapes, self.mode)

    @property
    def feat_out(self) -> tuple[int, ...]:
        return self._feat(self.out_shapes, self.out_mode)

    @property
    def lead(self) -> int:
        """Leading (time / batch) dims of the input: 2 for ``"tb"``, else 1."""
        return len(self.in_shapes[0]) - len(self.feat_in) if self.in_shapes else 0


@dataclass
class Trace:
    """The modules a forward called, in the order of their first call."""

    T: int
    B: int
    calls: list[Call]
    driver: Driver = SEQUENCE  # how the model was run (see osbc.drive)


def _leaf(m: nn.Module) -> bool:
    return next(m.children(), None) is None


def _record(model: nn.Module, sample: Tensor, driver: Driver) -> list[Call]:
    """Run ``driver(model, sample)`` with hooks on every leaf module; the calls in order (layouts
    not set). Exceptions of the model propagate."""
    names = {m: n for n, m in model.named_modules()}
    by_module: dict[nn.Module, Call] = {}
    order: list[Call] = []
    flow = _Flow()

    def hook(m, args, kwargs, out):
        c = by_module.get(m)
        if c is None:
            c = by_module[m] = Call(m, names.get(m, type(m).__name__))
        x, y = _first_tensor(args), _first_tensor(out)
        if x is None:
            x = _first_tensor(kwargs)
        c.sources |= flow.sources(x)
        flow.mark(out, frozenset((c,)))
        if x is None or y is None:
            return
        if not c.in_shapes:
            c.index = len(order)
            order.append(c)
        c.in_shapes.append(tuple(x.shape))
        c.out_shapes.append(tuple(y.shape))
        if c.binary_in and isinstance(m, _POOLS) and x.is_floating_point():
            c.binary_in = bool(((x == 0) | (x == 1)).all())

    # Neurons may own child modules (spikingjelly's surrogate functions): hook the neuron, not them.
    inside = {id(c) for n in model.modules() if neurons.is_neuron(n) for c in n.modules() if c is not n}
    handles = [m.register_forward_hook(hook, with_kwargs=True) for m in model.modules()
               if id(m) not in inside and (_leaf(m) or is_compressible(m) or neurons.is_neuron(m))]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), flow:
            driver(model, sample)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return order


def _one_line(e: Exception) -> str:
    return f"{type(e).__name__}: " + " ".join(str(e).split())


def _whole_sequence_steps(calls: list[Call], T: int, B: int) -> list[Call]:
    """Single-step neurons that took ``[T, B, ...]`` tensors as one step: the model does not loop
    over time (it must be driven step by step), or loops over a static frame of its own (it must be
    given the frame)."""
    return [c for c in calls if T > 1 and neurons.is_neuron(c.module) and neurons.step_kind(c.module)
            and any(s[:2] == (T, B) for s in c.in_shapes)]


def _choose(model: nn.Module, sample: Tensor) -> tuple[Driver, list[Call]]:
    """The driver of ``model`` (see :mod:`osbc.drive`) and its calls on ``sample``: the whole
    sequence, unless the model rejects it or its single-step neurons take it as one step; then one
    static frame (if the frames are equal and the model repeats it), or step by step."""
    T, B = sample.shape[:2]
    try:
        calls = _record(model, sample, SEQUENCE)
        why = ""
        swallowed = _whole_sequence_steps(calls, T, B)
        if not swallowed:
            return SEQUENCE, calls
        why = (f"its single-step neuron {swallowed[0].name} took [T, B, ...] tensors as one step, "
               "and driving it step by step failed")
    except Exception as e:  # noqa: BLE001 - a model rejecting the input is a user error
        why = f"the model rejected the input of shape {tuple(sample.shape)} (time-major [T, B, ...]): " \
              f"{_one_line(e)}"
    candidates = [STATIC] if T > 1 and bool((sample == sample[:1]).all()) else []
    candidates.append(step_driver(model))
    for d in candidates:
        try:
            calls = _record(model, sample, d)
        except Exception:  # noqa: BLE001 - try the next way of calling it
            continue
        if d is not STATIC:
            return d, calls
        n = repeat_count(calls, B)
        if n is None:
            continue  # it ran one step: a single-step model
        if n != T:
            raise OsbcError(f"the model repeats its static input {n} times, but the calibration frames were "
                            f"repeated {T} times; pass time_steps={n}")
        return d, calls
    raise OsbcError(f"{why}; nor does it take one step [B, ...] at a time: pass step_fn=(model, x_t, state) -> "
                    "(output, state) to run it one step, or time_steps=T if the samples are static frames "
                    "without a time axis")


def trace(model: nn.Module, sample: Tensor, step_fn: StepFn | None = None) -> Trace:
    """Run ``model`` once on ``sample`` (time-major ``[T, B, ...]``, eval mode, no grad, neuron
    state reset before and after) and record every leaf module's calls. The model's mode, state and
    parameters are left as they were.

    How the model is run (:class:`osbc.drive.Driver`) is found from how it reacts (see
    :func:`_choose`), or given: ``step_fn(model, x_t, state) -> (output, state)`` runs one step.
    Raises :class:`OsbcError` when the model cannot be run on the input."""
    T, B = sample.shape[:2]
    if step_fn is None:
        driver, order = _choose(model, sample)
    else:
        driver = Driver("user", step_fn)
        try:
            order = _record(model, sample, driver)
        except Exception as e:  # noqa: BLE001 - a failing step_fn is a user error
            raise OsbcError(f"step_fn failed on one step of shape {tuple(sample.shape[1:])}: "
                            f"{_one_line(e)}") from e
    stepped = driver.kind in ("step", "state", "user")
    for c in order:
        c.mode = _layout(c.module, c.in_shapes, T, B)
        c.out_mode = _layout(None, c.out_shapes, T, B)
        if stepped and T == 1:  # [B, ...] = [T*B, ...]: one step of the loop over a one-frame input
            c.mode = "loop" if c.mode in ("batch", "flat") else c.mode
            c.out_mode = "loop" if c.out_mode in ("batch", "flat") else c.out_mode
    return Trace(T, B, order, driver)


# ---- discovery ------------------------------------------------------------------------------------

@dataclass
class Target:
    """One compressible module: a weight layer and what follows it."""

    name: str
    layer: nn.Module
    bn: nn.Module | None
    neuron: nn.Module | None
    neuron_name: str | None
    kernel: Kernel
    mode: str  # how the layer is called: "tb", "flat" or "loop"
    driver: Driver = SEQUENCE  # how the model is run (see osbc.drive)

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
            raise OsbcError(f"{self.name}: padding_mode={L.padding_mode!r} is not supported")
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


def _kernel(call: Call, layer: str, T: int, channel_axis: int) -> Kernel:
    """The neuron's kernel, mapped onto the rows of the weight layer ``layer`` that feeds it."""
    feat = call.feat_in
    try:
        return neurons.kernel_of(call.module, feat, T).for_rows(tuple(feat), channel_axis, call.name)
    except KernelError as e:
        raise KernelError(f"{call.name} (after {layer}): {e}") from e


def _feeders(neuron: Call) -> Iterator[tuple[Call, nn.Module | None]]:
    """The weight-layer calls whose outputs reach ``neuron``'s input, each with the BatchNorm on
    its way (or None): back through element-wise modules, at most one BatchNorm, pooling (convs
    only: pooling a Linear's output mixes its rows) and the operations between modules."""
    stack = [(c, None, False) for c in sorted(neuron.sources, key=lambda c: -c.index)]
    seen = set()
    while stack:
        item = stack.pop()
        if item in seen:
            continue
        seen.add(item)
        c, bn, pooled = item
        m = c.module
        if is_compressible(m):
            if not (pooled and isinstance(m, nn.Linear)):
                yield c, bn
            continue
        if isinstance(m, BATCH_NORMS):
            if bn is not None:
                continue
            bn = m
        elif isinstance(m, _POOLS):
            pooled = True
        elif not isinstance(m, _TRANSPARENT):
            continue
        stack.extend((s, bn, pooled) for s in sorted(c.sources, key=lambda c: -c.index))


def find_modules(model: nn.Module, sample: Tensor, include: list[str] | str | None = None,
                 exclude: list[str] | str | None = None, *, step_fn: StepFn | None = None) -> list[Target]:
    """The compressible modules of ``model`` in execution order, each with the BatchNorm and the
    neuron its output reaches (see the module docs; no neuron: the identity kernel).

    ``sample``: a time-major batch ``[T, B, ...]``. ``include``/``exclude``: glob patterns on module
    names (``"fc*"``, ``"features.0"``). ``step_fn``: how to run the model one step (see
    :func:`trace`; by default found from how the model reacts to ``sample``); every target carries
    the driver. Raises :class:`OsbcError` when the model rejects the sample or nothing is left to
    compress."""
    tr = trace(model, sample, step_fn)
    T, B = tr.T, tr.B
    fed: dict[Call, tuple[Call, nn.Module | None]] = {}
    for n in tr.calls:
        if neurons.is_neuron(n.module):
            for c, bn in _feeders(n):
                fed.setdefault(c, (n, bn))  # a layer feeding several neurons: the first one
    inc = [include] if isinstance(include, str) else include
    exc = [exclude] if isinstance(exclude, str) else (exclude or [])
    targets = []
    for c in tr.calls:
        m, name = c.module, c.name
        if not is_compressible(m):
            continue
        if inc is not None and not any(fnmatch.fnmatchcase(name, p) for p in inc):
            continue
        if any(fnmatch.fnmatchcase(name, p) for p in exc):
            continue
        if c.mode not in ("tb", "flat", "loop"):
            raise OsbcError(f"{name}: cannot tell time from batch in its calls {c.in_shapes[:3]} for a "
                            f"[T={T}, B={B}] input; feed [T, B, ...] tensors to the model (calibration batches "
                            "[B, T, ...]; time_first=True for [T, B, ...], time_steps=T for static [B, ...])")
        neuron, bn = fed.get(c, (None, None))
        if neuron is None:
            kernel = Kernel.identity()
        else:
            axis = len(neuron.feat_in) - 1 if isinstance(m, nn.Linear) else 0
            kernel = _kernel(neuron, name, T, axis)
            if kernel.shape.numel() not in (1, m.weight.shape[0]):
                raise KernelError(f"{neuron.name} (after {name}): per-neuron parameters for "
                                  f"{kernel.shape.numel()} channels, but {name} has {m.weight.shape[0]} "
                                  "output rows; give the neuron one parameter per row of this layer")
        targets.append(Target(name, m, bn, None if neuron is None else neuron.module,
                              None if neuron is None else neuron.name, kernel, c.mode, tr.driver))
    if not targets:
        raise OsbcError("found nothing to compress: the model has no Linear/Conv1d/Conv2d layer that runs "
                        "on this input" + (" and matches include/exclude" if inc or exc else ""))
    return targets


# ---- calibration ----------------------------------------------------------------------------------

def time_major(xs: list[Tensor], mode: str, T: int, B: int) -> Tensor:
    """A layer's inputs from one forward (one tensor per call), as ``[T, B, ...]``."""
    if mode == "loop":
        return torch.stack(xs[:T])
    if mode == "flat":
        return xs[0].unflatten(0, (T, B))
    return xs[0]


class Recorder:
    """Hooks on target layers that hand each forward's inputs, time-major, to ``callback``.

    ``stop_after``: the target after whose input the forward may be abandoned (sequential
    calibration needs nothing downstream of the layer being compressed). The model is run the way
    :func:`find_modules` found (the targets' driver)."""

    class _Stop(Exception):
        pass

    def __init__(self, targets: list[Target], callback: Callable[[Target, Tensor], None],
                 stop_after: Target | None = None):
        self.targets, self.callback, self.stop_after = targets, callback, stop_after
        self.driver = targets[0].driver if targets else SEQUENCE
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
                self.driver(model, x_tb)
        except Recorder._Stop:
            reset(model)
        for i, xs in self._buf.items():
            t = self.targets[i]
            self.callback(t, time_major(xs, t.mode, T, B))
        self._buf.clear()
