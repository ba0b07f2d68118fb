"""The public entry points :func:`prune` and :func:`quantize`.

A run: copy the model, find its compressible modules (:mod:`osbc.discover`), accumulate each
layer's Hessian over the calibration set (:mod:`osbc.hessian`), share the sparsity among layers
(:mod:`osbc.allocation`), solve each layer (:mod:`osbc.solvers`, :mod:`osbc.quant`), then measure
every layer's relative current and membrane error on the calibration set.

Calibration modes: ``dense`` feeds every layer the inputs of the uncompressed model (the paper,
one pass); ``sequential`` compresses layer by layer, each seeing the outputs of the already
compressed layers before it (one pass per layer, stopping at the layer when possible).
"""

from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from . import allocation as _alloc
from . import solvers
from .trace import Recorder, Target, batches, find_modules
from .hessian import HessianAccumulator
from .kernels import Kernel
from .quant import Grid, fit_grid
from .report import LayerReport, Report
from .snn import reset

__all__ = ["prune", "quantize", "inspect", "Compressed"]

PRUNE_METHODS = ("osbc", "obc", "magnitude")
QUANT_METHODS = ("osbc", "obc", "rtn")
SOLVERS = ("auto", "exact", "blocked", "fast")
CALIBRATIONS = ("dense", "sequential")
# Effective throughput of the exact solvers, used by solver="auto" to keep a layer under ~a minute.
# CPU: the 256x2312 layer to 97% (2/3 R d^3 = 2.1e12) took 12.8 s on 2 cores with the compiled steps,
# 23 s with the torch ones. CUDA: an untimed guess.
_FLOPS = {"cpu": 1e11, "cuda": 5e12}
_AUTO_SECONDS = 60.0


@dataclass
class Compressed:
    """Result of :func:`prune` / :func:`quantize`: the compressed model and a per-layer report."""

    model: nn.Module
    report: Report


def _default_device(device) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device {device!r} is not a valid torch device (try 'cpu' or 'cuda')") from e


def _parse_nm(nm) -> tuple[int, int] | None:
    if nm is None:
        return None
    try:
        n, m = (int(v) for v in (nm.split(":") if isinstance(nm, str) else nm))
    except (ValueError, TypeError):
        raise ValueError(f"nm must look like '2:4' or (2, 4), got {nm!r}") from None
    if not 0 < n < m:
        raise ValueError(f"nm={nm!r}: need 0 < N < M (keep N of every M weights)")
    return n, m


def _choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}, got {value!r}")


