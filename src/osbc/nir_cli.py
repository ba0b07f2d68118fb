"""``osbc export-nir``: write a checkpoint (dense or compressed) as a NIR graph.

Loaded by :mod:`osbc.cli` as a plugin (see ``PLUGINS`` there); needs the optional ``nir`` package.
"""

from __future__ import annotations

import argparse

from .cli import UserError, _check_out_file, _load_model, _pos_float, _pos_int, register_command


def _args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="checkpoint written by osbc train / prune / quantize (.safetensors)")
    p.add_argument("-o", "--out", default=None, help="output NIR file (default: MODEL with .nir suffix)")
    p.add_argument("--dt", type=_pos_float, default=1e-3,
                   help="seconds per time step; LIF tau_NIR = tau * dt (default 1e-3, snntorch's importer: 1e-4)")
    p.add_argument("--frames", type=_pos_int, default=4, metavar="T",
                   help="time steps of the zero sample used to read the layer order (default 4)")
    p.add_argument("-f", "--force", action="store_true", help="overwrite the output file")


def _run(args) -> int:
    import torch

    try:
        from .nir_export import export_nir
        import nir  # noqa: F401
    except ImportError:
        raise UserError("NIR export needs the nir package: pip install nir") from None
    model = _load_model(args.model, "cpu")
    in_shape = getattr(model, "in_shape", None)
    if in_shape is None:
        raise UserError("the model does not record its input shape")
    out = args.out or str(args.model).rsplit(".", 1)[0] + ".nir"
    path = _check_out_file(out, args.force, "NIR output")
    sample = torch.zeros(args.frames, 1, *in_shape)
    graph = export_nir(model.eval(), path, dt=args.dt, sample=sample,
                       metadata={"checkpoint": str(args.model)})
    kinds = [type(n).__name__ for k, n in graph.nodes.items() if k not in ("input", "output")]
    print(f"wrote {path}: {len(kinds)} nodes ({', '.join(kinds)}), dt={args.dt:g} s")
    return 0


register_command("export-nir", "write a checkpoint as a NIR graph (dense or compressed weights)", _args, _run,
                 common=False)
