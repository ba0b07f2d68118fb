"""The neuron registry: everything osbc knows about each spiking-neuron class, in one place.

A neuron class registers once, with :func:`register`, and from then on (subclasses included):

* its **dynamics** (:class:`Dynamics`): the subthreshold update as one or two first-order stages,
  the threshold, the reset value and the reset mode (``"zero"``, ``"subtract"`` or ``"none"``).
  The membrane kernel (:meth:`Dynamics.kernel`, used by the Hessians) and the NIR node
  (:mod:`osbc.nir_export`) are both derived from it, so the two can never disagree;
* optionally a **kernel** function that overrides the one derived from the dynamics (spikingjelly
  subclasses that change the dynamics are measured instead);
* its **state reset** (``None`` for stateless modules);
* whether it is **single-step** (:func:`step_kind`): ``"hidden"`` for neurons that take one time
  step ``[B, ...]`` per call and keep their state inside (snntorch, spikingjelly with
  ``step_mode="s"``), ``"passed"`` for those whose state is passed in and out (norse ``*Cell``),
  None for multi-step neurons that take ``[T, B, ...]``. :mod:`osbc.drive` loops over time for
  models built from single-step neurons.

osbc's own neurons register in :mod:`osbc.snn`. Other libraries' neurons are registered by their
adapters (``osbc/interop/<library>.py``), loaded the first time a module whose class comes from
that library is looked up: a model without norse modules never imports norse (about a second,
with its plotting stack). Any other module that looks like a neuron (a threshold attribute or a
neuron-like class name) gets a kernel measured with an impulse while spiking is off
(:func:`probe_kernel`); it has no dynamics, so it cannot be exported to NIR.
"""

from __future__ import annotations

import copy
import importlib
import re
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor, nn

from .errors import OsbcError
from .kernels import Kernel, KernelError
from .layers import WEIGHT_LAYERS

__all__ = ["Dynamics", "NeuronType", "register", "neuron_type", "is_neuron", "reset_module", "kernel_of",
           "dynamics_of", "step_kind", "probe_kernel", "LIBRARIES", "AVAILABLE", "FAILED", "load_adapter", "load_for",
           "load_all"]

RESET_MODES = ("zero", "subtract", "none")


@dataclass
class Dynamics:
    """A neuron's discrete-time dynamics, threshold and reset ignored for the kernel:

    * without a synaptic stage: ``v <- decay v + gain x + (1 - decay) v_rest``;
    * with one (``syn_decay`` set): ``i <- syn_decay i + x``, then ``v <- decay v + gain i + ...``
      (the current enters the membrane in the step it arrives).

    ``threshold=None``: a leaky integrator that never spikes (its membrane is the output).
    ``reset_mode``: after a spike the membrane is set to ``v_reset`` (``"zero"``, the name NIR and
    snntorch use for a hard reset), lowered by the threshold (``"subtract"``), or left (``"none"``).
    Coefficients are float64 tensors (or numbers), scalar or per-neuron.
    """

    decay: Any
    gain: Any
    name: str
    syn_decay: Any = None
    threshold: Any = None
    v_rest: Any = 0.0
    v_reset: Any = 0.0
    reset_mode: str = "zero"
    params: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.reset_mode not in RESET_MODES:
            raise OsbcError(f"{self.name}: reset_mode must be one of {RESET_MODES}, got {self.reset_mode!r}")

    @property
    def spiking(self) -> bool:
        return self.threshold is not None

    def kernel(self) -> Kernel:
        """The membrane kernel: first order ``h[n] = gain decay^n``, or the synaptic stage feeding
        the membrane, ``h[n] = gain sum_{i+j=n} syn_decay^i decay^j``."""
        if self.syn_decay is None:
            return Kernel.first_order(self.decay, self.gain, name=self.name, **self.params)
        return Kernel.second_order(self.syn_decay, self.decay, self.gain, name=self.name, **self.params)


@dataclass(frozen=True)
class NeuronType:
    """What osbc knows about one neuron class (see the module docs)."""

    dynamics: Callable[[nn.Module], Dynamics] | None
    reset: Callable[[nn.Module], None] | None
    kernel: Callable[[nn.Module], Kernel] | None = None
    step: Callable[[nn.Module], str | None] | str | None = None


