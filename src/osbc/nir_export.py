"""Export dense or compressed SNNs to NIR (the Neuromorphic Intermediate Representation).

    graph = osbc.export_nir(model, "net.nir", dt=1e-3, sample=x)   # x: [T, B, ...]
    nir.read("net.nir")

Works for models built from osbc's layers, spikingjelly, snntorch (models that loop over time in
``forward`` included) and norse. The graph comes from one traced forward pass on ``sample``
(:func:`osbc.trace.trace`; ``[T, B, ...]``, optional for osbc models, which know their input
shape): a node per layer, an edge from each layer whose output feeds another. A residual add
becomes two edges into one node (NIR sums a node's inputs). The graph is then run on the sample
(:func:`run_nir`) and compared with the model: what the trace cannot see (a merge other than a sum,
``torch.relu`` or an add of the raw input between layers) is refused, never written.
A neuron's node is built from its dynamics in the neuron registry (:mod:`osbc.neurons`): decays,
gain, threshold, reset value and reset mode.

Time-step convention (``dt`` = the duration of one discrete step, seconds)
-------------------------------------------------------------------------
NIR neurons are continuous-time ODEs; all of ours are discrete. We use the convention shared by
spikingjelly's and snntorch's NIR exporters and importers: a NIR neuron is simulated with
**forward Euler with step dt, the synaptic current updated first and used in the same step**:

* ``LIF``:  ``v <- v + dt/tau * (v_leak - v + r I)``
* ``CubaLIF``: ``I_s <- I_s + dt/tau_syn * (-I_s + w_in I)``; then
  ``v <- v + dt/tau_mem * (v_leak - v + r I_s)``
* ``IF``:  ``v <- v + dt * r I``
* spike when ``v > v_threshold`` (NIR), then ``v <- v_reset``.

Any discrete first-order neuron ``v <- d v + g x + (1 - d) v_rest`` then maps exactly to
``LIF(tau = dt / (1 - d), r = g / (1 - d), v_leak = v_rest)`` (``LI`` if it never spikes, ``IF`` if
``d = 1``), and a synaptic stage ``i <- d1 i + x`` feeding it to ``CubaLIF(tau_syn = dt / (1 - d1),
w_in = 1 / (1 - d1), ...)``. The importers accept only unit gains (``LIF`` r = 1, ``IF`` r = 1/dt,
``CubaLIF`` w_in = tau_syn/dt and r = tau_mem/dt), so the input gain G (``g / (1 - d)``; ``g`` for
IF; ``g1 g2`` for CubaLIF) is folded into the weights and bias of the layer before the neuron, which
is exact; a neuron with no such layer (on the graph input, after a merge, or a per-neuron gain behind
pooling) counts its voltage in units of G instead (threshold, reset and rest divided by G). Before
folding:

=========================================  =============================================
ours                                       NIR
=========================================  =============================================
osbc / spikingjelly LIF(tau), decay_input  LIF(tau = tau dt, r = 1, v_leak = v_reset)
... decay_input=False                      LIF(tau = tau dt, r = tau, v_leak = v_reset)
PLIF / ParametricLIFNode                   as LIF with tau = 1 / sigmoid(w)
IF / IFNode / norse IAF                    IF(r = 1 / dt)
snntorch Leaky(beta)                       LIF(tau = dt / (1 - beta), r = 1 / (1 - beta))
snntorch Synaptic(alpha, beta)             CubaLIF(tau_syn = dt/(1-alpha), w_in = 1/(1-alpha),
                                           tau_mem = dt/(1-beta), r = 1/(1-beta))
norse LIF / LIFCell (a = dt_n/tau_mem,     CubaLIF(tau_syn = dt/(1-b), w_in = 1/(1-b),
b = 1 - dt_n/tau_syn)                      tau_mem = dt/a, r = 1)
norse LIFBoxCell                           LIF(tau = dt/a, r = 1)
norse LI / LICell, LIBoxCell               CubaLI, LI
=========================================  =============================================

With ``dt`` equal to a norse module's own ``dt`` this gives back its time constants.
BatchNorm after a Linear/Conv is folded into that layer's weight and bias; Dropout and Identity
are dropped; osbc's ``Voting`` becomes a fixed ``Linear``; ``AdaptiveAvgPool2d`` becomes
``AvgPool2d`` when its output size divides its input size; ``MaxPool2d`` on binary spikes (checked
on the sample) becomes ``AvgPool2d`` + a LIF that fires iff a spike is in the window (an OR, the
same function on spikes; the importers have no ``Threshold`` node), and max pooling of anything
else (before a neuron) is refused: NIR has no max pooling. ``Flatten`` is written with negative
dims, which mean the same on NIR's batch-free shapes and on the importers' batched tensors.

What NIR cannot say: reset by subtraction (soft reset: spikingjelly ``v_reset=None``, snntorch's
default ``reset_mechanism="subtract"``) and no reset (snntorch ``"none"``) - exported as a reset to
``v_reset`` (0) with a warning;
spikingjelly fires on ``v >= threshold`` where NIR says ``>``; snntorch's ``reset_delay``.

Importers (tests/test_nir_roundtrip.py): snntorch 1.0's ``import_from_nir`` hard-codes
``dt = 1e-4`` (export with that dt) and maps ``IF`` to a leaky neuron; norse 1.1's ``from_nir``
ignores ``r`` of ``LIF``/``IF`` and has no ``AvgPool2d``; spikingjelly 2.0's
``nir_exchange.import_from_nir`` has no ``SumPool2d``. :func:`run_nir` simulates an exported graph
under the convention above, as a reference.
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from .errors import OsbcError
from .layers import WEIGHT_LAYERS
from .neurons import Dynamics, dynamics_of
from .nir_sim import run_nir
from .trace import BATCH_NORMS, Call, run_model, trace

__all__ = ["export_nir", "to_nir", "run_nir", "CONVENTION"]

CONVENTION = ("forward Euler with step dt; synaptic current updated first and used in the same step; "
              "spike when v > v_threshold, then v = v_reset")

_SKIP = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Identity)


# ---- neurons ----------------------------------------------------------------------------------

def _arr(v, shape) -> np.ndarray:
    t = torch.as_tensor(v, dtype=torch.float64).detach().cpu()
    try:
        return np.ascontiguousarray(np.broadcast_to(t.numpy(), shape)).astype(np.float32)
    except ValueError:
        raise OsbcError(f"neuron parameter of shape {tuple(t.shape)} does not broadcast to the layer's "
                         f"shape {shape}") from None


def _first_order(shape, dt, d, g, v_rest, v_th, v_reset, name, spiking=True):
    """v <- d v + g x + (1 - d) v_rest, spike at v_th, reset to v_reset -> (NIR LIF with r = 1, the
    input gain g / (1 - d) to fold into the layer before); IF (r = 1 / dt, gain g) if d == 1; LI
    without spikes."""
    import nir

    d = torch.as_tensor(d, dtype=torch.float64)
    g = torch.as_tensor(g, dtype=torch.float64)
    if spiking and bool((d == 1).all()):
        return nir.IF(r=_arr(1 / dt, shape), v_threshold=_arr(v_th, shape), v_reset=_arr(v_reset, shape)), g
    if bool((d >= 1).any()) or bool((d < 0).any()):
        raise OsbcError(f"{name}: decay {d.tolist()} outside [0, 1) has no NIR {'LIF' if spiking else 'LI'} "
                        "equivalent")
    kw = dict(tau=_arr(dt / (1 - d), shape), r=_arr(1.0, shape), v_leak=_arr(v_rest, shape))
    if not spiking:
        return nir.LI(**kw), g / (1 - d)
    return nir.LIF(v_threshold=_arr(v_th, shape), v_reset=_arr(v_reset, shape), **kw), g / (1 - d)


def _second_order(shape, dt, d1, g1, d2, g2, v_rest, v_th, v_reset, name, spiking=True):
    """Synaptic current i <- d1 i + g1 x feeding v <- d2 v + g2 i -> (NIR CubaLIF with w_in =
    tau_syn / dt and r = tau_mem / dt - the unit gains spikingjelly's and snntorch's importers
    require - and the gain g1 g2 to fold into the layer before)."""
    import nir

    d1 = torch.as_tensor(d1, dtype=torch.float64)
    d2 = torch.as_tensor(d2, dtype=torch.float64)
    for d, what in ((d1, "synaptic"), (d2, "membrane")):
        if bool((d >= 1).any()) or bool((d < 0).any()):
            raise OsbcError(f"{name}: {what} decay outside [0, 1) has no NIR CubaLIF equivalent")
    kw = dict(tau_syn=_arr(dt / (1 - d1), shape), w_in=_arr(1 / (1 - d1), shape),
              tau_mem=_arr(dt / (1 - d2), shape), r=_arr(1 / (1 - d2), shape), v_leak=_arr(v_rest, shape))
    gain = torch.as_tensor(g1, dtype=torch.float64) * torch.as_tensor(g2, dtype=torch.float64)
    if not spiking:
        return nir.CubaLI(**kw), gain
    return nir.CubaLIF(v_threshold=_arr(v_th, shape), v_reset=_arr(v_reset, shape), **kw), gain


_RESET_WORDS = {"subtract": "reset by subtraction", "none": "no reset after a spike"}


def _neuron_node(dyn: Dynamics, name: str, shape: tuple[int, ...], dt: float):
    """The NIR node of a neuron with dynamics ``dyn`` (from the neuron registry), and the input gain
    that the node leaves to the layer before it (see :func:`_fold_gain`)."""
    if dyn.spiking and dyn.reset_mode != "zero":
        warnings.warn(f"{name}: {_RESET_WORDS[dyn.reset_mode]}; NIR only resets to v_reset, so the graph "
                      f"resets to {dyn.v_reset} instead", stacklevel=4)
    if dyn.syn_decay is not None:
        return _second_order(shape, dt, dyn.syn_decay, 1.0, dyn.decay, dyn.gain, dyn.v_rest, dyn.threshold,
                             dyn.v_reset, name, spiking=dyn.spiking)
    return _first_order(shape, dt, dyn.decay, dyn.gain, dyn.v_rest, dyn.threshold, dyn.v_reset, name,
                        spiking=dyn.spiking)


_WEIGHTED = ("Affine", "Linear", "Conv1d", "Conv2d")
_GAIN_COMMUTES = ("Flatten", "AvgPool2d", "SumPool2d")  # linear, so a uniform gain passes through them


def _fold_gain(path: list, neuron, gain, shape: tuple[int, ...], name: str) -> None:
    """Fold a neuron's input gain into the weight layer before it (exact: its output only feeds the
    neuron, linearly), so that the neuron node keeps the unit gains the importers accept. ``path``:
    the nodes whose output reaches only the neuron, nearest first. Where no such layer can take it
    (a neuron on the graph input or after a merge, a per-neuron gain behind pooling) the
    neuron's voltages are counted in units of the gain instead: threshold, reset and rest divided."""
    g = torch.broadcast_to(torch.as_tensor(gain, dtype=torch.float64), shape)
    if bool((g == 1).all()):
        return
    if not bool((g > 0).all()):
        raise OsbcError(f"{name}: input gain {g.flatten()[:4].tolist()} is not positive; NIR's neurons cannot "
                        "express it")
    uniform = bool((g == g.flatten()[0]).all())
    rows = g.reshape(shape[0], -1) if shape else g.reshape(1, 1)
    direct = True
    for prev in path:
        kind = type(prev).__name__
        if kind in _WEIGHTED and (uniform or direct and bool((rows == rows[:, :1]).all())):
            scale = rows[:, 0].numpy()
            prev.weight = (prev.weight * scale.reshape(-1, *[1] * (prev.weight.ndim - 1))).astype(np.float32)
            if getattr(prev, "bias", None) is not None:
                prev.bias = (prev.bias * scale).astype(np.float32)
            prev.metadata = {**(prev.metadata or {}), **_weight_meta(torch.from_numpy(prev.weight))}
            return
        if kind not in _GAIN_COMMUTES:
            break
        direct = False
    for attr in ("v_threshold", "v_reset", "v_leak"):
        if hasattr(neuron, attr):
            setattr(neuron, attr, (getattr(neuron, attr) / g.numpy()).astype(np.float32))


