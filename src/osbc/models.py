"""Reference spiking networks: the paper's architectures and a small CPU-friendly conv net.

Every model takes multi-step input ``[T, B, C, H, W]`` (time first) and returns the output layer's
spikes ``[T, B, classes]``; the prediction is the argmax of their time mean. Stateless per-step
layers (conv, BatchNorm, pooling) are wrapped in :class:`SeqToANN`, which folds time into the batch
(``[T*B, ...]``) around them, so every weight layer sees an ordinary 4-D/2-D batch and every neuron
a ``[T, B, ...]`` sequence. Call :func:`osbc.snn.reset` before each batch.

Build a model by name with :func:`build`; the name and the keyword arguments are kept on the model
(``model.osbc_config``) so that a checkpoint can rebuild it (see :mod:`osbc.checkpoint`)::

    model = osbc.models.build("nmnist_mlp", in_shape=(2, 34, 34), hidden=256, classes=10)

Registered names (:func:`available`): ``nmnist_mlp``, ``dvsgesture_net``, ``cifar10dvs_net``
(``cifar10dvs_net64`` is the 64x64 variant), ``small_conv``. Add your own with :func:`register`,
or build a model with your own function, named ``"package.module:function"`` (:func:`build_with`).
"""

from __future__ import annotations

import contextvars
import copy
import importlib
import inspect
import math
import re
from collections import OrderedDict
from typing import Callable

import torch
from torch import Tensor, nn

from . import snn
from .errors import OsbcError

__all__ = ["SeqToANN", "SeqDropout", "Voting", "SpikingNet", "build", "skeleton", "register", "available",
           "config_of", "check_builder", "build_with", "nmnist_mlp", "dvsgesture_net", "cifar10dvs_net", "small_conv", "default_arch",
           "MAX_PARAMETERS"]

# The largest model build() makes: 2^28 parameters and buffers (1 GiB as float32), 60x the paper's
# biggest network. Anything larger is a typo or a hostile checkpoint, not an SNN to compress.
MAX_PARAMETERS = 1 << 28
_MAX_SIZE = 1 << 24   # any single size argument (channels, hidden, a side of in_shape, ...)

# Where the built-in architectures put their weight layers (Linear, Conv, BatchNorm): None = torch's
# default; "meta" inside skeleton(), so shapes can be checked before any memory is allocated.
_LAYER_DEVICE: contextvars.ContextVar = contextvars.ContextVar("osbc_layer_device", default=None)


def _dev():
    return _LAYER_DEVICE.get()


# ---- building blocks --------------------------------------------------------------------------

class SeqToANN(nn.Sequential):
    """Apply stateless per-step modules to a ``[T, B, ...]`` sequence by folding time into the
    batch: ``[T, B, ...] -> [T*B, ...] -> modules -> [T, B, ...]`` (children named 0, 1, ...)."""

    def forward(self, x: Tensor) -> Tensor:
        T, B = x.shape[:2]
        y = super().forward(x.flatten(0, 1))
        return y.reshape(T, B, *y.shape[1:])


class SeqDropout(nn.Module):
    """Dropout with one mask per sample shared by all time steps (as spikingjelly's
    ``layer.Dropout``), so a dropped unit stays silent for the whole sequence."""

    def __init__(self, p: float = 0.5):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise OsbcError(f"dropout p must be in [0, 1), got {p}")
        self.p = float(p)

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        mask = torch.empty_like(x[:1]).bernoulli_(1.0 - self.p) / (1.0 - self.p)
        return x * mask

    def extra_repr(self) -> str:
        return f"p={self.p}"