STEP_KINDS = (None, "hidden", "passed")
_REGISTRY: dict[type, NeuronType] = {}


def register(cls: type, dynamics: Callable[[nn.Module], Dynamics] | None = None,
             reset: Callable[[nn.Module], None] | None = None, *,
             kernel: Callable[[nn.Module], Kernel] | None = None,
             step: Callable[[nn.Module], str | None] | str | None = None) -> None:
    """Teach osbc a neuron class: ``dynamics(module) -> Dynamics`` (gives the kernel and the NIR
    node; it may return None for a module whose dynamics it does not describe), an optional state
    ``reset(module)``, an optional ``kernel(module) -> Kernel`` that replaces the kernel derived
    from the dynamics (a neuron with only a kernel compresses but does not export to NIR), and
    ``step``: None (multi-step), ``"hidden"`` or ``"passed"`` (single-step, see the module docs),
    or a function of the module that returns one of these."""
    if dynamics is None and kernel is None:
        raise OsbcError(f"register({cls.__name__}): give dynamics, a kernel, or both")
    if not callable(step) and step not in STEP_KINDS:
        raise OsbcError(f"register({cls.__name__}): step must be one of {STEP_KINDS} or a function, got {step!r}")
    _REGISTRY[cls] = NeuronType(dynamics, reset, kernel, step)


# ---- other libraries' adapters, loaded on first sight -------------------------------------------

#: libraries with an adapter module ``osbc.interop.<name>``
LIBRARIES = ("spikingjelly", "snntorch", "norse")
#: adapters loaded so far
AVAILABLE: list[str] = []
#: library -> reason, for adapters whose library is installed but could not be imported
FAILED: dict[str, str] = {}
_tried: set[str] = set()


def load_adapter(name: str) -> bool:
    """Load the adapter of library ``name`` (once); whether its neurons are registered."""
    if name not in _tried:
        _tried.add(name)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # libraries warn about optional CUDA / plotting backends
                # by name: the adapters import this module, so it cannot import them
                importlib.import_module(f"osbc.interop.{name}")
        except ImportError as e:  # library absent, or present without a dependency it needs
            if getattr(e, "name", None) not in (name, None):
                FAILED[name] = f"{type(e).__name__}: {e}"
        except Exception as e:  # noqa: BLE001 - a broken third-party install must not break osbc
            FAILED[name] = f"{type(e).__name__}: {e}"
        else:
            AVAILABLE.append(name)
    return name in AVAILABLE


def load_for(cls: type) -> bool:
    """Load the adapters of the supported libraries ``cls`` (or a base class) comes from; whether
    one was newly loaded."""
    new = False
    for c in cls.__mro__:
        root = (getattr(c, "__module__", None) or "").partition(".")[0]
        if root in LIBRARIES and root not in _tried:
            new |= load_adapter(root)
    return new


def load_all() -> list[str]:
    """Load every supported library's adapter that can be; returns :data:`AVAILABLE`."""
    for name in LIBRARIES:
        load_adapter(name)
    return AVAILABLE


# ---- lookups ----------------------------------------------------------------------------------

def _lookup(cls: type) -> NeuronType | None:
    return next((_REGISTRY[c] for c in cls.__mro__ if c in _REGISTRY), None)


def neuron_type(m: nn.Module) -> NeuronType | None:
    """The registered type of module ``m`` (loading its library's adapter on first sight), or None."""
    nt = _lookup(type(m))
    if nt is None and load_for(type(m)):
        nt = _lookup(type(m))
    return nt


_NEURON_NAME = re.compile(r"(LIF|IF|Node|Neuron|Leaky|Synaptic|Spik|IAF|Izhikevich|Alpha|Lapicque|CUBA)", re.I)


def is_neuron(m: nn.Module) -> bool:
    """Registered neuron types, and leaf modules that look like spiking neurons (a threshold
    attribute or a neuron-like class name) - the latter get a probed kernel."""
    if neuron_type(m) is not None:
        return True
    if isinstance(m, (*WEIGHT_LAYERS, nn.modules.batchnorm._BatchNorm)):
        return False
    if any(True for _ in m.children()):
        return False
    return hasattr(m, "v_threshold") or hasattr(m, "threshold") or bool(_NEURON_NAME.search(type(m).__name__))