# ---- layers -----------------------------------------------------------------------------------

def _np(t: Tensor) -> np.ndarray:
    return t.detach().cpu().to(torch.float32).numpy().copy()


def _pair(v) -> np.ndarray:
    return np.array(v if isinstance(v, (tuple, list)) else (v, v), dtype=np.int64)


def _weight_meta(w: Tensor) -> dict:
    """Sparsity and (if the weights lie on an integer grid) bit width, for node metadata."""
    meta = {"osbc_sparsity": float((w == 0).double().mean())}
    try:
        from .storage import encode_tensor

        _, e = encode_tensor(w.detach().cpu().float(), "w")
        if e.get("values") == "int":
            meta["osbc_bits"] = int(e["bits"])
            meta["osbc_scale"] = str(e["scale"])
    except Exception:  # noqa: BLE001 - metadata only
        pass
    return meta


def _fold_bn(w: Tensor, b: Tensor | None, bn: nn.Module) -> tuple[Tensor, Tensor]:
    w = w.detach().double()
    b = torch.zeros(w.shape[0], dtype=torch.float64) if b is None else b.detach().double()
    var, mean = bn.running_var.detach().double(), bn.running_mean.detach().double()
    gamma = bn.weight.detach().double() if bn.weight is not None else torch.ones_like(var)
    beta = bn.bias.detach().double() if bn.bias is not None else torch.zeros_like(var)
    a = gamma / torch.sqrt(var + bn.eps)
    return (w * a.reshape(-1, *([1] * (w.dim() - 1)))).float(), ((b - mean) * a + beta).float()


