"""Ending a multi-process run together, within a bounded time, whatever happened to each process.

Under ``jax.distributed`` every process of a run calls ``finish`` once at its end: with
``error=None`` after success, or with the exception that stops it. The outcomes meet in the
key-value store of JAX's coordination service (the one ``jax.distributed.initialize`` starts
in process 0), not at a device barrier: a device barrier
(``multihost_utils.sync_global_devices``, an all-gather) cannot tell which process is missing
or why, ends in a raw Gloo timeout or JAX's shutdown abort, and on CPU also fails when one
process merely arrives late (measured: docs/scaling.md, "When a process fails").

Here a failure reaches the processes waiting in ``finish`` at once, and processes still
working when they call ``raise_if_failed`` (between batches): they raise ``ProcessGroupError``
naming the failed process. Each ``raise_if_failed`` call also counts as progress of its
process; a process that neither reports nor progresses for ``timeout_s`` (killed, or hung)
is named, while slow processes that still progress are waited for, however long their share
takes. Independently, JAX itself ends every process about
``heartbeat_timeout_seconds`` (an argument of ``jax.distributed.initialize``, 100 s by
default) after one stops sending heartbeats: SIGABRT, "Terminating process because the JAX
distributed service detected fatal errors". A process's exit also waits for the others at
JAX's shutdown barrier, so a run with a killed process ends by that abort even after
``finish`` has raised.

Keys live in the coordination service, which lives as long as one launch: a new launch never
sees an old one's keys. Within one launch the same name can serve several runs (a notebook
running the pipeline again after a failure): each process counts its own runs of a name, so
the n-th run of every process meets under the n-th set of keys.
"""

from __future__ import annotations

import hashlib
import time

import jax

from flax_captioner.errors import CaptionerError, ProcessGroupError

# Each blocking read is this short so that Ctrl-C, which Python handles between calls,
# stops a waiting process within a second.
_WAIT_SLICE_S = 1.0
# Messages stay one readable line on a pod of hundreds of processes.
_MAX_ERROR_CHARS = 500
_MAX_NAMED = 8


def finish(name: str, *, timeout_s: float, error: BaseException | None = None) -> None:
    """Reports this process's end of the run ``name`` and, after success, waits for the others.

    Call it once per run in every process (a no-op with one process): after success with
    ``error=None``; from an ``except``/``finally`` with the exception that stops this process,
    then re-raise that exception (this call then only reports it, and never raises).

    Args:
      name: the run, the same in every process (the pipeline passes its output path); it
        begins every message.
      timeout_s: how long a successful process waits for the others while none of the
        unfinished ones progresses (calls ``raise_if_failed``); the pipeline passes
        ``CaptionOptions.process_timeout_seconds``.
      error: what stopped this process, or None after success.

    Raises:
      ProcessGroupError: another process reported a failure (the first one reported is
        named), neither reported nor progressed for ``timeout_s``, or the coordination
        service (in process 0) became unreachable.
      ValueError: ``timeout_s`` is not positive.
    """
    if timeout_s <= 0:
        raise ValueError(f"timeout_s must be positive, got {timeout_s}")
    client = _client()
    count = jax.process_count()
    if client is None or count == 1:
        return
    index = jax.process_index()
    if error is not None:
        _report_failure(client, name, index, _one_line(error))
        return
    try:
        run = _run_key(client, name, index)
        client.key_value_set(f"{run}/process/{index}", "ok")
        if client.key_value_increment(f"{run}/finished", 1) == count:
            client.key_value_set(f"{run}/end", "ok")
        end = _wait(client, f"{run}/end", f"{run}/progress/", timeout_s)
        silent = [] if end is not None else sorted(
            set(range(count)) - {int(key.rsplit("/", 1)[1])
                                 for key, _ in client.key_value_dir_get(f"{run}/process/")})
    except jax.errors.JaxRuntimeError as service_error:
        raise ProcessGroupError(
            f"{name}: process {index} of {count} lost JAX's coordination service (process 0 "
            f"stopped?): {_one_line(service_error)}", 0) from None
    if end is None:
        # Empty only if the last process died between reporting and announcing the end.
        silent = silent or sorted(set(range(count)) - {index})
        named = ", ".join(map(str, silent[:_MAX_NAMED]))
        if len(silent) > _MAX_NAMED:
            named += f" and {len(silent) - _MAX_NAMED} more"
        processes = "process" if len(silent) == 1 else "processes"
        raise ProcessGroupError(
            f"{name}: {processes} {named} of {count} neither finished nor progressed for "
            f"{timeout_s:g} s (crashed, killed or hung?); {_remedy(index)}", silent[0])
    if end != "ok":
        raise _failed(name, end, index, count)


