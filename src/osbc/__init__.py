"""osbc: one-shot pruning and quantization of spiking neural networks (Optimal Spiking Brain Compression).

    import osbc
    res = osbc.prune(model, calib, sparsity=0.97)      # or osbc.quantize(model, calib, bits=4)
    res.model, res.report

Every name is imported on first use, so ``import osbc`` (and the CLI's start-up) does not load torch.
"""

import importlib

# public name -> the module that defines it ("" for a submodule of the same name)
_LAZY = {
    "prune": "compress", "quantize": "compress", "inspect": "compress", "Compressed": "compress",
    "PruneConfig": "config", "QuantConfig": "config",
    "Report": "report", "LayerReport": "report",
    "train": "training", "evaluate": "training", "TrainResult": "training", "Evaluation": "training",
    "save": "checkpoint", "load": "checkpoint", "save_compressed": "checkpoint", "load_compressed": "checkpoint",
    "size_report": "storage", "export_nir": "nir_export",
    "freeze_sparsity": "deploy", "unfreeze_sparsity": "deploy", "quantized_codes": "deploy",
    "QuantizedCodes": "deploy",
    "snn": "", "kernels": "", "models": "", "neurons": "",
}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'osbc' has no attribute {name!r}")
    mod = importlib.import_module(f".{_LAZY[name] or name}", __name__)
    value = mod if not _LAZY[name] else getattr(mod, name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


__version__ = "0.1.0"

__all__ = [*_LAZY, "__version__"]