def _flatten_node(c: Call):
    """NIR Flatten with negative (counted from the end) dims: they mean the same in NIR's batch-free
    shapes and on the importers' batched tensors (snntorch and norse hand NIR's dims to
    ``torch.nn.Flatten`` unchanged, so ``start_dim=0`` would flatten their batch too)."""
    import nir

    m = c.module
    nd = len(c.feat_in)
    # torch's dims count the leading (time / batch) dims the flatten saw - or, for wrappers that fold
    # time into the batch first (spikingjelly's multi-step layers), one; NIR's dims count none.
    for lead in dict.fromkeys((c.lead, 1, 2)):
        s = m.start_dim - lead if m.start_dim >= 0 else m.start_dim + nd
        e = m.end_dim - lead if m.end_dim >= 0 else m.end_dim + nd
        if not (0 <= s <= e < nd):
            continue
        node = nir.Flatten(input_type={"input": np.array(c.feat_in)}, start_dim=s - nd, end_dim=e - nd)
        if tuple(int(v) for v in node.output_type["output"]) == tuple(c.feat_out):
            return node
    raise OsbcError(f"{c.name}: cannot express this Flatten ({c.feat_in} -> {c.feat_out}) in NIR")


def _spike_max_pool(name: str, m: nn.MaxPool2d, shape: tuple[int, ...], dt: float) -> list:
    """Max pooling of spikes is an OR: an average pool (> 0 iff a spike is in the window; NIR's
    importers have AvgPool2d but no Threshold node) gated by a LIF that fires iff its input is
    positive and is back at rest every step: tau = 2 dt halves the input, the smallest non-zero
    average 1 / k is above the threshold 1 / (4 k), and a spike resets to 0."""
    import nir

    kernel, stride = _pair(m.kernel_size), _pair(m.stride if m.stride is not None else m.kernel_size)
    k = float(np.prod(kernel))
    pool = nir.AvgPool2d(kernel_size=kernel, stride=stride, padding=_pair(m.padding))
    gate = nir.LIF(tau=_arr(2 * dt, shape), r=_arr(1.0, shape), v_leak=_arr(0.0, shape),
                   v_threshold=_arr(0.25 / k, shape), v_reset=_arr(0.0, shape))
    return [(name, pool), (f"{name}_or", gate)]


