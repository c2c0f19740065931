"""Typed errors: each carries a one-line message naming the input and the cause.

Library messages describe the problem in library terms. Where a user can fix it by asking
for something different, the error names that remedy in ``fix`` (a key of ``FIXES``), and
the command line turns it into a flag hint; the Python API keeps the plain message.
"""

from __future__ import annotations

from typing import Any

# fix key -> what it means, in library terms (the CLI maps each key to its flags).
FIXES = {
    "start_over": "start over instead of resuming (resume=False)",
    "other_output": "write to another output",
    "extend": "add only the inputs the output lacks (extend=True)",
    "overwrite": "replace the existing checkpoint (overwrite=True)",
    "resume_processes": "resume the processes that stopped, then merge",
    "lower_learning_rate": "lower the learning rate or add warmup steps",
    "smaller_batch": "use a smaller batch size",
}


class CaptionerError(Exception):
    """Base class of every error this package raises on purpose.

    The command line prints ``str(error)`` as one line (plus a flag hint for ``fix``) and
    exits without a traceback.

    Attributes:
      fix: keys of ``FIXES`` a user can apply; empty when nothing but other input helps.
    """

    def __init__(self, message: str, *, fix: tuple[str, ...] = ()):
        super().__init__(message)
        unknown = set(fix) - set(FIXES)
        if unknown:
            raise ValueError(f"unknown fix keys {sorted(unknown)}")
        self.fix = tuple(fix)


class OptionError(CaptionerError, ValueError):
    """An option or generation setting holds a value no run accepts, or values that exclude
    each other; raised before any work.

    The message is ``f"{field} {problem}"``: it names the field as Python does, and the
    command line shows the field's flag in its place (``--num-beams must be ...``).

    Attributes:
      field: the field's name (of ``CaptionOptions``, ``GenerationSettings`` or
        ``TrainConfig``).
      problem: the message after the field's name.
    """

    def __init__(self, field: str, problem: str):
        super().__init__(f"{field} {problem}")
        self.field = field
        self.problem = problem

    def __reduce__(self) -> tuple:  # pickled back from Ray actors
        return type(self), (self.field, self.problem)


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

    def __reduce__(self) -> tuple:  # pickled back from decoding processes (decode_processes)
        return type(self), (self.path, self.reason)


class StorageError(CaptionerError):
    """An object store (or other remote file system) kept failing (connection refused or
    reset, timeouts, throttling, 5xx) for longer than the retry window: the run stops instead
    of writing error rows for images that may be fine. The rows committed so far are kept, so
    running the same command again continues from them.

    Attributes:
      path: the object being read or written.
      reason: the last failure, with how long it was retried, without the path.
    """

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}; the rows committed so far are kept, and running "
                         "the same command again continues from them")
        self.path = path
        self.reason = reason

    def __reduce__(self) -> tuple:  # pickled back from Ray actors
        return type(self), (self.path, self.reason)


class DataError(CaptionerError):
    """Inputs or a dataset are unusable (a glob matching nothing, a missing column, empty)."""


class OutputError(CaptionerError):
    """The output cannot be written, or holds something other than this pipeline's rows."""


class PipelineInterrupted(CaptionerError):
    """SIGINT or SIGTERM stopped the run after a clean flush; running it again resumes.

    Attributes:
      signal_number: the signal that stopped the run.
      stats: what was done before the signal (a ``pipeline.PipelineStats``); None when a
        second signal cut the run short.
    """

    def __init__(self, message: str, stats: Any, signal_number: int):
        super().__init__(message)
        self.stats = stats
        self.signal_number = signal_number


class NonFiniteLossError(CaptionerError):
    """Training produced a NaN or infinite loss, gradient or parameter; nothing was saved."""


class ProcessGroupError(CaptionerError):
    """Another process of a multi-process run failed, or never reported its end; this one
    stopped too, keeping its work (``multihost.finish``).

    Attributes:
      process_index: the process that failed or did not report (the lowest such index).
    """

    def __init__(self, message: str, process_index: int):
        super().__init__(message)
        self.process_index = process_index
