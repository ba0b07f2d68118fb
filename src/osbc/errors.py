"""The project's user-error type.

Anything the user can fix (a bad argument, file, model or layer) raises :class:`OsbcError` with a
one-line message that names the culprit and says what to do. The CLI prints exactly these as one
line; any other exception is a bug and keeps its traceback. It subclasses ``ValueError`` so that
callers catching ``ValueError`` keep working.
"""

from __future__ import annotations

__all__ = ["OsbcError"]


class OsbcError(ValueError):
    """A user error: bad input, argument, file or model, reported in one line."""