class Voting(nn.Module):
    """Average the last dimension over consecutive groups of ``group`` units (a fixed average pool,
    no weights): ``[..., classes * group] -> [..., classes]``."""

    def __init__(self, group: int):
        super().__init__()
        if group < 1:
            raise OsbcError(f"voting group must be >= 1, got {group}")
        self.group = int(group)

    def forward(self, x: Tensor) -> Tensor:
        if self.group == 1:
            return x
        return x.unflatten(-1, (x.shape[-1] // self.group, self.group)).mean(-1)

    def extra_repr(self) -> str:
        return f"group={self.group}"


class SpikingNet(nn.Sequential):
    """A sequence of named multi-step layers, with the input shape it expects (one time step of one
    sample, e.g. ``(2, 34, 34)``)."""

    def __init__(self, layers: list[tuple[str, nn.Module]], in_shape: tuple[int, ...]):
        super().__init__(OrderedDict(layers))
        self.in_shape = tuple(int(s) for s in in_shape)

    def extra_repr(self) -> str:
        return f"in_shape={self.in_shape}"


def make_neuron(neuron: str = "lif", tau: float = 2.0, v_threshold: float = 1.0, decay_input: bool = True,
                detach_reset: bool = False) -> nn.Module:
    """One of osbc's neurons by name: ``lif`` (spikingjelly LIFNode, hard reset to 0), ``plif``, ``if``."""
    n = neuron.lower()
    if n == "lif":
        return snn.LIF(tau=tau, decay_input=decay_input, v_threshold=v_threshold, detach_reset=detach_reset)
    if n == "plif":
        return snn.PLIF(init_tau=tau, decay_input=decay_input, v_threshold=v_threshold, detach_reset=detach_reset)
    if n == "if":
        return snn.IF(v_threshold=v_threshold, detach_reset=detach_reset)
    raise OsbcError(f"neuron must be one of lif, plif, if; got {neuron!r}")


def _shape(in_shape) -> tuple[int, int, int]:
    ok = isinstance(in_shape, (list, tuple)) and len(in_shape) == 3
    if ok:
        ok = all(isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= _MAX_SIZE for v in in_shape)
    if not ok:
        raise OsbcError(f"in_shape must be (channels, height, width) with integer sizes in 1..{_MAX_SIZE}, "
                        f"got {in_shape!r}")
    return tuple(in_shape)


def _conv_blocks(c_in: int, channels: int, blocks: int, neuron: dict) -> list[tuple[str, nn.Module]]:
    layers: list[tuple[str, nn.Module]] = []
    for i in range(1, blocks + 1):
        layers += [(f"conv{i}", SeqToANN(nn.Conv2d(c_in if i == 1 else channels, channels, 3, padding=1, bias=False,
                                                   device=_dev()),
                                         nn.BatchNorm2d(channels, device=_dev()))),
                   (f"sn{i}", make_neuron(**neuron)),
                   (f"pool{i}", SeqToANN(nn.MaxPool2d(2)))]
    return layers


def _head(feat: int, hidden: int, out: int, vote: int, dropout: float | None, neuron: dict):
    layers = [("flatten", nn.Flatten(2))]
    if dropout:
        layers.append(("dropout", SeqDropout(dropout)))
    layers += [("fc1", nn.Linear(feat, hidden, bias=False, device=_dev())), ("sn_fc1", make_neuron(**neuron)),
               ("fc2", nn.Linear(hidden, out * vote, bias=False, device=_dev())), ("sn_fc2", make_neuron(**neuron))]
    if vote > 1:
        layers.append(("vote", Voting(vote)))
    return layers


def _pooled(size: int, blocks: int, name: str) -> int:
    out = size
    for _ in range(blocks):
        out //= 2
    if out < 1:
        raise OsbcError(f"{name}: in_shape: an input of {size} pixels is too small for {blocks} pooling stages; "
                        f"use at least {2 ** blocks}")
    return out


# ---- the architectures ------------------------------------------------------------------------

def nmnist_mlp(in_shape=(2, 34, 34), hidden: int = 256, classes: int = 10, neuron: str = "lif", tau: float = 2.0,
               bias: bool = False) -> SpikingNet:
    """The paper's N-MNIST network: Flatten, Linear(2312->256), LIF, Linear(256->10), LIF (no bias)."""
    s = _shape(in_shape)
    nk = dict(neuron=neuron, tau=tau)
    return SpikingNet([("flatten", nn.Flatten(2)), ("fc1", nn.Linear(math.prod(s), hidden, bias=bias, device=_dev())),
                       ("sn1", make_neuron(**nk)), ("fc2", nn.Linear(hidden, classes, bias=bias, device=_dev())),
                       ("sn2", make_neuron(**nk))], in_shape=s)


def dvsgesture_net(in_shape=(2, 128, 128), channels: int = 128, blocks: int = 5, hidden: int = 500,
                   classes: int = 11, vote: int = 10, dropout: float = 0.5, neuron: str = "lif",
                   tau: float = 2.0) -> SpikingNet:
    """The paper's DVS128 Gesture network: 5 x [Conv3x3(128), BN, LIF, MaxPool2], Flatten, Dropout,
    Linear(2048->500), LIF, Linear(500->110), LIF, voting over groups of 10 -> 11 classes."""
    c, h, w = _shape(in_shape)
    nk = dict(neuron=neuron, tau=tau)
    feat = channels * _pooled(h, blocks, "dvsgesture_net") * _pooled(w, blocks, "dvsgesture_net")
    layers = _conv_blocks(c, channels, blocks, nk) + _head(feat, hidden, classes, vote, dropout, nk)
    return SpikingNet(layers, in_shape=(c, h, w))


def cifar10dvs_net(in_shape=(2, 128, 128), channels: int = 128, blocks: int = 4, hidden: int | None = None,
                   classes: int = 10, vote: int = 10, dropout: float = 0.5, neuron: str = "lif",
                   tau: float = 2.0) -> SpikingNet:
    """The paper's CIFAR10-DVS network: 4 x [Conv3x3(128), BN, LIF, MaxPool2], Flatten, Dropout,
    Linear(8192->512) at 128x128 (2048->500 at 64x64), LIF, Linear(->100), LIF, voting -> 10.
    ``hidden=None`` picks 512 for 128x128 input and 500 otherwise."""
    c, h, w = _shape(in_shape)
    if hidden is None:
        hidden = 512 if (h, w) == (128, 128) else 500
    nk = dict(neuron=neuron, tau=tau)
    feat = channels * _pooled(h, blocks, "cifar10dvs_net") * _pooled(w, blocks, "cifar10dvs_net")
    layers = _conv_blocks(c, channels, blocks, nk) + _head(feat, hidden, classes, vote, dropout, nk)
    return SpikingNet(layers, in_shape=(c, h, w))


def cifar10dvs_net64(in_shape=(2, 64, 64), **kwargs) -> SpikingNet:
    """The 64x64 CIFAR10-DVS variant (Linear 2048->500)."""
    return cifar10dvs_net(in_shape=in_shape, **kwargs)


def small_conv(in_shape=(2, 34, 34), channels: int = 16, hidden: int = 128, classes: int = 10,
               neuron: str = "lif", tau: float = 2.0) -> SpikingNet:
    """A small conv net that trains on 2 CPU cores: 2 x [Conv3x3, BN, LIF, MaxPool2] with
    ``channels`` and ``2*channels`` maps, Flatten, Linear(->hidden), LIF, Linear(->classes), LIF."""
    c, h, w = _shape(in_shape)
    nk = dict(neuron=neuron, tau=tau)
    c2 = 2 * channels
    feat = c2 * _pooled(h, 2, "small_conv") * _pooled(w, 2, "small_conv")
    layers = [("conv1", SeqToANN(nn.Conv2d(c, channels, 3, padding=1, bias=False, device=_dev()),
                                 nn.BatchNorm2d(channels, device=_dev()))),
              ("sn1", make_neuron(**nk)), ("pool1", SeqToANN(nn.MaxPool2d(2))),
              ("conv2", SeqToANN(nn.Conv2d(channels, c2, 3, padding=1, bias=False, device=_dev()),
                                 nn.BatchNorm2d(c2, device=_dev()))),
              ("sn2", make_neuron(**nk)), ("pool2", SeqToANN(nn.MaxPool2d(2)))]
    layers += _head(feat, hidden, classes, 1, None, nk)
    return SpikingNet(layers, in_shape=(c, h, w))


# ---- registry ---------------------------------------------------------------------------------

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}
_BUILTIN: set[str] = set()  # osbc's own architectures: arguments checked, shapes built on the meta device


def register(name: str, builder: Callable[..., nn.Module] | None = None):
    """Register ``builder(**kwargs) -> nn.Module`` under ``name`` (usable as a decorator).
    Keyword arguments must be JSON-serialisable so checkpoints can record them."""
    def deco(fn):
        _REGISTRY[name] = fn
        _BUILTIN.discard(name)
        return fn
    return deco(builder) if builder is not None else deco


for _fn in (nmnist_mlp, dvsgesture_net, cifar10dvs_net, cifar10dvs_net64, small_conv):
    register(_fn.__name__, _fn)
    _BUILTIN.add(_fn.__name__)


def available() -> list[str]:
    """Names accepted by :func:`build`."""
    return sorted(_REGISTRY)


def _jsonable(v):
    if isinstance(v, (tuple, list)):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, Tensor):
        return v.tolist()
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    raise OsbcError(f"model argument {v!r} of type {type(v).__name__} cannot be recorded in a checkpoint")


