"""Training and evaluation of multi-step spiking networks.

Data everywhere follows the dataset convention, time *second*: a sample is ``frames [T, ...]`` with
an integer label, a batch ``[B, T, ...]``. Models are called time first (``[T, B, ...]``) and
return ``[T, B, classes]``; the prediction is the argmax of the time mean (the firing rate).
For evaluation the output may also be a tuple or list whose first element is that tensor, as
models written like the libraries' tutorials return it: snntorch's ``(spk, mem)``, norse's
``(out, state)``.

Accepted data: a torch ``Dataset`` of ``(frames, label)``, a ``DataLoader`` (or any iterable of
``(x, y)`` batches), or a pair of tensors ``(X [N, T, ...], y [N])``.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import snn
from .drive import labelled_batches
from .device import pinned_threads, resolve_device  # noqa: F401 - pinned_threads: public here too
from .errors import OsbcError
from .layers import is_weight_layer

__all__ = ["train", "evaluate", "TrainResult", "Evaluation", "predict", "weight_layers",
           "pinned_threads"]


# ---- data plumbing ----------------------------------------------------------------------------

def _split(batch) -> tuple[Tensor, Tensor | None]:
    if isinstance(batch, (tuple, list)):
        return batch[0], (batch[1] if len(batch) > 1 else None)
    return batch, None


def _time_first(x: Tensor) -> Tensor:
    return x.transpose(0, 1)


def _first(out):
    """The spike tensor of a model's or a neuron's output: the output itself, or the first element
    of a tuple / list (snntorch's ``(spk, mem)``, norse's ``(out, state)``)."""
    return out[0] if isinstance(out, (tuple, list)) and len(out) else out


def predict(model: nn.Module, x: Tensor, driver=None) -> Tensor:
    """Run ``model`` on a ``[B, T, ...]`` batch (state reset first); returns the time-mean output
    ``[B, classes]`` (the firing rates). The model gets ``[T, B, ...]`` and returns ``[T, B, classes]``,
    or a tuple / list whose first element is that tensor; or, with a ``driver``
    (:class:`osbc.drive.Driver`, e.g. a single-step model's loop), is run the driver's way."""
    if driver is not None:
        out = _first(driver(model, _time_first(x)))
    else:
        snn.reset(model)
        out = _first(model(_time_first(x)))
        snn.reset(model)
    if not isinstance(out, Tensor) or out.dim() != 3 or out.shape[1] != x.shape[0]:
        got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise OsbcError(f"{type(model).__name__} returned {got} for a batch of {x.shape[0]}; a model must return "
                        "[T, B, classes] (or a tuple whose first element is that tensor), time first")
    return out.float().mean(0)


def weight_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The Linear / Conv layers (the weights osbc compresses)."""
    return [(n, m) for n, m in model.named_modules() if is_weight_layer(m)]


# ---- training ---------------------------------------------------------------------------------

@dataclass
class TrainResult:
    """``model`` holds the best weights (by validation accuracy, else the last epoch's)."""

    model: nn.Module
    history: list[dict] = field(default_factory=list)
    best_accuracy: float | None = None
    best_epoch: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {"history": self.history, "best_accuracy": self.best_accuracy, "best_epoch": self.best_epoch,
                "seconds": self.seconds}


def _loss_fn(kind: str, classes: int, ce_scale: float) -> Callable[[Tensor, Tensor], Tensor]:
    if kind == "mse":
        return lambda rate, y: F.mse_loss(rate, F.one_hot(y, classes).to(rate.dtype))
    if kind == "ce":
        return lambda rate, y: F.cross_entropy(rate * ce_scale, y)
    raise OsbcError(f"loss must be 'mse' or 'ce', got {kind!r}")


def train(model: nn.Module, train_data, val_data=None, *, epochs: int = 10, batch_size: int = 64,
          lr: float = 1e-3, weight_decay: float = 0.0, loss: str = "mse", ce_scale: float = 10.0,
          device: str | torch.device | None = None, amp: bool | None = None, seed: int = 0,
          progress: bool = True, checkpoint: str | None = None, checkpoint_kw: dict | None = None,
          log: Callable[[str], None] | None = print, num_workers: int = 0,
          threads: int | None = None) -> TrainResult:
    """Train ``model`` with Adam and a cosine learning-rate schedule (per step, to 0).

    ``loss="mse"``: mean squared error between the output firing rate and the one-hot target (the
    paper); ``"ce"``: cross-entropy with ``ce_scale * rate`` as logits. Mixed precision (float16
    autocast + gradient scaling) is on by default on CUDA. After each epoch the model is evaluated
    on ``val_data`` (if given); the best state is kept in memory, loaded back at the end, and written
    to ``checkpoint`` (via :func:`osbc.save` with ``checkpoint_kw``) whenever it improves.

    Seeded: ``seed`` seeds torch's global RNG (dropout) and the shuffling (and with it the
    DataLoader workers' seeds); seed the model's initialisation yourself before building it. On CPU
    a run repeats bit for bit with the same seed, versions, CPU type and intra-op thread count;
    ``threads`` fixes that count during training (:func:`pinned_threads`; ``None`` keeps torch's,
    which defaults to the number of cores)."""
    if epochs < 1:
        raise OsbcError(f"epochs must be >= 1, got {epochs}")
    if batch_size < 1:
        raise OsbcError(f"batch_size must be >= 1, got {batch_size}")
    if not lr > 0:
        raise OsbcError(f"lr must be > 0, got {lr}")
    if threads is not None and threads < 1:
        raise OsbcError(f"threads must be >= 1 (or None for torch's setting), got {threads}")
    dev = resolve_device(device)
    use_amp = (dev.type == "cuda") if amp is None else bool(amp and dev.type == "cuda")
    torch.manual_seed(seed)
    model.to(dev)
    loader = labelled_batches(train_data, batch_size, shuffle=True, seed=seed, drop_last=False, num_workers=num_workers)
    try:
        steps = len(loader)
    except TypeError:
        steps = None
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs * steps)) if steps else None
    scaler = torch.amp.GradScaler("cuda") if use_amp else None
    classes = None
    lossf = None
    result = TrainResult(model=model)
    best_state = None
    t0 = time.time()
    from tqdm.auto import tqdm

    with pinned_threads(threads if dev.type == "cpu" else None):
        say = log or (lambda s: None)
        for epoch in range(1, epochs + 1):
            model.train()
            te = time.time()
            tot_loss = tot_correct = tot_n = 0
            bar = tqdm(loader, total=steps, desc=f"epoch {epoch}/{epochs}", leave=False, disable=not progress,
                       dynamic_ncols=True)
            for batch in bar:
                x, y = _split(batch)
                if y is None:
                    raise OsbcError("training needs labelled batches (x, y)")
                x, y = x.to(dev, non_blocking=True).float(), y.to(dev, non_blocking=True).long()
                snn.reset(model)
                with torch.autocast("cuda", dtype=torch.float16, enabled=use_amp):
                    out = model(_time_first(x))
                rate = out.float().mean(0)
                if lossf is None:
                    classes = rate.shape[-1]
                    lossf = _loss_fn(loss, classes, ce_scale)
                lval = lossf(rate, y)
                opt.zero_grad(set_to_none=True)
                if scaler is not None:
                    scaler.scale(lval).backward()
                    scaler.step(opt)
                    scaler.update()
                else:
                    lval.backward()
                    opt.step()
                if sched is not None:
                    sched.step()
                n = y.shape[0]
                tot_loss += lval.item() * n
                tot_correct += (rate.argmax(-1) == y).sum().item()
                tot_n += n
                bar.set_postfix(loss=f"{tot_loss / tot_n:.4f}", acc=f"{100 * tot_correct / tot_n:.1f}%")
            bar.close()
            snn.reset(model)
            rec = {"epoch": epoch, "loss": tot_loss / max(1, tot_n),
                   "train_accuracy": tot_correct / max(1, tot_n), "lr": opt.param_groups[0]["lr"]}
            if val_data is not None:
                rec["val_accuracy"] = evaluate(model, val_data, batch_size=max(batch_size, 128), device=dev,
                                               stats=False).accuracy
                score = rec["val_accuracy"]
            else:
                score = None
            rec["seconds"] = time.time() - te
            result.history.append(rec)
            keep = score is None or result.best_accuracy is None or score > result.best_accuracy
            if keep:
                best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
                result.best_accuracy, result.best_epoch = score, epoch
                if checkpoint is not None:
                    from .checkpoint import save

                    save(model, checkpoint, **(checkpoint_kw or {}))
            val = f"  val {100 * score:.2f}%" if score is not None else ""
            say(f"epoch {epoch:>3}/{epochs}  loss {rec['loss']:.4f}  "
                f"train {100 * rec['train_accuracy']:.2f}%{val}  ({rec['seconds']:.1f}s)"
                + ("  *" if keep and score is not None else ""))
    model.load_state_dict(best_state)
    model.eval()
    result.seconds = time.time() - t0
    return result