def reset_module(m: nn.Module) -> None:
    """Clear the state of neuron ``m`` its own way (unregistered neurons: their ``reset()``)."""
    nt = neuron_type(m)
    if nt is not None:
        if nt.reset is not None:
            nt.reset(m)
    elif hasattr(m, "reset") and callable(m.reset) and is_neuron(m):
        m.reset()


def step_kind(m: nn.Module) -> str | None:
    """How neuron ``m`` takes time (see the module docs): None, ``"hidden"`` or ``"passed"``."""
    nt = neuron_type(m)
    if nt is None:
        return None
    return nt.step(m) if callable(nt.step) else nt.step


def dynamics_of(m: nn.Module) -> Dynamics | None:
    """The registered dynamics of neuron ``m``, or None (not a neuron, or registered by kernel only)."""
    nt = neuron_type(m)
    return nt.dynamics(m) if nt is not None and nt.dynamics is not None else None


def kernel_of(m: nn.Module, feature_shape: tuple[int, ...] | None = None, T: int = 32) -> Kernel:
    """The membrane kernel of neuron module ``m`` (registered type, else an impulse probe over
    ``feature_shape`` and ``T`` steps)."""
    nt = neuron_type(m)
    if nt is not None and nt.kernel is not None:
        return nt.kernel(m)
    dyn = nt.dynamics(m) if nt is not None else None
    if dyn is not None:
        return dyn.kernel()
    if feature_shape is None:
        raise KernelError(f"{type(m).__name__}: unknown neuron type and no input shape to probe it with")
    return probe_kernel(m, feature_shape, T)


# ---- probing ----------------------------------------------------------------------------------

_THRESHOLD_ATTRS = ("v_threshold", "threshold", "v_th", "thresh")
_STATE_ATTRS = ("v", "mem", "v_mem", "membrane", "u")
_THRESHOLD_OFF = 1e30


def probe_kernel(m: nn.Module, feature_shape: tuple[int, ...], T: int = 32, amplitude: float = 1e-3) -> Kernel:
    """Measure h[n] of an unknown neuron: drive a copy with an impulse while spiking is off.

    Spiking is switched off by ``spiking = False`` (neurons with a boolean ``spiking`` attribute,
    like osbc's :class:`osbc.snn.BaseNode`, which then output their membrane) or by a huge
    threshold attribute, the membrane then read from a state attribute after each single-step
    call. The response to zero input is subtracted so constant leaks cancel."""
    name = type(m).__name__
    try:
        probe = copy.deepcopy(m)
    except Exception as e:  # noqa: BLE001 - any copy failure means we cannot probe safely
        raise KernelError(f"{name}: cannot copy the neuron to probe its kernel ({e}); "
                          "register it with osbc.neurons.register") from e
    probe.train(False)
    if isinstance(getattr(probe, "spiking", None), bool):
        probe.spiking = False
        read = None
    else:
        thr = [a for a in _THRESHOLD_ATTRS if hasattr(probe, a)]
        if not thr:
            raise KernelError(f"{name}: no threshold attribute ({', '.join(_THRESHOLD_ATTRS)}) to switch spiking "
                              "off; register the neuron with osbc.neurons.register")
        for a in thr:
            v = getattr(probe, a)
            # A huge finite threshold, not inf: a soft reset computes v - spike * threshold, and
            # 0 * inf = nan would poison the trace.
            setattr(probe, a, torch.full_like(v, _THRESHOLD_OFF) if isinstance(v, Tensor) else _THRESHOLD_OFF)
        read = next((a for a in _STATE_ATTRS if hasattr(probe, a)), None)
        if read is None:
            raise KernelError(f"{name}: no membrane state attribute ({', '.join(_STATE_ATTRS)}) to read; "
                              "register the neuron with osbc.neurons.register")

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
                          "register the neuron with osbc.neurons.register") from e
    if not torch.isfinite(r1).all() or not torch.allclose(r1, r2, rtol=1e-3, atol=1e-6):
        raise KernelError(f"{name}: the membrane response is not linear with spiking switched off; "
                          "register the neuron with osbc.neurons.register")
    h = r1.movedim(0, -1)  # [*feature_shape, T]
    return Kernel.fir(h, name=f"probed {name}")
