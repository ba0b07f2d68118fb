"""osbc: one-shot pruning and quantization of spiking neural networks (Optimal Spiking Brain Compression).

    import osbc
    res = osbc.prune(model, calib, sparsity=0.97)      # or osbc.quantize(model, calib, bits=4)
    res.model, res.report
"""

from . import kernels, models, snn
from .report import LayerReport, Report

_LAZY = {"prune": "compress", "quantize": "compress", "inspect": "compress", "Compressed": "compress",
         "export_nir": "nir_export", "save_compressed": "storage", "load_compressed": "storage",
         "size_report": "storage", "train": "training", "evaluate": "training", "TrainResult": "training",
         "Evaluation": "training", "save": "checkpoint", "load": "checkpoint", "PruneConfig": "config",
         "QuantConfig": "config"}


def __getattr__(name: str):
    # Heavy modules load on first use, so `import osbc` (and the CLI's --help) stays fast.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'osbc' has no attribute {name!r}")

__version__ = "0.1.0"

__all__ = ["prune", "quantize", "inspect", "Compressed", "PruneConfig", "QuantConfig", "Report", "LayerReport", "train", "evaluate", "save", "load",
           "export_nir", "save_compressed", "load_compressed", "size_report", "snn", "kernels", "models",
           "__version__"]
