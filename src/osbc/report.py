"""What a compression run did, layer by layer."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["LayerReport", "Report"]


@dataclass
class LayerReport:
    name: str
    kind: str                    # Linear, Conv2d, ...
    shape: tuple[int, ...]
    kernel: str                  # the neuron kernel the error is measured with
    solver: str                  # exact, blocked, fast, magnitude, rtn
    sparsity: float              # fraction of zero weights after compression
    bits: int | None             # None for pruning only
    membrane_error: float | None  # ||K a dI||^2 / ||K a I||^2 over the calibration set
    current_error: float | None   # ||dI||^2 / ||I||^2
    seconds: float
    notes: str = ""


@dataclass
class Report:
    task: str                    # "prune" or "quantize"
    method: str
    settings: dict[str, Any]
    layers: list[LayerReport] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def sparsity(self) -> float:
        """Fraction of zero weights over all compressed layers."""
        n = [_numel(l.shape) for l in self.layers]
        return sum(l.sparsity * k for l, k in zip(self.layers, n)) / max(sum(n), 1)

    def __iter__(self):
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    def to_dict(self) -> dict[str, Any]:
        return {"task": self.task, "method": self.method, "settings": self.settings,
                "sparsity": self.sparsity, "seconds": self.seconds,
                "layers": [dict(asdict(l), shape=list(l.shape)) for l in self.layers]}

    def __str__(self) -> str:
        head = f"{self.task} with {self.method}: {len(self.layers)} layers, sparsity {self.sparsity:.4f}, " \
               f"{self.seconds:.2f} s"
        cols = ["layer", "type", "shape", "solver", "sparsity", "bits", "mem.err", "cur.err", "s"]
        rows = [[l.name, l.kind, "x".join(map(str, l.shape)), l.solver, f"{l.sparsity:.4f}",
                 "-" if l.bits is None else str(l.bits), _e(l.membrane_error), _e(l.current_error),
                 f"{l.seconds:.2f}"] for l in self.layers]
        width = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]
        fmt = "  ".join(f"{{:<{w}}}" for w in width)
        lines = [head] + [fmt.format(*r).rstrip() for r in [cols] + rows]
        lines += [f"  {l.name}: kernel {l.kernel}" + (f"; {l.notes}" if l.notes else "") for l in self.layers]
        return "\n".join(lines)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _e(v: float | None) -> str:
    return "-" if v is None else f"{v:.3e}"
