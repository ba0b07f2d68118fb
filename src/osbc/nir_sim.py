"""A reference simulator for NIR graphs: :func:`run_nir` runs an exported graph step by step under
the time-step convention of :mod:`osbc.nir_export` (forward Euler with step dt, the synaptic
current updated first; spike when v > v_threshold, then v = v_reset; a node's inputs summed), to
check exports against the model they came from."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from .errors import OsbcError

__all__ = ["run_nir"]


def run_nir(graph, x: Tensor, dt: float | None = None) -> Tensor:
    """Simulate a NIR graph without cycles on ``x`` (``[T, B, ...]``) under the convention above (a
    node's inputs are summed); returns the output sequence ``[T, B, ...]``. ``dt`` defaults to the
    graph's ``metadata["dt"]``. Meant as a reference for checking exports, not for speed."""
    from graphlib import CycleError, TopologicalSorter

    if dt is None:
        dt = float((graph.metadata or {}).get("dt", 1e-3))
    preds: dict = {k: [] for k in graph.nodes}
    for a, b in graph.edges:
        preds[b].append(a)
    try:
        order = list(TopologicalSorter(preds).static_order())
    except CycleError:
        raise OsbcError("run_nir handles graphs without cycles only") from None
    state: dict[str, dict] = {}
    outs = []
    for step in range(x.shape[0]):
        vals: dict = {}
        for key in order:
            n = graph.nodes[key]
            if type(n).__name__ == "Input":
                vals[key] = x[step].to(torch.float64)
                continue
            h = sum(vals[p] for p in preds[key])
            vals[key] = h if type(n).__name__ == "Output" else _step(n, h, state.setdefault(key, {}), dt)
        outs.append(vals[next(k for k in order if type(graph.nodes[k]).__name__ == "Output")])
    return torch.stack(outs).to(x.dtype if x.is_floating_point() else torch.float32)


def _t(a) -> Tensor:
    return torch.as_tensor(np.asarray(a), dtype=torch.float64)


def _step(n, h: Tensor, st: dict, dt: float) -> Tensor:
    """One time step of NIR node ``n`` on input ``h`` (state in ``st``)."""
    import torch.nn.functional as F

    kind = type(n).__name__
    if kind == "Affine":
        h = h @ _t(n.weight).T + _t(n.bias)
    elif kind == "Linear":
        h = h @ _t(n.weight).T
    elif kind == "Conv2d":
        h = F.conv2d(h, _t(n.weight), _t(n.bias), tuple(int(v) for v in np.atleast_1d(n.stride)),
                     tuple(int(v) for v in np.atleast_1d(n.padding)),
                     tuple(int(v) for v in np.atleast_1d(n.dilation)), int(n.groups))
    elif kind == "Conv1d":
        h = F.conv1d(h, _t(n.weight), _t(n.bias), int(np.asarray(n.stride).reshape(-1)[0]),
                     int(np.asarray(n.padding).reshape(-1)[0]), int(np.asarray(n.dilation).reshape(-1)[0]),
                     int(n.groups))
    elif kind == "Flatten":
        start, end = int(n.start_dim), int(n.end_dim)  # batch-free dims; h has a batch dim
        h = h.flatten(start + 1 if start >= 0 else start, end + 1 if end >= 0 else end)
    elif kind == "SumPool2d":
        k = tuple(int(v) for v in n.kernel_size)
        h = F.avg_pool2d(h, k, tuple(int(v) for v in n.stride), tuple(int(v) for v in n.padding),
                         count_include_pad=True) * (k[0] * k[1])
    elif kind == "AvgPool2d":
        h = F.avg_pool2d(h, tuple(int(v) for v in n.kernel_size), tuple(int(v) for v in n.stride),
                         tuple(int(v) for v in n.padding))
    elif kind == "Threshold":
        h = (h > _t(n.threshold)).to(h.dtype)
    elif kind == "Scale":
        h = h * _t(n.scale)
    elif kind in ("LIF", "IF", "LI", "I"):
        v0 = _t(n.v_leak) if hasattr(n, "v_leak") else _t(n.v_reset) if hasattr(n, "v_reset") else 0
        v = st.get("v", torch.zeros_like(h) + v0)
        if kind in ("LIF", "LI"):
            v = v + dt / _t(n.tau) * (_t(n.v_leak) - v + _t(n.r) * h)
        else:
            v = v + dt * _t(n.r) * h
        if kind in ("LIF", "IF"):
            z = (v > _t(n.v_threshold)).to(h.dtype)
            v = torch.where(z > 0, _t(n.v_reset).expand_as(v), v)
            h = z
        else:
            h = v
        st["v"] = v
    elif kind in ("CubaLIF", "CubaLI"):
        i_s = st.get("i", torch.zeros_like(h))
        v = st.get("v", torch.zeros_like(h) + _t(n.v_leak))
        i_s = i_s + dt / _t(n.tau_syn) * (-i_s + _t(n.w_in) * h)
        v = v + dt / _t(n.tau_mem) * (_t(n.v_leak) - v + _t(n.r) * i_s)
        if kind == "CubaLIF":
            z = (v > _t(n.v_threshold)).to(h.dtype)
            v = torch.where(z > 0, _t(n.v_reset).expand_as(v), v)
            h = z
        else:
            h = v
        st["i"], st["v"] = i_s, v
    else:
        raise OsbcError(f"run_nir: node type {kind} is not supported")
    return h