# ---- evaluation -------------------------------------------------------------------------------

@dataclass
class Evaluation:
    """Accuracy and cost of a spiking model on a data set.

    ``firing_rates``: per spiking neuron layer, spikes per neuron per time step (layers whose output
    is not 0/1 spikes, such as leaky-integrator readouts, are left out). ``synops``: synaptic
    operations per sample, summed over time: for every weight layer, each input spike (or event
    count) times the number of non-zero weights it drives. ``synops_dense``: the same spikes driving
    every weight. ``sparsity``: fraction of zero weights over all Linear/Conv weights.
    ``bytes_dense``/``bytes_stored``: model size as float32 and as stored compactly."""

    accuracy: float
    samples: int
    firing_rates: dict = field(default_factory=dict)
    mean_firing_rate: float = 0.0
    synops: float = 0.0
    synops_dense: float = 0.0
    sparsity: float = 0.0
    layer_sparsity: dict = field(default_factory=dict)
    bytes_dense: int = 0
    bytes_stored: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        lines = [f"accuracy      {100 * self.accuracy:.2f}%  ({self.samples} samples)",
                 f"firing rate   {self.mean_firing_rate:.4f} spikes/neuron/step (mean over layers)"]
        for k, v in self.firing_rates.items():
            lines.append(f"  {k:<24} {v:.4f}")
        ratio = self.synops / self.synops_dense if self.synops_dense else 1.0
        lines.append(f"synops        {self.synops:,.0f} per sample ({100 * ratio:.1f}% of dense {self.synops_dense:,.0f})")
        lines.append(f"sparsity      {100 * self.sparsity:.2f}% of weights are zero")
        for k, v in self.layer_sparsity.items():
            lines.append(f"  {k:<24} {100 * v:.2f}%")
        cr = self.bytes_dense / self.bytes_stored if self.bytes_stored else 1.0
        lines.append(f"size          {_human(self.bytes_dense)} dense, {_human(self.bytes_stored)} stored ({cr:.1f}x)")
        return "\n".join(lines)


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def model_size(model: nn.Module) -> tuple[int, int]:
    """(bytes as dense float32 state, bytes as stored compactly by :mod:`osbc.storage`)."""
    dense = sum(v.numel() * 4 if v.is_floating_point() else v.numel() * v.element_size()
                for v in model.state_dict().values() if isinstance(v, Tensor))
    stored = dense
    try:
        from . import storage
    except ImportError:
        storage = None
    if storage is not None and hasattr(storage, "size_report"):
        rep = storage.size_report(model)
        dense = int(_pick(rep, ("dense_bytes", "bytes_dense", "dense"), dense))
        stored = int(_pick(rep, ("compressed_bytes", "bytes_compressed", "stored_bytes", "bytes_stored",
                                 "compressed", "stored"), stored))
    return dense, stored


