"""Typed settings of a compression run, validated once, and the choices the CLI offers.

``prune(model, calib, config=PruneConfig(...))`` and ``quantize(model, calib,
config=QuantConfig(...))`` are the typed form of the flat keyword arguments (which build the same
objects). Every field is checked in ``__post_init__``; a bad value raises :class:`OsbcError`
naming the argument.
"""
from __future__ import annotations

import dataclasses
import numbers
from dataclasses import dataclass

from .errors import OsbcError

__all__ = ["PruneConfig", "QuantConfig", "PRUNE_METHODS", "QUANT_METHODS", "SOLVERS", "QUANT_SOLVERS",
           "CALIBRATIONS", "ALLOCATIONS", "GRIDS", "parse_nm"]

PRUNE_METHODS = ("osbc", "obc", "magnitude")
QUANT_METHODS = ("osbc", "obc", "rtn")
SOLVERS = ("auto", "exact", "blocked", "fast", "restricted")
QUANT_SOLVERS = ("auto", "exact", "fast", "refined", "exact-refined")   # "blocked", "restricted": pruning's
CALIBRATIONS = ("dense", "sequential")
ALLOCATIONS = ("uniform", "lamp", "global")
GRIDS = ("channel", "layer")                    # quantize's per=


def parse_nm(nm) -> tuple[int, int] | None:
    """``"2:4"`` or ``(2, 4)`` -> (2, 4); None stays None."""
    if nm is None:
        return None
    try:
        n, m = (int(v) for v in (nm.split(":") if isinstance(nm, str) else nm))
    except (ValueError, TypeError):
        raise OsbcError(f"nm must look like '2:4' or (2, 4), got {nm!r}") from None
    if not 0 < n < m:
        raise OsbcError(f"nm={nm!r}: need 0 < N < M (keep N of every M weights)")
    return n, m


def _choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise OsbcError(f"{name} must be one of {', '.join(map(repr, allowed))}, got {value!r}")


