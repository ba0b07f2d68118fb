"""Accuracy plots for demo and sweep results (matplotlib, Agg backend, optional dependency)."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["plot_results"]

_STYLE = {"osbc": dict(color="tab:red", marker="o", zorder=4), "obc": dict(color="tab:blue", marker="s"),
          "magnitude": dict(color="tab:gray", marker="^"), "rtn": dict(color="tab:green", marker="v")}


def plot_results(rows: list[dict], dense_accuracy: float, path: str | os.PathLike, title: str = "",
                 dense_std: float | None = None) -> Path:
    """Write a two-panel PNG: accuracy against sparsity (pruning) and against bits (quantization).

    ``rows``: dicts with ``task`` ("prune"/"quantize"), ``method``, ``level`` (sparsity or bits),
    ``accuracy`` (0..1) and optionally ``accuracy_std`` (drawn as error bars). Written atomically."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:  # pragma: no cover - matplotlib is in the test/plot extras
        raise ValueError("plotting needs matplotlib: pip install matplotlib") from e
    path = Path(path)
    tasks = [t for t in ("prune", "quantize") if any(r["task"] == t for r in rows)] or ["prune"]
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.2 * len(tasks), 4.0), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        sub = [r for r in rows if r["task"] == task]
        for method in dict.fromkeys(r["method"] for r in sub):
            pts = sorted((r for r in sub if r["method"] == method), key=lambda r: r["level"])
            x = [100 * r["level"] if task == "prune" else r["level"] for r in pts]
            y = [100 * r["accuracy"] for r in pts]
            err = [100 * r.get("accuracy_std", 0.0) for r in pts]
            ax.errorbar(x, y, yerr=err if any(err) else None, label=method, capsize=3, lw=1.6, ms=5,
                        **_STYLE.get(method, {}))
        ax.axhline(100 * dense_accuracy, color="black", ls="--", lw=1, label="dense")
        if dense_std:
            ax.axhspan(100 * (dense_accuracy - dense_std), 100 * (dense_accuracy + dense_std), color="black",
                       alpha=0.08)
        if task == "prune":
            ax.set_xlabel("sparsity (%)")
            ax.set_title("pruning")
        else:
            ax.set_xlabel("bits per weight")
            ax.invert_xaxis()
            levels = sorted({r["level"] for r in sub})
            ax.set_xticks(levels)
            ax.set_title("quantization")
        ax.set_ylabel("test accuracy (%)")
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
        ax.legend(loc="lower left", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    from .checkpoint import atomic_write

    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    finally:
        plt.close(fig)
    return path