class _Run:
    """State shared by the steps of one compression run."""

    def __init__(self, task: str, model: nn.Module, calib, *, method: str, solver: str, calibration: str,
                 include, exclude, batch_size: int, max_kernel_groups: int, damp: float, device, seed: int,
                 inplace: bool, verbose: bool, settings: dict[str, Any]):
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        _choice("solver", solver, SOLVERS)
        _choice("calibration", calibration, CALIBRATIONS)
        if not 0 <= damp < 1:
            raise ValueError(f"damp must be in [0, 1) (relative to the mean Hessian diagonal), got {damp}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.task, self.method, self.solver, self.calibration = task, method, solver, calibration
        self.damp, self.seed, self.verbose, self.max_kernel_groups = damp, seed, verbose, max_kernel_groups
        self.device = _default_device(device)
        self.needs_hessian = method in ("osbc", "obc")
        if calib is None:
            if self.needs_hessian:
                raise ValueError(f"method {method!r} needs calibration data: pass calib=[N, T, ...] inputs")
            self.xs: list[Tensor] = []
        else:
            self.xs = list(batches(calib, batch_size))
            if not self.xs or sum(x.shape[1] for x in self.xs) == 0:
                raise ValueError("the calibration set is empty: pass at least one sample")
            if len({x.shape[0] for x in self.xs}) > 1 or len({x.shape[2:] for x in self.xs}) > 1:
                raise ValueError("calibration batches differ in frames or sample shape; use one T and shape")
        self.settings = dict(settings, method=method, solver=solver, calibration=calibration, damp=damp,
                             device=str(self.device), seed=seed,
                             calib_samples=sum(x.shape[1] for x in self.xs))

        home = next((p.device for p in model.parameters()), torch.device("cpu"))
        self.home, self.was_training = home, model.training
        reset(model)  # some libraries' neurons cannot be deep-copied while holding state
        self.model = model if inplace else copy.deepcopy(model)
        self.model.to(self.device).eval()
        if self.xs:
            sample = self.xs[0][:, :min(2, self.xs[0].shape[1])].to(self.device)
        else:
            raise ValueError(f"{method!r} needs one input batch to find the layers: pass calib")
        self.targets = find_modules(self.model, sample, include, exclude)
        for t in self.targets:
            if not torch.isfinite(t.layer.weight).all():
                raise ValueError(f"{t.name}: weights contain NaN or Inf; fix the model before compressing")
        self.old = {t.name: t.weight2d().clone() for t in self.targets}
        self.new: dict[str, Tensor] = {}
        self.layer_reports: dict[str, dict[str, Any]] = {}

    # -- helpers ----------------------------------------------------------------------------------
    def objective(self, t: Target) -> Kernel:
        return t.kernel if self.method == "osbc" else Kernel.identity()

    def row_scale(self, t: Target) -> Tensor | None:
        a = t.bn_gain() if self.method == "osbc" else None
        return None if a is None else a * a

    def _pass(self, targets: list[Target], callback, desc: str, stop_after: Target | None = None) -> None:
        with Recorder(targets, callback, stop_after) as rec:
            for x in tqdm(self.xs, desc=desc, leave=False, disable=not self.verbose):
                rec.run(self.model, x.to(self.device))

    def hessians(self, targets: list[Target], stop_after: Target | None = None) -> dict[str, HessianAccumulator]:
        accs = {t.name: HessianAccumulator(t, self.objective(t), self.device, max_groups=self.max_kernel_groups,
                                           seed=self.seed) for t in targets}
        self._pass(targets, lambda t, x: accs[t.name].add(x), "calibrating", stop_after)
        return accs

    def resolve_solver(self, t: Target, fraction: float) -> str:
        if self.solver != "auto":
            return self.solver
        d, R = t.cols, t.rows
        flops = (2 / 3) * R * (d ** 3 - (d * (1 - fraction)) ** 3)
        seconds = flops / _FLOPS.get(self.device.type, _FLOPS["cpu"])
        return "exact" if seconds <= _AUTO_SECONDS else "fast"

    def write(self, t: Target, w2d: Tensor) -> None:
        with torch.no_grad():
            t.layer.weight.copy_(w2d.reshape(t.layer.weight.shape).to(t.layer.weight.dtype))

    # -- measurement ------------------------------------------------------------------------------
    def measure(self) -> dict[str, tuple[float, float]]:
        """Relative membrane and current error of every layer's weight change on the calibration set."""
        sums = {t.name: torch.zeros(4, dtype=torch.float64) for t in self.targets}

        def cb(t: Target, x: Tensor) -> None:
            w0 = self.old[t.name].to(self.device)
            dw = self.new[t.name].to(self.device) - w0
            gain = t.bn_gain()
            per = max(1, (64 << 20) // max(1, t.apply(x[:, :1].float(), w0).numel() * 4))
            for b0 in range(0, x.shape[1], per):
                xc = x[:, b0:b0 + per].float()
                i, di = t.apply(xc, w0), t.apply(xc, dw)
                ch = i.dim() - 1 if isinstance(t.layer, nn.Linear) else 2
                s = sums[t.name]
                s[0] += di.double().pow(2).sum().cpu()
                s[1] += i.double().pow(2).sum().cpu()
                if gain is not None:
                    shape = [1] * i.dim()
                    shape[ch] = -1
                    g = gain.to(self.device, torch.float32).reshape(shape)
                    i, di = i * g, di * g
                if not t.kernel.is_identity:
                    i, di = t.kernel.apply(i, ch), t.kernel.apply(di, ch)
                s[2] += di.double().pow(2).sum().cpu()
                s[3] += i.double().pow(2).sum().cpu()

        self._pass(self.targets, cb, "measuring")
        return {n: (float(s[2] / s[3].clamp_min(1e-300)), float(s[0] / s[1].clamp_min(1e-300)))
                for n, s in sums.items()}

    # -- the run ----------------------------------------------------------------------------------
    def execute(self, solve_layer, accs: dict[str, HessianAccumulator] | None = None) -> Compressed:
        """Solve every target with ``solve_layer(target, hessians) -> (w2d, solver, bits, notes)``."""
        t0 = time.perf_counter()
        if self.needs_hessian and self.calibration == "dense" and accs is None:
            accs = self.hessians(self.targets)
        for t in tqdm(self.targets, desc=f"{self.task} ({self.method})", leave=False, disable=not self.verbose):
            ts = time.perf_counter()
            hs = None
            if self.needs_hessian:
                if self.calibration == "sequential":
                    acc = self.hessians([t], stop_after=t)[t.name]
                else:
                    acc = accs[t.name]
                hs = acc.hessians(release=True)
                clustered = acc.clustered
            else:
                clustered = False
            w2d, solver, bits, notes = solve_layer(t, hs)
            if not torch.isfinite(w2d).all():  # a solver bug must never reach the user's model
                raise RuntimeError(f"{t.name}: solver {solver} produced non-finite weights")
            self.new[t.name] = w2d.detach()
            if clustered:
                notes = (notes + "; " if notes else "") + f"per-neuron kernels clustered into {len(hs)} groups"
            if self.calibration == "sequential":
                self.write(t, w2d)
            self.layer_reports[t.name] = dict(solver=solver, bits=bits, notes=notes,
                                              seconds=time.perf_counter() - ts)
        errors = self.measure() if self.xs else {}
        if self.calibration == "dense" or not self.needs_hessian:
            for t in self.targets:
                self.write(t, self.new[t.name])
        report = Report(self.task, self.method, self.settings)
        for t in self.targets:
            info = self.layer_reports[t.name]
            w = self.new[t.name]
            mem, cur = errors.get(t.name, (None, None))
            report.layers.append(LayerReport(
                name=t.name, kind=t.kind, shape=t.shape, kernel=t.describe_kernel(), solver=info["solver"],
                sparsity=float((w == 0).sum()) / w.numel(), bits=info["bits"], membrane_error=mem,
                current_error=cur, seconds=info["seconds"], notes=info["notes"]))
        report.seconds = time.perf_counter() - t0
        reset(self.model)
        self.model.to(self.home).train(self.was_training)
        return Compressed(self.model, report)


# ---- pruning ------------------------------------------------------------------------------------

def _keep_from_counts(order: Tensor, counts: Tensor, d: int) -> Tensor:
    removed = torch.arange(order.shape[1], device=order.device)[None, :] < counts.to(order.device)[:, None]
    keep = torch.ones(order.shape[0], d, dtype=torch.bool, device=order.device)
    return keep.scatter_(1, order, ~removed)


def _paths(run: _Run, t: Target, hs, w: Tensor, block: int, nm) -> solvers.PrunePath:
    """Full greedy paths of all rows (group by group), losses scaled by the BN row scale."""
    R = w.shape[0]
    order = loss = None
    for rows, H in hs:
        p = solvers.obs_path(w[rows], H.to(w.device), block=block, nm=nm, damp=run.damp, progress=run.verbose)
        if order is None:
            order = torch.zeros(R, p.order.shape[1], dtype=torch.int64, device=p.order.device)
            loss = torch.full((R, p.loss.shape[1]), float("inf"), dtype=torch.float64, device=p.loss.device)
        order[rows.to(order.device)] = p.order
        loss[rows.to(loss.device)] = p.loss.double()
    scale = run.row_scale(t)
    if scale is not None:
        loss = loss * scale.to(loss.device)[:, None]
    return solvers.PrunePath(order, loss)


def prune(model: nn.Module, calib=None, sparsity: float = 0.97, *, method: str = "osbc",
          allocation: str = "lamp", solver: str = "auto", calibration: str = "dense", nm=None,
          lamp_power: float = 2.0, damp: float = 0.01, include=None, exclude=None, batch_size: int = 32,
          max_kernel_groups: int = 16, device=None, seed: int = 0, inplace: bool = False,
          verbose: bool = True) -> Compressed:
    """Prune ``model`` to ``sparsity`` (fraction of zero weights over its compressible layers).

    Args:
        model: any ``nn.Module`` taking time-major ``[T, B, ...]`` input.
        calib: calibration inputs, a tensor ``[N, T, ...]`` or an iterable of ``x`` / ``(x, y)``
            batches ``[B, T, ...]``. ``magnitude`` uses it only to find the layers and measure errors.
        sparsity: in ``[0, 1)``; ignored when ``nm`` fixes it to ``1 - N/M``.
        method: ``"osbc"`` (membrane kernel + BatchNorm gains), ``"obc"`` (input current),
            ``"magnitude"`` (smallest |w|, no compensation).
        allocation: ``"uniform"``, ``"lamp"`` (power ``lamp_power``) or ``"global"`` (from the OBS
            losses, relative to each layer's membrane energy).
        solver: ``"exact"`` (greedy OBS, one weight per step), ``"blocked"`` (d/256 per step),
            ``"fast"`` (SparseGPT column sweep) or ``"auto"`` (exact where it costs under ~a minute).
        calibration: ``"dense"`` or ``"sequential"``.
        nm: ``"2:4"``-style semi-structured pattern (keep N of every M consecutive inputs).
        include, exclude: glob patterns on module names.
        device: where to compute (default CUDA if available); the result returns to the model's device.
        inplace: modify ``model`` itself instead of a copy.
    """
    _choice("method", method, PRUNE_METHODS)
    _choice("allocation", allocation, _alloc.ALLOCATIONS)
    nm_t = _parse_nm(nm)
    if nm_t is not None:
        sparsity = 1 - nm_t[0] / nm_t[1]
    if not isinstance(sparsity, (int, float)) or not 0 <= sparsity < 1:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity!r}")
    if method == "magnitude" and allocation == "global":
        raise ValueError("allocation='global' ranks OBS losses and needs method 'osbc' or 'obc'; "
                         "use 'lamp' or 'uniform' with magnitude")
    run = _Run("prune", model, calib, method=method, solver=solver, calibration=calibration, include=include,
               exclude=exclude, batch_size=batch_size, max_kernel_groups=max_kernel_groups, damp=damp,
               device=device, seed=seed, inplace=inplace, verbose=verbose,
               settings=dict(sparsity=sparsity, allocation=allocation if nm_t is None else f"{nm_t[0]}:{nm_t[1]}",
                             lamp_power=lamp_power))
    targets = run.targets
    sizes = [t.rows * t.cols for t in targets]
    counts: dict[str, Tensor] = {}
    cached_paths: dict[str, solvers.PrunePath] = {}
    accs = None
    if nm_t is not None or allocation == "uniform":
        layer_sparsity = _alloc.uniform(sizes, sparsity)
    elif allocation == "lamp":
        layer_sparsity = _alloc.lamp([t.weight2d() for t in targets], sparsity, lamp_power)
    else:  # global: needs every layer's full greedy path on dense-calibration Hessians
        accs = run.hessians(targets)
        losses, energies = [], []
        for t in targets:
            w = t.weight2d().to(run.device).float()
            hs = accs[t.name].hessians()
            s_ = run.resolve_solver(t, 1.0)
            path = _paths(run, t, hs, w, 1 if s_ == "exact" else max(1, t.cols // 256), None)
            cached_paths[t.name] = path
            losses.append(path.loss)
            scale = run.row_scale(t)
            e = sum(float(((w[rows].double() @ H.to(w.device)) * w[rows].double()).sum(1)
                          .mul(1.0 if scale is None else scale[rows].to(w.device)).sum()) for rows, H in hs)
            energies.append(e)
        for t, c in zip(targets, _alloc.global_counts(losses, energies, sparsity)):
            counts[t.name] = c
        layer_sparsity = [float(counts[t.name].sum()) / n for t, n in zip(targets, sizes)]
        if calibration == "sequential":  # budgets stay; paths and counts are redone on the new inputs
            counts.clear()
            cached_paths.clear()
            accs = None
    plan = {t.name: s for t, s in zip(targets, layer_sparsity)}

    def solve(t: Target, hs) -> tuple[Tensor, str, None, str]:
        s = plan[t.name]
        w = t.weight2d().to(run.device).float()
        R, d = w.shape
        if method == "magnitude":
            return solvers.prune_magnitude(w, s, nm=nm_t)[0], "magnitude", None, ""
        kind = run.resolve_solver(t, s)
        if kind == "fast":
            out = torch.empty_like(w)
            for rows, H in hs:
                out[rows] = solvers.prune_sparsegpt(w[rows], H.to(w.device), s, nm=nm_t, damp=damp)[0]
            return out, "fast", None, ""
        block = 1 if kind == "exact" else max(1, d // 256)
        if len(hs) == 1 and t.name not in counts and t.name not in cached_paths:
            w2, _, _ = solvers.prune_exact(w, hs[0][1].to(w.device), s, block=block, nm=nm_t,
                                           row_scale=run.row_scale(t), damp=damp, progress=run.verbose)
            return w2, kind, None, ""
        path = cached_paths.get(t.name) or _paths(run, t, hs, w, block, nm_t)
        c = counts.get(t.name)
        if c is None:
            c = solvers.budget_counts(path, round(s * R * d))
        keep = _keep_from_counts(path.order, c, d)
        out = torch.empty_like(w)
        for rows, H in hs:
            out[rows] = solvers.solve_on_support(w[rows], H.to(w.device), keep[rows.to(keep.device)], damp=damp)
        return out * keep, kind, None, ""

    return run.execute(solve, accs)


# ---- quantization -------------------------------------------------------------------------------

def quantize(model: nn.Module, calib=None, bits: int = 4, *, method: str = "osbc", solver: str = "auto",
             calibration: str = "dense", per: str = "channel", mse: bool = False, pow2: bool = False,
             damp: float = 0.01, include=None, exclude=None, batch_size: int = 32, max_kernel_groups: int = 16,
             device=None, seed: int = 0, inplace: bool = False, verbose: bool = True) -> Compressed:
    """Quantize the weights of ``model`` to a symmetric ``bits``-bit grid (2..8).

    ``method``: ``"osbc"`` (membrane kernel), ``"obc"`` (input current) or ``"rtn"`` (round to
    nearest). ``solver``: ``"exact"`` (OBQ greedy, each row kept from OBQ or GPTQ, whichever has
    the lower error), ``"fast"`` (GPTQ order with lazy block updates) or ``"auto"``. ``per``: ``"channel"`` (one scale per output row) or ``"layer"``; ``mse``: search
    shrunk maxima for the scale; ``pow2``: power-of-two scales (hardware targets). Zeros already in
    the weights (a pruned model) stay zero. Other arguments as in :func:`prune`.
    """
    _choice("method", method, QUANT_METHODS)
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"bits must be an integer in 2..8, got {bits!r}")
    _choice("per", per, ("channel", "layer"))
    if solver == "blocked":
        raise ValueError("solver 'blocked' is for pruning; use 'exact', 'fast' or 'auto'")
    run = _Run("quantize", model, calib, method=method, solver=solver, calibration=calibration, include=include,
               exclude=exclude, batch_size=batch_size, max_kernel_groups=max_kernel_groups, damp=damp,
               device=device, seed=seed, inplace=inplace, verbose=verbose,
               settings=dict(bits=bits, per=per, mse=mse, pow2=pow2))

    def solve(t: Target, hs) -> tuple[Tensor, str, int, str]:
        w = t.weight2d().to(run.device).float()
        keep = w != 0
        keep = None if bool(keep.all()) else keep
        H_diag = None
        if hs is not None and len(hs) == 1:
            H_diag = torch.diagonal(hs[0][1]).to(w.device)
        grid = fit_grid(w, bits, per=per, mse=mse, pow2=pow2, H=H_diag)
        if method == "rtn":
            return solvers.quantize_rtn(w, grid, keep_mask=keep), "rtn", bits, ""
        kind = run.resolve_solver(t, 1.0)
        out = torch.empty_like(w)
        for rows, H in hs:
            sub = _sub_grid(grid, rows)
            k = None if keep is None else keep[rows]
            Hd = H.to(w.device)
            q = solvers.quantize_gptq(w[rows], Hd, sub, keep_mask=k, damp=damp)
            if kind == "exact":
                # OBQ's greedy order is not always better than GPTQ's fixed one (seen on layers with
                # many silent inputs); both are cheap next to the Hessian, so keep each row's better.
                q_obq = solvers.quantize_obq(w[rows], Hd, sub, keep_mask=k, damp=damp, progress=run.verbose)
                better = _row_error(q_obq - w[rows], Hd) <= _row_error(q - w[rows], Hd)
                q = torch.where(better[:, None], q_obq, q)
            out[rows] = q
        return out, kind, bits, ""

    return run.execute(solve)


def _row_error(dw: Tensor, H: Tensor) -> Tensor:
    """dw_r^T H dw_r per row: each row's share of the layer-wise objective."""
    dw = dw.double()
    return ((dw @ H.double()) * dw).sum(1)


def _sub_grid(grid: Grid, rows: Tensor) -> Grid:
    return dataclasses.replace(grid, scale=grid.scale[rows.to(grid.scale.device)])


def inspect(model: nn.Module, calib, include=None, exclude=None, device=None) -> list[Target]:
    """The compressible modules of ``model`` (weight layer, BatchNorm, neuron, kernel), found by
    running the first calibration batch."""
    dev = _default_device(device)
    try:
        x = next(iter(batches(calib, 2)))
    except StopIteration:
        raise ValueError("the calibration set is empty: pass at least one sample") from None
    reset(model)
    home = next((p.device for p in model.parameters()), torch.device("cpu"))
    model.to(dev)
    try:
        return find_modules(model, x[:, :2].to(dev), include, exclude)
    finally:
        model.to(home)