def _avg_pool_node(name: str, m: nn.Module, feat_in: tuple[int, ...]):
    """AvgPool2d; an AdaptiveAvgPool2d whose output size divides its input size is one too."""
    import nir

    if isinstance(m, nn.AdaptiveAvgPool2d):
        size = m.output_size if isinstance(m.output_size, (tuple, list)) else (m.output_size,) * 2
        hw = feat_in[-2:]
        out = [h if o is None else int(o) for o, h in zip(size, hw)]
        if any(o == 0 or h % o for o, h in zip(out, hw)):
            raise OsbcError(f"{name}: AdaptiveAvgPool2d from {tuple(hw)} to {tuple(out)} has uneven windows, which "
                            "NIR's AvgPool2d cannot express; pick an output size that divides the input size")
        kernel = _pair([h // o for o, h in zip(out, hw)])
        return nir.AvgPool2d(kernel_size=kernel, stride=kernel, padding=_pair(0))
    if m.ceil_mode or (any(_pair(m.padding)) and not m.count_include_pad) or m.divisor_override:
        raise OsbcError(f"{name}: AvgPool2d with ceil_mode, divisor_override or count_include_pad=False cannot be "
                        "exported")
    stride = m.stride if m.stride is not None else m.kernel_size
    return nir.AvgPool2d(kernel_size=_pair(m.kernel_size), stride=_pair(stride), padding=_pair(m.padding))


def _consumers(calls: list[Call]) -> dict:
    out: dict = {c: set() for c in calls}
    for c in calls:
        for src in c.sources:
            out.setdefault(src, set()).add(c)
    return out


def _layer_nodes(all_calls: list[Call], dt: float, fold_bn: bool) -> tuple[list, dict]:
    """The NIR nodes of the traced calls, in call order, and each call's node indices (calls that
    leave no node - dropped, or a BatchNorm folded into the layer before - have none)."""
    import nir

    from .models import SeqDropout, Voting

    nodes: list[tuple[str, object]] = []
    span: dict = {}
    pending = None  # (name, module-kind, weight, bias, call): an affine layer waiting for a BN to fold
    consumers = _consumers(all_calls)
    calls = [c for c in all_calls if not isinstance(c.module, (*_SKIP, SeqDropout))
             and type(c.module).__name__ not in ("Dropout", "Dropout2d")]

    def emit(c, *named):
        span[c] = list(range(len(nodes), len(nodes) + len(named)))
        nodes.extend(named)

    def path_into(c) -> list:
        """The nodes whose output reaches only ``c``, nearest first."""
        out = []
        while len(c.sources) == 1:
            (src,) = c.sources
            if consumers.get(src) != {c}:
                break
            out += [nodes[k][1] for k in reversed(span.get(src, []))]
            c = src
        return out

    def flush():
        nonlocal pending
        if pending is None:
            return
        name, m, w, b, c = pending
        meta = _weight_meta(m.weight)
        if isinstance(m, nn.Linear):
            if len(c.feat_in) != 1:
                raise OsbcError(f"{name}: Linear on multi-dim features {c.feat_in} is not supported by NIR export")
            node = nir.Linear(weight=_np(w)) if b is None else nir.Affine(weight=_np(w), bias=_np(b))
        elif isinstance(m, nn.Conv2d):
            if m.padding_mode != "zeros" or isinstance(m.padding, str) and m.padding != "valid":
                pad = m._reversed_padding_repeated_twice if m.padding_mode == "zeros" else None
                if pad is None or pad[0] != pad[1] or pad[2] != pad[3]:
                    raise OsbcError(f"{name}: only zero, symmetric padding can be exported")
                padding = (pad[2], pad[0])
            else:
                padding = (0, 0) if m.padding == "valid" else m.padding
            node = nir.Conv2d(input_shape=tuple(c.feat_in[-2:]), weight=_np(w), stride=_pair(m.stride),
                              padding=_pair(padding), dilation=_pair(m.dilation), groups=m.groups,
                              bias=_np(b) if b is not None else np.zeros(w.shape[0], np.float32))
        elif isinstance(m, nn.Conv1d):
            if m.padding_mode != "zeros" or isinstance(m.padding, str):
                raise OsbcError(f"{name}: only explicit zero padding can be exported")
            node = nir.Conv1d(input_shape=int(c.feat_in[-1]), weight=_np(w), stride=int(m.stride[0]),
                              padding=int(m.padding[0]), dilation=int(m.dilation[0]), groups=m.groups,
                              bias=_np(b) if b is not None else np.zeros(w.shape[0], np.float32))
        else:
            raise OsbcError(f"{name}: {type(m).__name__} has no NIR export")
        node.metadata = meta
        emit(c, (name, node))
        pending = None

    for c in calls:
        m, name = c.module, c.name
        dyn = dynamics_of(m)
        if dyn is not None:
            flush()
            node, gain = _neuron_node(dyn, name, tuple(c.feat_in), dt)
            _fold_gain(path_into(c), node, gain, tuple(c.feat_in), name)
            emit(c, (name, node))
            continue
        if isinstance(m, WEIGHT_LAYERS):
            flush()
            pending = (name, m, m.weight.detach(), None if m.bias is None else m.bias.detach(), c)
            continue
        if isinstance(m, BATCH_NORMS):
            if pending is None or not fold_bn:
                raise OsbcError(f"{name}: a BatchNorm must follow a Linear/Conv to be folded into it for NIR")
            pn, pm, w, b, pc = pending
            if c.sources != {pc} or consumers[pc] != {c}:
                raise OsbcError(f"{name}: a BatchNorm is folded into the Linear/Conv before it, which must feed "
                                "only the BatchNorm")
            w, b = _fold_bn(w, b, m)
            pending = (pn, pm, w, b, pc)
            continue
        flush()
        if isinstance(m, nn.Flatten):
            if tuple(c.feat_in) != tuple(c.feat_out):  # a no-op flatten (already flat) is dropped
                emit(c, (name, _flatten_node(c)))
        elif isinstance(m, nn.MaxPool2d):
            if not c.binary_in:
                raise OsbcError(f"{name}: MaxPool2d on non-binary input (before a neuron) cannot be exported: NIR "
                                "has no max pooling node; max pooling of spikes (after the neuron) exports exactly")
            if m.ceil_mode or any(int(d) != 1 for d in _pair(m.dilation)):
                raise OsbcError(f"{name}: MaxPool2d with ceil_mode or dilation cannot be exported")
            emit(c, *_spike_max_pool(name, m, tuple(c.feat_out), dt))
        elif isinstance(m, (nn.AvgPool2d, nn.AdaptiveAvgPool2d)):
            emit(c, (name, _avg_pool_node(name, m, tuple(c.feat_in))))
        elif isinstance(m, Voting):
            g = m.group
            n_out = c.feat_in[-1] // g
            w = np.kron(np.eye(n_out, dtype=np.float32), np.full((1, g), 1.0 / g, np.float32))
            emit(c, (name, nir.Linear(weight=w)))
        else:
            raise OsbcError(f"{name}: {type(m).__module__}.{type(m).__name__} has no NIR export")
    flush()
    return nodes, span


def _node_name(name: str, used: set) -> str:
    base = name.replace(".", "_") or "node"
    out, k = base, 1
    while out in used or out in ("input", "output"):
        k += 1
        out = f"{base}_{k}"
    used.add(out)
    return out


def _default_sample(model: nn.Module) -> Tensor:
    shape = getattr(model, "in_shape", None)
    if shape is None:
        raise OsbcError("pass sample=[T, B, ...] (one input batch, time-major) so that the layer order and "
                         "shapes can be read from a forward pass")
    return torch.zeros(3, 2, *shape)


def _check_reproduces(model: nn.Module, graph, sample: Tensor, calls: list[Call], span: dict, dt: float) -> None:
    """Never a wrong file: the trace sees which layers feed which, not what happens between them (a
    merge other than a sum, torch.relu, a scaling, an add of the raw input), so the graph is run on
    the sample and compared with the model - unless a neuron was already exported inexactly (a reset
    NIR cannot say, with its warning)."""
    for c in calls:
        dyn = dynamics_of(c.module)
        if dyn is not None and dyn.spiking and dyn.reset_mode != "zero":
            return
    y = run_model(model, sample)
    y = y[0] if isinstance(y, tuple) else y
    differ = float(((run_nir(graph, sample, dt=dt).to(y.dtype).reshape(y.shape) - y).abs() > 1e-4).float().mean())
    if differ > 1e-2:
        merges = [c.name for c in span if len(c.sources) > 1]
        where = (f"{', '.join(merges)}: NIR sums a node's inputs, but these are combined otherwise" if merges else
                 "an operation between the layers that is not a module (torch.relu, a scaling, an add of the "
                 "input) cannot be seen by the export")
        raise OsbcError(f"the exported graph does not reproduce the model on the sample ({differ:.1%} of outputs "
                        f"differ): {where}")


def to_nir(model: nn.Module, dt: float = 1e-3, sample: Tensor | None = None, *, fold_bn: bool = True,
           metadata: dict | None = None):
    """The :class:`nir.NIRGraph` of ``model`` (see the module docs for the conventions)."""
    import nir

    if not (isinstance(dt, (int, float)) and dt > 0 and math.isfinite(dt)):
        raise OsbcError(f"dt must be a positive number of seconds, got {dt!r}")
    sample = _default_sample(model) if sample is None else sample
    if sample.dim() < 3:
        raise OsbcError(f"sample must be time-major [T, B, ...], got shape {tuple(sample.shape)}")
    calls = trace(model, sample).calls
    if not calls:
        raise OsbcError("the model ran no layers on the sample")
    for c in calls:
        if c.mode is None or c.out_mode is None:
            raise OsbcError(f"{c.name}: cannot tell time from batch in its calls {c.in_shapes[:3]} -> "
                            f"{c.out_shapes[:3]} for a [T={sample.shape[0]}, B={sample.shape[1]}] sample")
        # NIR sums the inputs of a node: a merge must be a sum of equal shapes (checked below too)
        if len(c.sources) > 1 and any(tuple(src.feat_out) != tuple(c.feat_in) for src in c.sources):
            raise OsbcError(f"{c.name}: its inputs from {', '.join(sorted(src.name for src in c.sources))} have "
                            f"shapes other than its input {tuple(c.feat_in)}; NIR can only sum a node's inputs")
    layer_nodes, span = _layer_nodes(calls, float(dt), fold_bn)
    used: set = set()
    keys = [_node_name(name, used) for name, _ in layer_nodes]
    nodes = {"input": nir.Input(input_type={"input": np.array(calls[0].feat_in)})}
    nodes.update((k, node) for k, (_, node) in zip(keys, layer_nodes))

    def ends(c) -> list[str]:
        """The node keys that carry ``c``'s output (through calls that left no node)."""
        if c in span:
            return [keys[span[c][-1]]]
        return [k for src in sorted(c.sources, key=lambda s: s.index) for k in ends(src)] or ["input"]

    edges: list = []
    for c, idx in span.items():
        starts = [k for src in sorted(c.sources, key=lambda s: s.index) for k in ends(src)] or ["input"]
        edges += [(a, keys[idx[0]]) for a in dict.fromkeys(starts)]
        edges += [(keys[a], keys[b]) for a, b in zip(idx, idx[1:])]
    nodes["output"] = nir.Output(output_type={"output": np.array(calls[-1].feat_out)})
    edges += [(a, "output") for a in ends(calls[-1])]
    meta = {"source": "osbc", "dt": float(dt), "convention": CONVENTION}
    meta.update(metadata or {})
    graph = nir.NIRGraph(nodes=nodes, edges=edges, metadata=meta)
    _check_reproduces(model, graph, sample, calls, span, float(dt))
    return graph


def export_nir(model: nn.Module, path: str | os.PathLike | None = None, dt: float = 1e-3,
               sample: Tensor | None = None, **kwargs):
    """Write ``model`` as a NIR graph to ``path`` (``nir.write``, HDF5) and return the graph.

    ``dt``: seconds per time step (see the module docs for how neuron parameters map).
    ``sample``: one time-major input batch ``[T, B, ...]`` used to read the layer order and shapes
    (optional for osbc models, which record their input shape)."""
    import nir

    graph = to_nir(model, dt=dt, sample=sample, **kwargs)
    if path is not None:
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp")
        try:
            nir.write(str(tmp), graph)
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()
    return graph
