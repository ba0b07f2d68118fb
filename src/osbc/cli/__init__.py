"""The ``osbc`` command: demo, train, prune, quantize, eval, sweep, info, export-nir.

Every command works offline on ``--data digits`` (scikit-learn's handwritten digits turned into
N-MNIST-style events). One module per command; :mod:`.options` holds the shared options,
:mod:`.outputs` the output checks and all-or-none writes, :mod:`.main` the parser and error handling.
Importing this package is cheap: commands import torch and osbc's compression code when they run.
"""

from ..errors import OsbcError
from .main import build_parser, main

#: the command line's user-error type is the project's
UserError = OsbcError

__all__ = ["main", "build_parser", "UserError"]
