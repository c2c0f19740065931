"""Typed errors: each carries a one-line message naming the input and the cause."""

from __future__ import annotations


class CaptionerError(Exception):
    """Base class of every error this package raises on purpose.

    The command line prints ``str(error)`` as one line and exits without a traceback.
    """


class ModelLoadError(CaptionerError):
    """A checkpoint could not be found, downloaded, read or converted."""


class ImageReadError(CaptionerError):
    """One image could not be read; the rest of a batch goes on.

    Attributes:
      path: the input as given (a path string, or ``"<PIL.Image>"`` for in-memory images).
      reason: what went wrong, without the path.
    """

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


class DataError(CaptionerError):
    """A training or evaluation dataset is unusable (missing column, empty, unreadable file)."""
