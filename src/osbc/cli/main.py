"""The ``osbc`` command's parser, dispatch and error handling.

User errors (:class:`osbc.errors.OsbcError`: a bad argument, file, data set or model; a missing or
unreadable path; running out of memory) print one line ``osbc: error: ...`` on stderr and exit with
1, before any output file is written; argument syntax errors exit with 2 (argparse's convention),
Ctrl-C with 130. Any other exception is a bug and keeps its traceback. ``OSBC_DEBUG=1`` shows the
traceback of user errors too.
"""

from __future__ import annotations

import argparse
import os
import sys

from ..errors import OsbcError
from .common import out_of_memory
from .options import HelpFormatter

__all__ = ["main", "build_parser"]

#: errors the user fixes; everything else is a bug and shows its traceback
USER_ERRORS = (OsbcError, FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse's own convention), usage hint after
        self.exit(2, f"osbc: error: {message} (see: {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The parser of every subcommand (each command's module adds its options)."""
    from . import demo, export_nir, info, prune_quantize, sweep, train
    from . import eval as eval_cmd

    parser = Parser(prog="osbc", description="One-shot pruning and quantization of spiking neural networks "
                                             "with membrane-potential error (OSBC).")
    try:
        from importlib.metadata import PackageNotFoundError, version

        ver = version("osbc")
    except PackageNotFoundError:
        ver = "unknown"
    parser.add_argument("--version", action="version", version=f"osbc {ver}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    sub.required = True

    def add(name, help, add_arguments, run):
        p = sub.add_parser(name, help=help, description=help, formatter_class=HelpFormatter)
        add_arguments(p)
        p.set_defaults(func=run)

    add(demo.NAME, demo.HELP, demo.add_arguments, demo.run)
    add(train.NAME, train.HELP, train.add_arguments, train.run)
    add("prune", prune_quantize.COMMANDS["prune"], prune_quantize.add_prune_arguments,
        lambda a: prune_quantize.run(a, "prune"))
    add("quantize", prune_quantize.COMMANDS["quantize"], prune_quantize.add_quantize_arguments,
        lambda a: prune_quantize.run(a, "quantize"))
    for mod in (eval_cmd, sweep, info, export_nir):
        add(mod.NAME, mod.HELP, mod.add_arguments, mod.run)
    return parser


def _one_line(e: BaseException) -> str:
    msg = str(e).strip() or type(e).__name__
    if isinstance(e, OSError) and e.strerror and e.filename:
        msg = f"{e.strerror}: {e.filename}"
    return " ".join(msg.split())


def _run(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except USER_ERRORS as e:
        if os.environ.get("OSBC_DEBUG"):
            raise
        print(f"osbc: error: {_one_line(e)}", file=sys.stderr)
        return 1
    except (MemoryError, RuntimeError) as e:
        if not out_of_memory(e) or os.environ.get("OSBC_DEBUG"):
            raise
        print("osbc: error: out of memory; lower --frames or --batch-size (or --calib-samples, the model size)",
              file=sys.stderr)
        return 1


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code (0 ok, 1 error, 2 bad arguments, 130 interrupted).
    The commands import torch and osbc's heavy modules in here, so Ctrl-C while they load ends in
    one line too."""
    try:
        return _run(argv)
    except KeyboardInterrupt:
        print("osbc: interrupted", file=sys.stderr)
        return 130
