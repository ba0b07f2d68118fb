"""The public entry points :func:`prune` and :func:`quantize`.

A run: copy the model, find its compressible modules (:mod:`osbc.trace`), accumulate each
layer's Hessian over the calibration set (:mod:`osbc.hessian`), share the sparsity among layers
(:mod:`osbc.allocation`), solve each layer (:mod:`osbc.solvers`, :mod:`osbc.quant`), then measure
every layer's relative current and membrane error on the calibration set.

Calibration modes: ``dense`` feeds every layer the inputs of the uncompressed model (the paper,
one pass); ``sequential`` compresses layer by layer, each seeing the outputs of the already
compressed layers before it (one pass per layer, stopping at the layer when possible).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from . import allocation as _alloc
from . import solvers
from .config import CompressConfig, PruneConfig, QuantConfig
from .device import resolve_device
from .errors import OsbcError
from .trace import Recorder, Target, batches, find_modules
from .hessian import HessianAccumulator
from .kernels import Kernel
from .quant import fit_grid
from .report import LayerReport, Report
from .snn import reset

__all__ = ["prune", "quantize", "inspect", "auto_solver", "Compressed", "PruneConfig", "QuantConfig"]

# Effective throughput of the exact solvers, used by solver="auto" to keep a layer under ~a minute.
# CPU: the 256x2312 layer to 97% (2/3 R d^3 = 2.1e12) took 12.8 s on 2 cores with the compiled steps,
# 23 s with the torch ones. CUDA: an untimed guess.
_FLOPS = {"cpu": 1e11, "cuda": 5e12}
_AUTO_SECONDS = 60.0
# The restricted greedy's cost grows as its forward selection's, ~R d T^2 / 2 multiply-adds with
# T = 1.25 widen (1 - s) d + 16 steps per row (the per-row subproblems add a third to a half again).
# Timed on two threads of an idle 2-core machine, as _FLOPS (bench/bench_frontier.py; README,
# frontier): one such unit cost 2.4-2.9 exact flops at 90-95% on 256x2312, 500x2048 and 512x8192
# (101 s for 512x8192 at 90%, 21 s at 95%); more at 97-99%, where fixed costs weigh more but the
# whole solve takes seconds.
_RESTRICTED_COST = 3.0
# ... and where the selection's pools apply (low sparsity: solvers.restricted._pool_plan), about
# half of that: 512x8192 at 90% took 49 s with one pool stage, 101 s without (estimate 53 s), and
# 47.5 s with two; 512x4608 at 80% took 49 s with one (estimate 38 s)
_POOL_COST = 0.5
# Below this sparsity the candidate support is large: auto then chooses between exact and fast
# only. At 80-85% restricted took 1.7-4.2x less time than exact on 256x2312 (synthetic and
# trained) at 1% lower membrane error; below, its candidate set nears half the live inputs, where
# it hands over to the exact greedy anyway.
_RESTRICTED_MIN_SPARSITY = 0.8


@dataclass
class Compressed:
    """Result of :func:`prune` / :func:`quantize`: the compressed model and a per-layer report."""

    model: nn.Module
    report: Report


class _Run:
    """State shared by the steps of one compression run."""

    def __init__(self, task: str, model: nn.Module, calib, cfg: CompressConfig, settings: dict[str, Any]):
        if not isinstance(model, nn.Module):
            raise OsbcError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        method, solver, calibration = cfg.method, cfg.solver, cfg.calibration
        self.task, self.method, self.solver, self.calibration = task, method, solver, calibration
        self.damp, self.seed, self.verbose, self.max_kernel_groups = cfg.damp, cfg.seed, cfg.verbose, cfg.max_kernel_groups
        self.device = resolve_device(cfg.device)
        self.auto_seconds = cfg.auto_seconds
        self.needs_hessian = cfg.needs_hessian
        if calib is None:
            if self.needs_hessian:
                raise OsbcError(f"method {method!r} needs calibration data: pass calib=[N, T, ...] inputs")
            self.xs: list[Tensor] = []
        else:
            self.xs = list(batches(calib, cfg.batch_size, max_samples=cfg.calib_samples, time_first=cfg.time_first,
                                   time_steps=cfg.time_steps))
            if not self.xs or sum(x.shape[1] for x in self.xs) == 0:
                raise OsbcError("the calibration set is empty: pass at least one sample")
            if len({x.shape[0] for x in self.xs}) > 1 or len({x.shape[2:] for x in self.xs}) > 1:
                raise OsbcError("calibration batches differ in frames or sample shape; use one T and shape")
        self.settings = dict(settings, method=method, solver=solver, calibration=calibration, damp=cfg.damp,
                             device=str(self.device), seed=cfg.seed,
                             calib_samples=sum(x.shape[1] for x in self.xs))

        home = next((p.device for p in model.parameters()), torch.device("cpu"))
        self.home, self.was_training = home, model.training
        reset(model)  # some libraries' neurons cannot be deep-copied while holding state
        self.model = model if cfg.inplace else copy.deepcopy(model)
        self.model.to(self.device).eval()
        if self.xs:
            sample = self.xs[0][:, :min(2, self.xs[0].shape[1])].to(self.device)
        else:
            raise OsbcError(f"{method!r} needs one input batch to find the layers: pass calib")
        self.targets = find_modules(self.model, sample, cfg.include, cfg.exclude, step_fn=cfg.step_fn)
        for t in self.targets:
            if not torch.isfinite(t.layer.weight).all():
                raise OsbcError(f"{t.name}: weights contain NaN or Inf; fix the model before compressing")
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

    def resolve_solver(self, t: Target, fraction: float, nm: bool = False) -> str:
        if self.solver != "auto":
            return self.solver
        return auto_solver(t.rows, t.cols, fraction, self.device.type, pruning=self.task == "prune", nm=nm,
                           seconds=self.auto_seconds)

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

def prune(model: nn.Module, calib, sparsity: float | None = None, *, config: PruneConfig | None = None,
          **options) -> Compressed:
    """Prune ``model`` to ``sparsity`` (fraction of zero weights over its compressible layers).

    Args:
        model: any ``nn.Module`` taking time-major ``[T, B, ...]`` input.
        calib: calibration inputs, a tensor ``[N, T, ...]`` or an iterable of ``x`` / ``(x, y)``
            batches ``[B, T, ...]``. ``magnitude`` uses it only to find the layers and measure errors.
        sparsity: in ``[0, 1)`` (default 0.97); ignored when ``nm`` fixes it to ``1 - N/M``.
        config: a :class:`~osbc.config.PruneConfig`; keyword arguments override its fields.
        **options: the fields of :class:`~osbc.config.PruneConfig`:
            method: ``"osbc"`` (membrane kernel + BatchNorm gains), ``"obc"`` (input current),
            ``"magnitude"`` (smallest |w|, no compensation).
            allocation: ``"uniform"``, ``"lamp"`` (power ``lamp_power``) or ``"global"`` (from the
            OBS losses, relative to each layer's membrane energy).
            solver: ``"exact"`` (greedy OBS, one weight per step), ``"blocked"`` (d/256 per step),
            ``"fast"`` (SparseGPT column sweep), ``"restricted"`` (the exact greedy on a candidate
            support 1.25x the kept one, found by forward selection: near-exact at 90-99%, far
            faster) or ``"auto"`` (see :func:`auto_solver`).
            calibration: ``"dense"`` or ``"sequential"``.
            nm: ``"2:4"``-style semi-structured pattern (keep N of every M consecutive inputs; a
            layer whose input count is not a multiple of M treats its last partial group as
            padded with zeros, which count as removed: that group keeps at most N).
            damp, include, exclude (glob patterns on module names), batch_size,
            max_kernel_groups, device (default CUDA if available; the result returns to the
            model's device), seed, inplace (modify ``model`` itself), verbose.
    """
    if sparsity is not None:
        options["sparsity"] = sparsity
    cfg = PruneConfig.from_kwargs(config, "prune", **options)
    method, nm_t, sparsity, allocation, damp = cfg.method, cfg.nm, cfg.sparsity, cfg.allocation, cfg.damp
    run = _Run("prune", model, calib, cfg,
               settings=dict(sparsity=sparsity, allocation=allocation if nm_t is None else f"{nm_t[0]}:{nm_t[1]}",
                             lamp_power=cfg.lamp_power))
    targets = run.targets
    sizes = [t.rows * t.cols for t in targets]
    counts: dict[str, Tensor] = {}
    cached_paths: dict[str, solvers.PrunePath] = {}
    accs = None
    if nm_t is not None or allocation == "uniform":
        layer_sparsity = _alloc.uniform(sizes, sparsity)
    elif allocation == "lamp":
        layer_sparsity = _alloc.lamp([t.weight2d() for t in targets], sparsity, cfg.lamp_power)
    else:  # global: needs every layer's full greedy path on dense-calibration Hessians
        accs = run.hessians(targets)
        losses, energies = [], []
        for t in targets:
            w = t.weight2d().to(run.device).float()
            hs = accs[t.name].hessians()
            s_ = run.resolve_solver(t, 1.0)
            scale = run.row_scale(t)
            path = solvers.obs_path(w, hs, block=1 if s_ == "exact" else max(1, t.cols // 256), damp=run.damp,
                                    row_scale=scale, progress=run.verbose)
            cached_paths[t.name] = path
            losses.append(path.loss)
            energies.append(_alloc.layer_energy(w, hs, scale))
        for t, c in zip(targets, _alloc.global_counts(losses, energies, sparsity)):
            counts[t.name] = c
        layer_sparsity = [float(counts[t.name].sum()) / n for t, n in zip(targets, sizes)]
        if cfg.calibration == "sequential":  # budgets stay; paths and counts are redone on the new inputs
            counts.clear()
            cached_paths.clear()
            accs = None
    plan = {t.name: s for t, s in zip(targets, layer_sparsity)}

    def solve(t: Target, hs) -> tuple[Tensor, str, None, str]:
        w = t.weight2d().to(run.device).float()
        R, d = w.shape
        kind = "magnitude" if method == "magnitude" else run.resolve_solver(t, plan[t.name], nm=nm_t is not None)
        # N:M: the full pattern (sparsity None), also where a partial last group makes it < 1 - N/M
        s = None if nm_t is not None else plan[t.name]
        if kind == "magnitude":
            return solvers.prune_magnitude(w, s, nm=nm_t)[0], kind, None, ""
        if kind == "fast":
            return solvers.prune_sparsegpt(w, hs, s, nm=nm_t, damp=damp)[0], kind, None, ""
        if kind == "restricted":   # like fast under allocation="global": the layer's count, not the path's
            w2 = solvers.prune_restricted(w, hs, s, nm=nm_t, row_scale=run.row_scale(t), damp=damp,
                                          progress=run.verbose)[0]
            return w2, kind, None, ""
        w2, _, _ = solvers.prune_exact(w, hs, s, block=1 if kind == "exact" else max(1, d // 256), nm=nm_t,
                                       row_scale=run.row_scale(t), damp=damp, progress=run.verbose,
                                       path=cached_paths.get(t.name), counts=counts.get(t.name))
        return w2, kind, None, ""

    return run.execute(solve, accs)


def auto_solver(R: int, d: int, sparsity: float, device_type: str = "cpu", *, pruning: bool = True,
                nm: bool = False, seconds: float = _AUTO_SECONDS) -> str:
    """What ``solver="auto"`` runs on a layer [R, d] pruned to ``sparsity`` (quantization: 1.0).

    Estimated times: exact, 2/3 R (d^3 - ((1 - s) d)^3) flops at ``_FLOPS``; restricted,
    ``_RESTRICTED_COST`` R d T^2 / 2 flops with T = 1.25 widen (1 - s) d + 16 (widen =
    ``solvers.restricted.DEFAULT_WIDEN``; half that where the selection's pools apply,
    ``_POOL_COST``). For pruning at
    sparsity >= 0.8 without an N:M pattern, "restricted" when its estimate is under
    ``seconds`` (the config's ``auto_seconds``, default 60) and under exact's: there it matched or beat the exact greedy's membrane error
    on every layer measured (README, frontier), at a fraction of its time. Otherwise "exact" when its
    estimate is under ``seconds``, else "fast". Below 0.8 the restricted candidate support is
    large (little faster than exact), and with N:M it runs the exact greedy itself.
    Quantization (``pruning=False``): "exact-refined" when exact's estimate is under ``seconds``,
    else "refined" (a few GPTQ sweeps' cost, 9 to 18% below exact's error on the large layers
    measured; README, quantization frontier)."""
    rate = _FLOPS.get(device_type, _FLOPS["cpu"])
    exact = (2 / 3) * R * (d ** 3 - (d * (1 - sparsity)) ** 3) / rate
    if not pruning:   # quantization: refined is never worse than its start (README, quantization frontier)
        return "exact-refined" if exact <= seconds else "refined"
    if not nm and sparsity >= _RESTRICTED_MIN_SPARSITY:
        T = 1.25 * solvers.restricted.DEFAULT_WIDEN * (1 - sparsity) * d + 16
        restricted = _RESTRICTED_COST * R * d * T * T / 2 / rate
        avg = solvers.restricted.DEFAULT_WIDEN * (1 - sparsity) * d
        if solvers.restricted._pool_plan(avg, d, int(1.5 * avg) + 16):
            restricted *= _POOL_COST
        if restricted <= seconds and restricted < exact:
            return "restricted"
    return "exact" if exact <= seconds else "fast"


# ---- quantization -------------------------------------------------------------------------------

def quantize(model: nn.Module, calib, bits: int | None = None, *, config: QuantConfig | None = None,
             **options) -> Compressed:
    """Quantize the weights of ``model`` to a symmetric ``bits``-bit grid (2..8, default 4).

    ``config``: a :class:`~osbc.config.QuantConfig`; keyword arguments (its fields) override it.
    ``method``: ``"osbc"`` (membrane kernel), ``"obc"`` (input current) or ``"rtn"`` (round to
    nearest). ``solver``: ``"exact"`` (OBQ greedy, each row kept from OBQ or GPTQ, whichever has
    the lower error), ``"fast"`` (GPTQ order with lazy block updates), ``"refined"`` (GPTQ, then
    passes of exact coordinate descent on the grid that never raise the error, at a few GPTQ
    sweeps' cost), ``"exact-refined"`` (OBQ's and GPTQ's results both refined, per row the lowest
    error of the four: never above exact's) or ``"auto"`` (exact-refined where exact's estimated
    time fits ``auto_seconds``, else refined; see :func:`auto_solver`). ``per``:
    ``"channel"`` (one scale per output row) or ``"layer"``; ``mse``: search shrunk maxima for the
    scale; ``pow2``: power-of-two scales (hardware targets). Zeros already in the weights (a pruned
    model) stay zero. Other arguments as in :func:`prune`.
    """
    if bits is not None:
        options["bits"] = bits
    cfg = QuantConfig.from_kwargs(config, "quantize", **options)
    method, bits, per, mse, pow2, damp = cfg.method, cfg.bits, cfg.per, cfg.mse, cfg.pow2, cfg.damp
    run = _Run("quantize", model, calib, cfg, settings=dict(bits=bits, per=per, mse=mse, pow2=pow2))

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
        if kind == "exact":
            return solvers.quantize_exact(w, hs, grid, keep_mask=keep, damp=damp, progress=run.verbose), kind, bits, ""
        if kind in ("refined", "exact-refined"):
            start = "gptq" if kind == "refined" else "exact"
            return solvers.quantize_refined(w, hs, grid, start=start, keep_mask=keep, damp=damp,
                                            progress=run.verbose), kind, bits, ""
        return solvers.quantize_gptq(w, hs, grid, keep_mask=keep, damp=damp), kind, bits, ""

    return run.execute(solve)


def inspect(model: nn.Module, calib, include=None, exclude=None, device=None, *, time_first=None,
            time_steps=None, step_fn=None) -> list[Target]:
    """The compressible modules of ``model`` (weight layer, BatchNorm, neuron, kernel, and how the
    model is driven: ``target.driver``), found by running the first calibration batch. The keyword
    options are those of :class:`osbc.PruneConfig`."""
    dev = resolve_device(device)
    try:
        x = next(iter(batches(calib, 2, time_first=time_first, time_steps=time_steps)))
    except StopIteration:
        raise OsbcError("the calibration set is empty: pass at least one sample") from None
    reset(model)
    home = next((p.device for p in model.parameters()), torch.device("cpu"))
    model.to(dev)
    try:
        return find_modules(model, x[:, :2].to(dev), include, exclude, step_fn=step_fn)
    finally:
        model.to(home)