def raise_if_failed(name: str) -> None:
    """Raises ``ProcessGroupError`` if another process has reported a failure of the current
    run of ``name``, and counts one step of this process's progress (a no-op with one
    process).

    Two reads and an increment in the coordination service (cheap next to a batch;
    docs/scaling.md, "When a process fails"), for a long run to call between batches: otherwise
    a process hears of a failure only at ``finish``, or is aborted by JAX about
    ``shutdown_timeout_seconds`` (300 s) after the failed process exits; and processes waiting
    in ``finish`` see that this one is alive.
    """
    client = _client()
    count = jax.process_count()
    if client is None or count == 1:
        return
    index = jax.process_index()
    base = _base_key(name)
    try:
        finished_runs = int(client.key_value_try_get(f"{base}/runs/{index}"))
    except jax.errors.JaxRuntimeError:  # NOT_FOUND: this is the first run of ``name``
        finished_runs = 0
    run = f"{base}/{finished_runs + 1}"
    try:
        client.key_value_increment(f"{run}/progress/{index}", 1)
        end = client.key_value_try_get(f"{run}/end")
    except jax.errors.JaxRuntimeError:  # NOT_FOUND: nobody failed (an unreachable service is
        return                          # left to ``finish``, which waits and names it)
    if end != "ok":
        raise _failed(name, end, index, count)


def _client():
    """The coordination service client of ``jax.distributed.initialize``, or None.

    jax 0.10 has no public key-value API; ``multihost_utils`` uses this same object.
    """
    from jax._src import distributed

    return distributed.global_state.client


def _base_key(name: str) -> str:
    # Hashed: names are paths, and '/' separates key directories.
    return "flax_captioner/" + hashlib.sha256(name.encode()).hexdigest()[:24]


def _run_key(client, name: str, index: int) -> str:
    """The keys of this process's current run of ``name``: the n-th ``finish`` call of every
    process for ``name`` gets the n-th prefix."""
    base = _base_key(name)
    return f"{base}/{client.key_value_increment(f'{base}/runs/{index}', 1)}"


def _failed(name: str, end: str, index: int, count: int) -> ProcessGroupError:
    """The error for a run whose end key holds a failure ("<process>\n<reason>")."""
    failed, reason = end.split("\n", 1)
    return ProcessGroupError(
        f"{name}: process {failed} of {count} failed: {reason}; {_remedy(index)}", int(failed))


def _remedy(index: int) -> str:
    return f"process {index} stopped, keeping its work; run every process again to resume"


def _report_failure(client, name: str, index: int, reason: str) -> None:
    try:
        run = _run_key(client, name, index)
        client.key_value_set(f"{run}/process/{index}", "failed")
        # The first failure is the one every process names; later ones find the key taken.
        client.key_value_set(f"{run}/end", f"{index}\n{reason}")
    except jax.errors.JaxRuntimeError:
        # The caller re-raises its own error, which says more than an unreachable service.
        pass


def _wait(client, key: str, progress: str, timeout_s: float) -> str | None:
    """The value of ``key`` once it is set, or None once nothing under the key directory
    ``progress`` has changed for ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    seen = sorted(client.key_value_dir_get(progress))
    while True:
        remaining = deadline - time.monotonic()
        try:
            return client.blocking_key_value_get(
                key, max(1, round(min(remaining, _WAIT_SLICE_S) * 1000)))
        except jax.errors.JaxRuntimeError as error:
            if "DEADLINE_EXCEEDED" not in str(error):
                raise
        counts = sorted(client.key_value_dir_get(progress))
        if counts != seen:
            deadline, seen = time.monotonic() + timeout_s, counts
        elif deadline - time.monotonic() <= 0:
            return None


def _one_line(error: BaseException) -> str:
    """``error`` as one bounded line (its type named unless it is one of ours)."""
    if isinstance(error, KeyboardInterrupt):
        text = "interrupted"
    elif isinstance(error, CaptionerError):
        text = str(error)
    else:
        text = f"{type(error).__name__}: {error}"
    line = " ".join(text.split("\n", 1)[0].split()) or type(error).__name__
    return line if len(line) <= _MAX_ERROR_CHARS else line[:_MAX_ERROR_CHARS - 3] + "..."
