"""How osbc runs a model over time, and how calibration data becomes time-major batches.

osbc keeps every calibration batch time-major, ``[T, B, ...]``, and hands it to a :class:`Driver`,
which calls the model the way the model wants to be called:

* ``"sequence"``: ``model(x)`` once with the whole ``[T, B, ...]`` batch (osbc's own neurons,
  spikingjelly in multi-step mode, models that loop over time inside ``forward``);
* ``"step"``: ``model(x[t])`` for each step, the state kept inside the neurons (an ``nn.Sequential``
  of snntorch neurons with ``init_hidden=True``, spikingjelly in single-step mode);
* ``"state"``: ``out, s = model(x[t], s)`` for each step, the state passed in and out (norse's
  ``SequentialState`` of ``*Cell`` modules);
* ``"static"``: ``model(x[0])`` once, for models that repeat one static frame over time inside
  ``forward`` (the frames of the batch are then all equal; see ``time_steps`` in :func:`batches`);
* ``"user"``: ``out, s = step_fn(model, x[t], s)`` for each step, for any other model.

Every driver clears the neuron state before and after (:func:`osbc.snn.reset`, each library its own
way); the per-step drivers stack the first tensor of each step's output back to ``[T, B, ...]``.
:func:`osbc.trace.trace` picks the driver of a model from how it reacts to a sample.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from . import neurons
from .errors import OsbcError
from .snn import reset

__all__ = ["Driver", "SEQUENCE", "STATIC", "run_model", "step_driver", "repeat_count", "batches"]

#: ``step_fn(model, x_t, state) -> (output, state)``; ``state`` is None at the first step.
StepFn = Callable[[nn.Module, Tensor, object], tuple]


def _tensors(x) -> Iterator[Tensor]:
    """The tensors in ``x`` (nested tuples, lists and dicts), in order."""
    if isinstance(x, Tensor):
        yield x
    elif isinstance(x, (tuple, list)):
        for v in x:
            yield from _tensors(v)
    elif isinstance(x, dict):
        for v in x.values():
            yield from _tensors(v)


def _first_tensor(x) -> Tensor | None:
    return next(_tensors(x), None)


@dataclass(frozen=True)
class Driver:
    """Runs a model on a time-major batch (see the module docs for the kinds)."""

    kind: str = "sequence"
    step_fn: StepFn | None = None

    def __call__(self, model: nn.Module, x_tb: Tensor):
        reset(model)
        try:
            if self.kind == "sequence":
                return model(x_tb)
            if self.kind == "static":
                return model(x_tb[0])
            outs, state = [], None
            for t in range(x_tb.shape[0]):
                if self.kind == "step":
                    out = model(x_tb[t])
                elif self.kind == "state":
                    out, state = model(x_tb[t], state)
                else:
                    out, state = self.step_fn(model, x_tb[t], state)
                outs.append(_first_tensor(out))
            return torch.stack(outs) if all(o is not None for o in outs) else None
        finally:
            reset(model)

    def describe(self) -> str:
        return {"sequence": "model(x) on [T, B, ...]", "static": "model(x[0]) on one static frame [B, ...]",
                "step": "model(x[t]) for each step", "state": "out, s = model(x[t], s) for each step",
                "user": "out, s = step_fn(model, x[t], s) for each step"}[self.kind]


SEQUENCE = Driver("sequence")
STATIC = Driver("static")


def run_model(model: nn.Module, x_tb: Tensor) -> Tensor:
    """One clean forward on the whole ``[T, B, ...]`` batch: neuron state cleared before and after."""
    return SEQUENCE(model, x_tb)


def repeat_count(calls: list, B: int) -> int | None:
    """How many steps a model called on one static frame ``[B, ...]`` ran, from its first neuron's
    calls (:class:`osbc.trace.Call`): T calls of ``[B, ...]``, one of ``[T, B, ...]`` or one of
    ``[T*B, ...]``; None if it ran one."""
    for c in calls:
        if neurons.is_neuron(c.module):
            s, n = c.in_shapes[0], len(c.in_shapes)
            if n > 1 and s[0] == B:
                return n
            if n == 1 and len(s) > 1 and s[1] == B and s[0] > 1:
                return s[0]
            if n == 1 and s[0] > B and s[0] % B == 0:
                return s[0] // B
            return None
    return None


def step_driver(model: nn.Module) -> Driver:
    """Step by step, the state passed in and out where the neurons and ``forward`` expect it (norse)."""
    passed = any(neurons.step_kind(m) == "passed" for m in model.modules() if neurons.is_neuron(m))
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        params = {}
    return Driver("state" if passed and len(params) >= 2 else "step")


def labelled_batches(data, batch_size: int = 64, shuffle: bool = False, seed: int = 0, drop_last: bool = False,
            num_workers: int = 0) -> Iterable:
    """An iterable of ``(x [B, T, ...], y [B])`` batches from a Dataset (of ``(x [T, ...], y)``
    samples), a pair of tensors ``(X, y)``, a DataLoader or any iterable of batches (passed through).
    Training and evaluation read their data this way, and :func:`batches` reads calibration data
    given in any of these forms."""
    if isinstance(data, DataLoader):
        return data
    if (isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, Tensor) for t in data)
            and data[1].dim() == 1 and len(data[0]) == len(data[1])):   # (X, y), not a list of two batches
        data = TensorDataset(*data)
    if isinstance(data, Dataset):
        if len(data) == 0:
            raise OsbcError("the data set is empty")
        g = torch.Generator()
        g.manual_seed(int(seed))
        return DataLoader(data, batch_size=batch_size, shuffle=shuffle, generator=g, drop_last=drop_last,
                          num_workers=num_workers)
    if isinstance(data, Iterable):
        return data
    raise OsbcError(f"cannot iterate batches from {type(data).__name__}: pass a Dataset, (X, y) tensors "
                    "or a DataLoader")


def _positive(name: str, v) -> None:
    if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
        raise OsbcError(f"{name} must be a positive integer or None, got {v!r}")


def batches(calib, batch_size: int = 32, *, max_samples: int | None = None, time_first: bool | None = None,
            time_steps: int | None = None) -> Iterator[Tensor]:
    """Calibration data as time-major ``[T, B, ...]`` float batches.

    ``calib``: a tensor ``[N, T, ...]`` or an iterable of ``x`` / ``(x, y, ...)`` batches
    ``[B, T, ...]`` (the dataset convention). A DataLoader is consumed only as far as needed.

    * ``max_samples``: stop after this many samples (the last batch is cut short);
    * ``time_first=True``: the data is ``[T, N, ...]`` / batches ``[T, B, ...]`` (tonic's
      ``PadTensors(batch_first=False)``). Left at None, a batch whose labels count its dim 1 rather
      than its dim 0 raises :class:`OsbcError` instead of being read with time and batch swapped;
      ``False`` turns that check off;
    * ``time_steps=T``: the samples have no time axis (``[N, ...]``, one static frame each): each
      frame is repeated ``T`` times. A model that repeats the frame itself in ``forward`` is then
      called once on the frame (the ``"static"`` driver), and ``T`` must be its repeat count."""
    _positive("batch_size", batch_size)
    _positive("max_samples", max_samples)
    _positive("time_steps", time_steps)
    if time_first not in (None, True, False):
        raise OsbcError(f"time_first must be True, False or None, got {time_first!r}")
    if time_steps is not None and time_first:
        raise OsbcError("time_first=True and time_steps are exclusive: static frames have no time axis")
    static = time_steps is not None
    need = 2 if static else 3
    layout = "[N, ...] (static frames)" if static else "[T, N, ...]" if time_first else "[N, T, ...]"
    if isinstance(calib, Tensor):
        if calib.dim() < need:
            raise OsbcError(f"calibration tensor must be {layout}, got shape {tuple(calib.shape)}")
        items: Iterator = iter(calib.split(batch_size, dim=1 if time_first else 0))
    else:
        if not isinstance(calib, (Dataset, Iterable)):
            raise OsbcError(f"calib must be a tensor {layout} or an iterable of batches, "
                            f"got {type(calib).__name__}") from None
        items = iter(labelled_batches(calib, batch_size))
    left = max_samples
    for item in items:
        x, y = (item[0], item[1] if len(item) > 1 else None) if isinstance(item, (tuple, list)) else (item, None)
        if not isinstance(x, Tensor):
            x = torch.as_tensor(x)
        if x.dim() < need:
            raise OsbcError(f"calibration batches must be {layout.replace('N', 'B')}, got shape {tuple(x.shape)}")
        if (time_first is None and not static and isinstance(y, Tensor) and y.dim() >= 1
                and y.shape[0] != x.shape[0] and y.shape[0] == x.shape[1]):
            raise OsbcError(f"calibration batch of shape {tuple(x.shape)} has {y.shape[0]} labels, its dim 1: it "
                            "looks time-first [T, B, ...]; pass time_first=True (or time_first=False if it is not)")
        if not x.is_floating_point():
            x = x.float()
        if not torch.isfinite(x).all():
            raise OsbcError("calibration data contains NaN or Inf; clean the inputs")
        if static:
            x_tb = x.unsqueeze(0).repeat(time_steps, *([1] * x.dim()))
        else:
            x_tb = x if time_first else x.transpose(0, 1)
        if left is not None:
            x_tb = x_tb[:, :left]
            left -= x_tb.shape[1]
        yield x_tb
        if left == 0:
            return