def _is_real(v) -> bool:
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        return False
    try:
        return math.isfinite(v)
    except OverflowError:  # an int beyond float range
        return False


def _check_builtin_args(name: str, kwargs: dict) -> None:
    """Types and ranges of the built-in architectures' arguments (a checkpoint's metadata or the
    command line can hold anything); the parameter budget is checked on the built skeleton."""
    def bad(arg, want):
        raise OsbcError(f"model {name!r}: argument {arg}={kwargs[arg]!r} is invalid; {want}")

    for arg, v in kwargs.items():
        if arg == "in_shape":
            _shape(v)
        elif arg in ("hidden", "channels", "classes", "vote", "blocks"):
            if v is None and arg == "hidden" and name.startswith("cifar10dvs"):
                continue
            top = 32 if arg == "blocks" else _MAX_SIZE
            if not (isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= top):
                bad(arg, f"use an integer in 1..{top}")
        elif arg == "tau":
            if not _is_real(v):
                bad(arg, "use a finite number")
        elif arg == "dropout":
            if not (v is None or (_is_real(v) and 0 <= v < 1)):
                bad(arg, "use a number in [0, 1)")
        elif arg == "neuron":
            if not isinstance(v, str):
                bad(arg, "use one of lif, plif, if")
        elif arg == "bias":
            if not isinstance(v, bool):
                bad(arg, "use true or false")