def _pick(d: dict, keys, default):
    for k in keys:
        if k in d and isinstance(d[k], (int, float)):
            return d[k]
    return default


@torch.no_grad()
def evaluate(model: nn.Module, data, *, batch_size: int = 128, device: str | torch.device | None = None,
             stats: bool = True, max_samples: int | None = None, progress: bool = False,
             step_fn=None) -> Evaluation:
    """Accuracy of ``model`` on ``data`` and, with ``stats=True``, per-layer firing rates, synaptic
    operations, weight sparsity and model size (see :class:`Evaluation`).

    The model is driven as :func:`osbc.prune` drives it (:mod:`osbc.drive`, found on the first
    batch): single-step models (snntorch ``init_hidden``, spikingjelly ``step_mode="s"``, norse
    ``*Cell`` stacks) get the loop over time from osbc, or from ``step_fn(model, x_t, state) ->
    (output, state)``.

    The model is called time first on each batch, ``model(x [T, B, ...])``, after a state reset, and
    returns ``[T, B, classes]`` or a tuple / list whose first element is that tensor (see
    :func:`predict`): models written as spikingjelly (multi-step), snntorch (a loop over time
    returning ``(spk, mem)``) and norse (``SequentialState`` returning ``(out, state)``) tutorials
    write them work as they are. A neuron's firing rate is read from its output, or from the first
    element when it returns a tuple (snntorch's ``(spk, mem)``, norse's ``(z, state)``)."""
    from . import neurons

    from .trace import trace

    dev = resolve_device(device) if not isinstance(device, torch.device) else device
    was_training = model.training
    model.to(dev).eval()
    stream = iter(labelled_batches(data, batch_size))
    first = next(stream, None)
    if first is None:
        raise OsbcError("no samples to evaluate")
    x0, _ = _split(first)
    driver = trace(model, _time_first(x0[:2].to(dev).float()), step_fn).driver
    hooks = []
    # Counters stay on the device (float64, so sums add up as exactly as Python floats would):
    # snntorch models call each neuron once per time step, and a .item() per call would sync each time.
    zero = torch.zeros((), dtype=torch.float64, device=dev)
    spikes: dict[str, list] = {}   # name -> [spike sum, entries, all outputs 0/1]
    synops = {"sparse": zero.clone(), "dense": zero.clone()}
    if stats:
        for name, m in model.named_modules():
            if neurons.is_neuron(m):
                spikes[name] = [zero.clone(), 0, torch.ones((), dtype=torch.bool, device=dev)]

                def hook(mod, inp, out, name=name):
                    s = _first(out)
                    if isinstance(s, Tensor):
                        acc = spikes[name]
                        acc[0] += s.float().sum().to(acc[0])
                        acc[1] += s.numel()
                        acc[2] &= ((s == 0) | (s == 1)).all().to(acc[2].device)
                hooks.append(m.register_forward_hook(hook))
        for name, m in weight_layers(model):
            def whook(mod, inp, out):
                x = inp[0].float()
                nz = (mod.weight != 0).to(x.dtype)
                ones = torch.ones_like(mod.weight, dtype=x.dtype)
                synops["sparse"] += _fanout_apply(mod, x, nz).to(zero)
                synops["dense"] += _fanout_apply(mod, x, ones).to(zero)
            hooks.append(m.register_forward_hook(whook))
    t0 = time.time()
    correct = n = 0
    from tqdm.auto import tqdm

    try:
        for batch in tqdm(itertools.chain([first], stream), desc="eval", leave=False, disable=not progress):
            x, y = _split(batch)
            if y is None:
                raise OsbcError("evaluation needs labelled batches (x, y)")
            if max_samples is not None and n >= max_samples:
                break
            if max_samples is not None and n + x.shape[0] > max_samples:
                x, y = x[: max_samples - n], y[: max_samples - n]
            rate = predict(model, x.to(dev).float(), driver)
            correct += (rate.argmax(-1).cpu() == y.long().cpu()).sum().item()
            n += x.shape[0]
    finally:
        for h in hooks:
            h.remove()
        snn.reset(model)
        model.train(was_training)
    if n == 0:
        raise OsbcError("no samples to evaluate")
    ev = Evaluation(accuracy=correct / n, samples=n, seconds=time.time() - t0)
    if stats:
        # Neurons that never ran, and those whose output is not 0/1 spikes (leaky-integrator readouts
        # such as norse's LI, which output their membrane), have no firing rate.
        ev.firing_rates = {k: s.item() / c for k, (s, c, binary) in spikes.items() if c and binary.item()}
        ev.mean_firing_rate = sum(ev.firing_rates.values()) / max(1, len(ev.firing_rates))
        ev.synops = synops["sparse"].item() / n
        ev.synops_dense = synops["dense"].item() / n
        zeros = total = 0
        for name, m in weight_layers(model):
            z = (m.weight == 0).sum().item()
            ev.layer_sparsity[name] = z / m.weight.numel()
            zeros += z
            total += m.weight.numel()
        ev.sparsity = zeros / total if total else 0.0
        ev.bytes_dense, ev.bytes_stored = model_size(model)
    return ev


def _fanout_apply(mod: nn.Module, x: Tensor, w: Tensor) -> Tensor:
    """sum over inputs of x * (number of non-zero weights of ``w`` it drives), computed by running
    the layer with the 0/1 weight pattern and summing its output (exact for padding and stride).
    A 0-d tensor on ``x``'s device."""
    if isinstance(mod, nn.Linear):  # any leading dims, [T, B, features] included
        return F.linear(x, w).sum()
    conv = next(fn for cls, fn in ((nn.Conv1d, F.conv1d), (nn.Conv2d, F.conv2d), (nn.Conv3d, F.conv3d))
                if isinstance(mod, cls))
    if x.dim() == w.dim() + 1:
        # A multi-step conv (spikingjelly's layer.Conv2d, step_mode "m") sees [T, B, C, ...] and folds
        # time into the batch itself before convolving; do the same.
        x = x.flatten(0, 1)
    if mod.padding_mode != "zeros":
        x = F.pad(x, mod._reversed_padding_repeated_twice, mode=mod.padding_mode)
        pad = 0
    else:
        pad = mod.padding
    return conv(x, w, None, mod.stride, pad, mod.dilation, mod.groups).sum()
