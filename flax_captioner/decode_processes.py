"""Image decoding on worker processes: the feed's CPU work, out of reach of the GIL.

Decode threads scale until the GIL binds, processes do not; so with more than
``THREADS_UP_TO`` decode workers the command line decodes in processes.

Each decode thread hands its image to a process of its own and waits for it (without holding
the GIL), over a pipe of their own: only the source (a path or encoded bytes) and the image's
name go one way, its pixels' shape and dtype the other. The process writes the pixels into a
shared-memory slot of its own, since pixels sent back through a pipe cap the rate, and a
``concurrent.futures`` pool would pass each image through two more threads of the caller.
Measurements: docs/performance.md, "Decode processes vs threads".

The processes are fresh interpreters running this module (``subprocess``), not
``multiprocessing``'s: its spawn and forkserver start methods import the caller's main script
again in every process (a script that imports JAX paid seconds per process, and had to keep
its work under ``if __name__ == "__main__":``), and fork would copy the locks of JAX's threads
mid-use. The shared memory is an unlinked temporary file, mapped by both sides: nothing is
left behind even when the caller is killed.

This module imports no JAX: the worker processes import it, not the rest of the package.
"""

from __future__ import annotations

import math
import mmap
import os
import queue
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

from flax_captioner.errors import CaptionerError
from flax_captioner.preprocess import (CANVAS_SIDES, ImageDecoding, OnClipped,
                                       PreprocessConfig, load_and_preprocess_one,
                                       load_decoded_one)

# Decode workers up to which threads decode as fast as processes, without the processes'
# start-up and memory (docs/performance.md, "Decode processes vs threads").
THREADS_UP_TO = 4


def decode_function(decoding: ImageDecoding) -> Callable[..., np.ndarray]:
    """What a decode worker runs on each image: ``load_decoded_one`` when the device resizes
    (``decoding.device_resize``), else ``load_and_preprocess_one``."""
    return load_decoded_one if decoding.device_resize else load_and_preprocess_one


def use_processes(workers: int) -> bool:
    """Whether ``workers`` decode workers run faster as processes than as threads."""
    return workers > THREADS_UP_TO


class DecodeProcesses:
    """``workers`` decoding processes, each with a pipe and a shared-memory pixel slot.

    ``decode`` may be called from up to ``workers`` threads at once; each call has a process
    to itself. ``close`` ends the processes and frees the shared memory. A process reports an
    image that converting to RGB clips with its answer, and the calling thread hands that
    report to ``on_clipped`` (a run's ``ClippingWarning``: one warning per run, not per
    process).
    """

    def __init__(self, workers: int, config: PreprocessConfig, decoding: ImageDecoding, *,
                 on_clipped: OnClipped | None = None):
        self._on_clipped = on_clipped
        height, width = config.size
        # do_resize=False leaves each image its own size: its pixels travel through the pipe.
        slot_bytes = (CANVAS_SIDES[-1] ** 2 * 3 if decoding.device_resize
                      else 3 * height * width * 4 if config.do_resize else 0)
        memory_bytes = max(workers * slot_bytes, 1)
        # In memory where there is a memory file system (/dev/shm), unlinked at once.
        with tempfile.TemporaryFile(dir="/dev/shm" if os.path.isdir("/dev/shm") else None,
                                    prefix="flax-captioner-decode-") as memory_file:
            memory_file.truncate(memory_bytes)
            self._memory = mmap.mmap(memory_file.fileno(), memory_bytes)
            self._slots = _slots(self._memory, workers, slot_bytes)
            self._connections: list[Connection] = []
            self._processes: list[subprocess.Popen] = []
            for worker in range(workers):
                ours, theirs = socket.socketpair()
                with theirs:
                    self._processes.append(_start_worker(theirs.fileno(),
                                                         memory_file.fileno()))
                connection = Connection(ours.detach())
                connection.send((memory_bytes, workers, slot_bytes, worker, config, decoding))
                self._connections.append(connection)
        self._idle: queue.SimpleQueue = queue.SimpleQueue()
        for worker in range(workers):
            self._idle.put(worker)
        self._broken: str | None = None

    def decode(self, source: Any, name: str | None) -> np.ndarray:
        """``decode_function(decoding)(source, config, name=name, decoding=decoding)`` on a
        worker process, with the pool's ``config`` and ``decoding``: float32[3, H, W]
        (uint8[h, w, 3] with ``decoding.device_resize``).

        Raises:
          ImageReadError: as ``load_and_preprocess_one``.
          CaptionerError: a worker process died; it names the image that process was
            decoding, and every later call raises it too (the pool cannot go on).
        """
        worker = self._idle.get()
        while_doing = f"before it got {name}"
        try:
            if self._broken is not None:
                raise CaptionerError(self._broken)
            connection = self._connections[worker]
            try:
                connection.send((source, name))  # a source that does not pickle raises here
                while_doing = f"while decoding {name}"
                kind, value, clipped = connection.recv()
            except (EOFError, OSError):
                self._broken = (f"a decoding process {_ending(self._processes[worker])} "
                                f"{while_doing}")
                raise CaptionerError(self._broken) from None
        finally:
            self._idle.put(worker)
        if clipped is not None and self._on_clipped is not None:
            self._on_clipped(*clipped)
        if kind == "error":
            raise value
        if kind == "pixels":  # larger than a slot: sent whole
            return value
        shape, dtype = value
        size = math.prod(shape) * np.dtype(dtype).itemsize
        return self._slots[worker, :size].view(dtype).reshape(shape).copy()

    def close(self) -> None:
        for connection in self._connections:
            try:
                connection.send(None)
            except OSError:  # its process has died
                pass
            connection.close()
        for process in self._processes:
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        del self._slots
        self._memory.close()