def _check_call(name, kwargs: dict) -> Callable[..., nn.Module]:
    if not isinstance(name, str) or name not in _REGISTRY:
        raise OsbcError(f"unknown model {name!r}; choose one of {', '.join(available())}")
    fn = _REGISTRY[name]
    sig = inspect.signature(fn)
    if not any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()):
        bad = sorted(set(kwargs) - set(sig.parameters))
        if bad:
            raise OsbcError(f"model {name!r} has no argument(s) {', '.join(bad)}; "
                            f"it takes {', '.join(sig.parameters)}")
    if name in _BUILTIN:
        _check_builtin_args(name, kwargs)
    return fn


def _make(name: str, fn, kwargs: dict, meta: bool) -> nn.Module:
    token = _LAYER_DEVICE.set("meta" if meta else None)
    try:
        model = fn(**kwargs)
    except OsbcError:
        raise
    except (TypeError, ValueError) as e:
        raise OsbcError(f"cannot build model {name!r}: {e}") from None
    finally:
        _LAYER_DEVICE.reset(token)
    if not isinstance(model, nn.Module):
        raise OsbcError(f"model {name!r}: its builder returned a {type(model).__name__}, not a torch.nn.Module")
    n = sum(t.numel() for t in model.state_dict().values())
    if n > MAX_PARAMETERS:
        args = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
        raise OsbcError(f"model {name!r} ({args}) would hold {n:,} parameters, over osbc's limit of "
                        f"{MAX_PARAMETERS:,}; use smaller sizes")
    return model