@dataclass(frozen=True)
class CompressConfig:
    """Settings shared by pruning and quantization.

    method: the objective (see PruneConfig / QuantConfig); solver: ``"auto"`` (pruning: at >= 80%
    sparsity restricted where its estimate is under ~a minute per layer and under exact's, else exact
    where that is, else fast;
    quantization: exact-refined where exact costs under ~a minute, else refined;
    ``osbc.compress.auto_solver``), ``"exact"``, ``"fast"`` (and ``"blocked"``, ``"restricted"``
    for pruning, ``"refined"``, ``"exact-refined"`` for quantization); calibration: ``"dense"`` (every layer sees the dense model's inputs, one pass) or ``"sequential"`` (each
    layer sees the already compressed layers' outputs); damp: Hessian damping relative to its mean
    diagonal, in [0, 1); include, exclude: glob patterns on module names; batch_size: calibration
    samples per forward pass; max_kernel_groups: most Hessians per layer with per-neuron kernels
    (clustered beyond); device: where to compute (None: CUDA if available); seed: for every random
    choice; inplace: modify the given model; verbose: progress bars. How the calibration data is read
    and the model driven (checked where they are used, :func:`osbc.drive.batches` and
    :func:`osbc.trace.find_modules`): calib_samples: use at most this many samples (a DataLoader is
    not read further); time_first: the data is ``[T, N, ...]`` (tonic's ``PadTensors(batch_first=False)``;
    None: detected from the labels where it can be, else an error); time_steps: the samples are static
    frames ``[N, ...]`` to repeat this many times; step_fn: ``(model, x_t, state) -> (output, state)``
    for a model osbc cannot drive by itself (single-step models are detected without it).
    auto_seconds: the per-layer time budget of ``solver="auto"``: it runs the best solver whose
    estimated time fits (see :func:`osbc.compress.auto_solver`)."""

    method: str = "osbc"
    solver: str = "auto"
    calibration: str = "dense"
    damp: float = 0.01
    include: object = None
    exclude: object = None
    batch_size: int = 32
    max_kernel_groups: int = 16
    device: object = None
    seed: int = 0
    inplace: bool = False
    verbose: bool = True
    calib_samples: object = None
    time_first: object = None
    time_steps: object = None
    step_fn: object = None
    auto_seconds: float = 60.0

    METHODS = ()
    SOLVERS = SOLVERS

    def __post_init__(self):
        _choice("method", self.method, self.METHODS)
        _choice("solver", self.solver, self.SOLVERS)
        _choice("calibration", self.calibration, CALIBRATIONS)
        if isinstance(self.damp, bool) or not isinstance(self.damp, (int, float)) or not 0 <= self.damp < 1:
            raise OsbcError(f"damp must be in [0, 1) (relative to the mean Hessian diagonal), got {self.damp!r}")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise OsbcError(f"batch_size must be an integer >= 1, got {self.batch_size!r}")
        if isinstance(self.max_kernel_groups, bool) or not isinstance(self.max_kernel_groups, int) \
                or self.max_kernel_groups < 1:
            raise OsbcError(f"max_kernel_groups must be an integer >= 1, got {self.max_kernel_groups!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, numbers.Integral) or self.seed < 0:
            raise OsbcError(f"seed must be an integer >= 0, got {self.seed!r}")
        if isinstance(self.auto_seconds, bool) or not isinstance(self.auto_seconds, (int, float)) \
                or not self.auto_seconds > 0:
            raise OsbcError(f"auto_seconds must be a number of seconds > 0, got {self.auto_seconds!r}")
        from .device import resolve_device  # here, so that the CLI reads the choices without torch

        resolve_device(self.device)         # fails now, not after the calibration pass

    @property
    def needs_hessian(self) -> bool:
        return self.method in ("osbc", "obc")

    @classmethod
    def from_kwargs(cls, config=None, task: str = "", **kwargs):
        """``config`` (or the defaults) with the given fields replaced; an unknown name is a
        TypeError, as for any keyword argument."""
        names = {f.name for f in dataclasses.fields(cls)}
        for k in kwargs:
            if k not in names:
                raise TypeError(f"{task or cls.__name__}() got an unexpected keyword argument {k!r}")
        if config is None:
            return cls(**kwargs)
        if not isinstance(config, cls):
            raise OsbcError(f"config must be a {cls.__name__}, got {type(config).__name__}")
        return dataclasses.replace(config, **kwargs) if kwargs else config


@dataclass(frozen=True)
class PruneConfig(CompressConfig):
    """Pruning: ``sparsity`` in [0, 1) (fraction of zero weights over the compressible layers;
    an N:M pattern fixes it); ``method``: ``"osbc"`` (membrane kernel + BatchNorm gains), ``"obc"``
    (input current) or ``"magnitude"`` (smallest |w|, no compensation); ``allocation``: how the
    sparsity is shared among layers, ``"uniform"``, ``"lamp"`` (power ``lamp_power``) or
    ``"global"`` (from the OBS losses); ``nm``: ``"2:4"``-style pattern, keep N of every M
    consecutive inputs (stored as a tuple); ``solver``: ``"exact"`` (greedy OBS, one weight per
    step), ``"blocked"`` (d/256 per step), ``"fast"`` (SparseGPT), ``"restricted"`` (the exact
    greedy on a forward-selected candidate support 1.25x the kept one) or ``"auto"``."""

    sparsity: float = 0.97
    allocation: str = "lamp"
    nm: object = None
    lamp_power: float = 2.0

    METHODS = PRUNE_METHODS

    def __post_init__(self):
        super().__post_init__()
        _choice("allocation", self.allocation, ALLOCATIONS)
        object.__setattr__(self, "nm", parse_nm(self.nm))
        if self.nm is not None:
            object.__setattr__(self, "sparsity", 1 - self.nm[0] / self.nm[1])
        s = self.sparsity
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not 0 <= s < 1:
            raise OsbcError(f"sparsity must be in [0, 1), got {s!r}")
        if self.method == "magnitude" and self.allocation == "global":
            raise OsbcError("allocation='global' ranks OBS losses and needs method 'osbc' or 'obc'; "
                            "use 'lamp' or 'uniform' with magnitude")
        if isinstance(self.lamp_power, bool) or not isinstance(self.lamp_power, (int, float)) or self.lamp_power <= 0:
            raise OsbcError(f"lamp_power must be a positive number, got {self.lamp_power!r}")


@dataclass(frozen=True)
class QuantConfig(CompressConfig):
    """Quantization to a symmetric ``bits``-bit grid (2..8): ``method``: ``"osbc"`` (membrane
    kernel), ``"obc"`` (input current) or ``"rtn"`` (round to nearest); ``solver``: ``"exact"``
    (OBQ greedy, each row kept from OBQ or GPTQ, whichever has the lower error), ``"fast"`` (GPTQ),
    ``"refined"`` (GPTQ, then exact coordinate descent on the grid: a few GPTQ sweeps' cost),
    ``"exact-refined"`` (OBQ's and GPTQ's results both refined, per row the best: never above
    exact's error, at exact's cost) or ``"auto"`` (exact-refined where exact is affordable, else
    refined); ``per``: ``"channel"`` (one scale per output row) or ``"layer"``; ``mse``:
    search shrunk maxima for the scale; ``pow2``: power-of-two scales (hardware targets)."""

    bits: int = 4
    per: str = "channel"
    mse: bool = False
    pow2: bool = False

    METHODS = QUANT_METHODS
    SOLVERS = QUANT_SOLVERS

    def __post_init__(self):
        if self.solver in ("blocked", "restricted"):
            raise OsbcError(f"solver {self.solver!r} is for pruning; use 'exact', 'fast', 'refined', 'exact-refined' or 'auto'")
        super().__post_init__()
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise OsbcError(f"bits must be an integer in 2..8, got {self.bits!r}")
        _choice("per", self.per, GRIDS)