# A worker: this module on an interpreter of its own, with the caller's import path.
_WORKER_MAIN = ("import sys; sys.path[:] = sys.argv[3:]; "
                "from flax_captioner.decode_processes import _serve; "
                "_serve(int(sys.argv[1]), int(sys.argv[2]))")


def _start_worker(connection_fd: int, memory_fd: int) -> subprocess.Popen:
    """A worker process serving the pipe ``connection_fd`` with the memory file ``memory_fd``.
    In a session of its own, so a terminal's Ctrl-C reaches the caller only (which ends the
    workers by closing their pipes)."""
    return subprocess.Popen(
        [sys.executable, "-c", _WORKER_MAIN, str(connection_fd), str(memory_fd), *sys.path],
        pass_fds=(connection_fd, memory_fd), stdin=subprocess.DEVNULL,
        start_new_session=True)


def _ending(process: subprocess.Popen) -> str:
    """How a decoding process that stopped answering ended, in words."""
    try:
        process.wait(timeout=1)
    except subprocess.TimeoutExpired:
        return "stopped answering"
    if process.returncode < 0:
        return f"was killed by {signal.Signals(-process.returncode).name}"
    return f"ended abruptly (exit status {process.returncode})"


def _slots(memory: mmap.mmap, workers: int, slot_bytes: int) -> np.ndarray:
    """The pool's shared memory as both sides see it: uint8[workers, slot_bytes]."""
    return np.ndarray((workers, slot_bytes), np.uint8, buffer=memory)


def _serve(connection_fd: int, memory_fd: int) -> None:
    """A worker process (``_WORKER_MAIN``): takes its memory size, slot and preprocessing from
    the first message, then decodes each (source, name) it receives into slot ``worker`` and
    answers ("shape", (shape, dtype), clipped), ("pixels", pixels, clipped) when they do not
    fit the slot, or ("error", the exception, None); ``clipped`` is None, or the (name, mode,
    low, high) of an image that converting to RGB clips, for the caller's ``on_clipped``.
    Ends on None or when the pipe closes."""
    connection = Connection(connection_fd)
    try:
        memory_bytes, workers, slot_bytes, worker, config, decoding = connection.recv()
    except EOFError:  # the caller has gone before the first message
        return
    memory = mmap.mmap(memory_fd, memory_bytes)
    os.close(memory_fd)
    slot = _slots(memory, workers, slot_bytes)[worker]
    decode = decode_function(decoding)
    try:
        while (request := connection.recv()) is not None:
            source, name = request
            clipped = []
            try:
                pixels = decode(source, config, name=name, decoding=decoding,
                                on_clipped=lambda *report: clipped.append(report))
            except Exception as error:  # raised again by the calling thread
                connection.send(("error", error, None))
                continue
            report = clipped[0] if clipped else None
            if pixels.nbytes > slot.size:
                connection.send(("pixels", pixels, report))
            else:
                slot[:pixels.nbytes] = np.ascontiguousarray(pixels).reshape(-1).view(np.uint8)
                connection.send(("shape", (pixels.shape, pixels.dtype.str), report))
    except EOFError:  # the caller has gone
        pass
    finally:
        del slot
        memory.close()