def skeleton(name: str, **kwargs) -> nn.Module:
    """The model :func:`build` would return, with the built-in architectures' weight layers on the
    ``meta`` device: every parameter's shape and dtype, no memory. Raises the same errors as
    :func:`build`. Builders added with :func:`register` are built for real."""
    fn = _check_call(name, kwargs)
    model = _make(name, fn, kwargs, meta=name in _BUILTIN)
    model.osbc_config = {"arch": name, "kwargs": _jsonable(kwargs)}
    return model


def build(name: str, **kwargs) -> nn.Module:
    """Build a registered architecture by name; the name and arguments are stored on the model as
    ``model.osbc_config = {"arch": name, "kwargs": {...}}``. Bad arguments (wrong type, not
    positive, an input too small for the pooling stages, a model over :data:`MAX_PARAMETERS`)
    raise :class:`~osbc.errors.OsbcError` before any weight memory is allocated."""
    fn = _check_call(name, kwargs)
    recorded = _jsonable(kwargs)
    if name in _BUILTIN:
        _make(name, fn, kwargs, meta=True)  # the budget, checked without allocating
    model = _make(name, fn, kwargs, meta=False)
    model.osbc_config = {"arch": name, "kwargs": recorded}
    return model


# ---- a user's builder: "package.module:function" ------------------------------------------------

_IDENT = r"[A-Za-z_][A-Za-z0-9_]*"
_BUILDER = re.compile(rf"{_IDENT}(\.{_IDENT})*:{_IDENT}(\.{_IDENT})*")


def check_builder(spec) -> str:
    """``spec`` is a builder name ``"package.module:function"`` (Python identifiers); nothing is imported."""
    if not isinstance(spec, str) or len(spec) > 200 or not _BUILDER.fullmatch(spec):
        raise OsbcError(f"builder {spec!r} is not of the form package.module:function (Python identifiers)")
    return spec


def _one_line(e: BaseException) -> str:
    return " ".join(f"{type(e).__name__}: {e}".split())


def build_with(spec: str, kwargs: dict | None = None) -> nn.Module:
    """Import ``spec`` (``"package.module:function"``) and call it with ``kwargs`` (JSON values);
    the model records both as ``model.osbc_config = {"builder": spec, "kwargs": {...}}``, so
    :func:`osbc.save` can name them. This runs the user's code: call it only on the user's say."""
    check_builder(spec)
    kwargs = dict(kwargs or {})
    recorded = _jsonable(kwargs)
    module, name = spec.split(":")
    try:
        fn = importlib.import_module(module)
    except Exception as e:  # noqa: BLE001 - any failure of the user's module, reported in one line
        raise OsbcError(f"builder {spec}: cannot import {module} ({_one_line(e)})") from None
    for part in name.split("."):
        fn = getattr(fn, part, None)
    if not callable(fn):
        raise OsbcError(f"builder {spec}: module {module} has no function {name}")
    model = _make(spec, fn, kwargs, meta=False)
    model.osbc_config = {"builder": spec, "kwargs": recorded}
    return model


def config_of(model: nn.Module) -> dict | None:
    """The ``{"arch", "kwargs"}`` a model was built with (``{"builder", "kwargs"}`` from
    :func:`build_with`; None for models built otherwise)."""
    cfg = getattr(model, "osbc_config", None)
    return copy.deepcopy(cfg) if cfg is not None else None


# Default architecture per dataset (the paper's, and the N-MNIST MLP for the offline digits).
_DEFAULT_ARCH = {"digits": "nmnist_mlp", "nmnist": "nmnist_mlp", "dvsgesture": "dvsgesture_net",
                 "cifar10dvs": "cifar10dvs_net"}


def default_arch(dataset: str, in_shape: tuple[int, ...], classes: int) -> tuple[str, dict]:
    """``(name, kwargs)`` of the paper's model for ``dataset`` at input shape ``in_shape``."""
    name = _DEFAULT_ARCH.get(dataset)
    if name is None:
        raise OsbcError(f"no default model for dataset {dataset!r}")
    return name, {"in_shape": list(in_shape), "classes": int(classes)}
