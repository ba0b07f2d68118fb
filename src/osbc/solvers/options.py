"""Tuning of the greedy engine, passed explicitly, and what a solve counted.

The defaults are the measured best on CPU (see bench/bench_solvers.py --ablate); tests and
benchmarks pass other values instead of patching module state, so concurrent solves with
different settings cannot interfere.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field

from ..errors import OsbcError

__all__ = ["EngineOptions", "EngineStats", "DEFAULT_OPTIONS", "DEFAULT_MAX_MEMORY", "memory_budget"]

DEFAULT_MAX_MEMORY = 384 * 2 ** 20      # bytes per chunk of rows on CPU
_GPU_SHARE = 8                          # on a GPU: this share of its free memory (at least the CPU's)


def memory_budget(max_memory, device, who: str = "memory_budget") -> int:
    """The solvers' ``max_memory`` (bytes a chunk of rows may take): as given, or with None the
    device's default: DEFAULT_MAX_MEMORY on CPU (chunks about as large as the caches pay), an
    eighth of the free memory on a GPU, where a step on a few rows is bound by its kernel
    launches, not its arithmetic: there the number of chunks, not their size, sets the time.
    ``who`` names the caller in the error for a bad value."""
    import numbers

    import torch
    if max_memory is None:
        device = torch.device(device)
        if device.type != "cuda":
            return DEFAULT_MAX_MEMORY
        return max(DEFAULT_MAX_MEMORY, torch.cuda.mem_get_info(device)[0] // _GPU_SHARE)
    if isinstance(max_memory, bool) or not isinstance(max_memory, numbers.Integral) or max_memory < 1:
        raise OsbcError(f"{who}: max_memory must be a positive int of bytes (or None for the device's default), "
                        f"got {max_memory!r}")
    return int(max_memory)


@dataclass(frozen=True)
class EngineOptions:
    """Settings of the exact greedy (``obs_path``, ``prune_exact``, ``quantize_obq``).

    lazy: most steps between batched H^-1 downdates with the torch steps; lazy_jit: the same for
    the compiled steps (they read one row's pending term at a time, so longer batches pay);
    ucache: bytes the torch steps' pending term may take (it is re-read at every step, so it stays
    about cache-sized); panel: row panel of the lower-triangle flush; workers: most row chunks
    solved at once on CPU (1: one at a time, on all threads); step_threads: intra-op threads of
    the per-step vector work when one chunk runs at a time (None: leave as is); compact: shrink
    the active window after each flush (off only to measure what it saves); jit: the compiled
    CPU steps when numba is installed (off: torch steps)."""

    lazy: int = 128
    lazy_jit: int = 256
    ucache: int = 32 * 2 ** 20
    panel: int = 128
    workers: int = 4
    step_threads: int | None = 1
    compact: bool = True
    jit: bool = True

    def __post_init__(self):
        for name in ("lazy", "lazy_jit", "ucache", "panel", "workers"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise OsbcError(f"EngineOptions.{name} must be a positive integer, got {v!r}")


DEFAULT_OPTIONS = EngineOptions()


@dataclass
class EngineStats:
    """Filled by a solve given ``stats=``: ``flops``, the executed H^-1 update flops of the greedy
    (the lazy flushes and the pending-term reads), summed over all row chunks and calls."""

    flops: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, flops: int) -> None:
        with self._lock:            # row chunks finish on worker threads
            self.flops += int(flops)
