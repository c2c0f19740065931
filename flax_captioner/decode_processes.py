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
import time
from collections.abc import Callable
from multiprocessing.connection import Connection, wait
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


# Images each process holds at once, each over a channel (a pipe and a slot) of its own: while
# the caller takes one image's pixels and sends the next, the process decodes the other
# instead of waiting on the caller's threads.
CHANNELS_PER_PROCESS = 2


class DecodeProcesses:
    """``workers`` decoding processes, each serving ``CHANNELS_PER_PROCESS`` channels (a pipe
    and a shared-memory pixel slot each).

    ``decode`` may be called from up to ``channels`` threads at once; each call has a channel
    to itself. ``close`` ends the processes and frees the shared memory. A process reports an
    image that converting to RGB clips with its answer, and the calling thread hands that
    report to ``on_clipped`` (a run's ``ClippingWarning``: one warning per run, not per
    process).
    """

    def __init__(self, workers: int, config: PreprocessConfig, decoding: ImageDecoding, *,
                 on_clipped: OnClipped | None = None):
        self._on_clipped = on_clipped
        self.channels = workers * CHANNELS_PER_PROCESS
        height, width = config.size
        # do_resize=False leaves each image its own size: its pixels travel through the pipe.
        slot_bytes = (CANVAS_SIDES[-1] ** 2 * 3 if decoding.device_resize
                      else 3 * height * width * 4 if config.do_resize else 0)
        memory_bytes = max(self.channels * slot_bytes, 1)
        # In memory where there is a memory file system (/dev/shm), unlinked at once.
        with tempfile.TemporaryFile(dir="/dev/shm" if os.path.isdir("/dev/shm") else None,
                                    prefix="flax-captioner-decode-") as memory_file:
            memory_file.truncate(memory_bytes)
            self._memory = mmap.mmap(memory_file.fileno(), memory_bytes)
            self._slots = _slots(self._memory, self.channels, slot_bytes)
            # Channel c belongs to process c % workers: the first ``workers`` channels taken
            # are on distinct processes.
            connections: dict[int, Connection] = {}
            self._processes: list[subprocess.Popen] = []
            for worker in range(workers):
                channels = range(worker, self.channels, workers)
                pairs = [socket.socketpair() for _ in channels]
                self._processes.append(_start_worker([theirs.fileno() for _, theirs in pairs],
                                                     memory_file.fileno()))
                for channel, (ours, theirs) in zip(channels, pairs):
                    theirs.close()
                    connections[channel] = Connection(ours.detach())
                    connections[channel].send((memory_bytes, self.channels, slot_bytes,
                                               channel, config, decoding))
            self._connections = [connections[channel] for channel in range(self.channels)]
        self._idle: queue.SimpleQueue = queue.SimpleQueue()
        for channel in range(self.channels):
            self._idle.put(channel)
        self._broken: str | None = None

    def decode(self, source: Any, name: str | None) -> tuple[np.ndarray, float]:
        """``decode_function(decoding)(source, config, name=name, decoding=decoding)`` on a
        worker process, with the pool's ``config`` and ``decoding``: float32[3, H, W]
        (uint8[h, w, 3] with ``decoding.device_resize``), and the seconds the process spent
        on it.

        Raises:
          ImageReadError: as ``load_and_preprocess_one``.
          CaptionerError: a worker process died; it names the image that process was
            decoding, and every later call raises it too (the pool cannot go on).
        """
        channel = self._idle.get()
        while_doing = f"before it got {name}"
        try:
            if self._broken is not None:
                raise CaptionerError(self._broken)
            connection = self._connections[channel]
            try:
                connection.send((source, name))  # a source that does not pickle raises here
                while_doing = f"while decoding {name}"
                kind, value, clipped, seconds = connection.recv()
            except (EOFError, OSError):
                process = self._processes[channel % len(self._processes)]
                self._broken = f"a decoding process {_ending(process)} {while_doing}"
                raise CaptionerError(self._broken) from None
        finally:
            self._idle.put(channel)
        if clipped is not None and self._on_clipped is not None:
            self._on_clipped(*clipped)
        if kind == "error":
            raise value
        if kind == "pixels":  # larger than a slot: sent whole
            return value, seconds
        shape, dtype = value
        size = math.prod(shape) * np.dtype(dtype).itemsize
        return self._slots[channel, :size].view(dtype).reshape(shape).copy(), seconds

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
                "_serve([int(fd) for fd in sys.argv[1].split(',')], int(sys.argv[2]))")


# glibc's allocator in a worker: images up to 32 MB come from the heap, whose top stays
# mapped, instead of fresh pages the kernel zeroes for every image (which left decoding to
# the luck of how allocations interleave; docs/performance.md, "Decode processes vs threads").
_WORKER_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(128 << 20)}


def _start_worker(connection_fds: list[int], memory_fd: int) -> subprocess.Popen:
    """A worker process serving the pipes ``connection_fds`` with the memory file
    ``memory_fd``. In a session of its own, so a terminal's Ctrl-C reaches the caller only
    (which ends the workers by closing their pipes)."""
    return subprocess.Popen(
        [sys.executable, "-c", _WORKER_MAIN, ",".join(map(str, connection_fds)),
         str(memory_fd), *(entry for entry in sys.path if isinstance(entry, str))],
        pass_fds=(*connection_fds, memory_fd), stdin=subprocess.DEVNULL,
        start_new_session=True, env={**os.environ, **_WORKER_MALLOC})


def _ending(process: subprocess.Popen) -> str:
    """How a decoding process that stopped answering ended, in words."""
    try:
        process.wait(timeout=1)
    except subprocess.TimeoutExpired:
        return "stopped answering"
    if process.returncode < 0:
        return f"was killed by {signal.Signals(-process.returncode).name}"
    return f"ended abruptly (exit status {process.returncode})"


def _slots(memory: mmap.mmap, channels: int, slot_bytes: int) -> np.ndarray:
    """The pool's shared memory as both sides see it: uint8[channels, slot_bytes]."""
    return np.ndarray((channels, slot_bytes), np.uint8, buffer=memory)


def _serve(connection_fds: list[int], memory_fd: int) -> None:
    """A worker process (``_WORKER_MAIN``): takes each channel's memory size, slot and
    preprocessing from its first message, then, one image at a time from whichever channel has
    one, decodes each (source, name) into that channel's slot and answers ("shape", (shape,
    dtype), clipped, seconds), ("pixels", pixels, clipped, seconds) when they do not fit the
    slot, or ("error", the exception, None, seconds); ``clipped`` is None, or the (name, mode,
    low, high) of an image that converting to RGB clips, for the caller's ``on_clipped``.
    A channel ends on None or when its pipe closes; the process, when all have."""
    slots: dict[Connection, tuple[np.ndarray, PreprocessConfig, ImageDecoding]] = {}
    memory = None
    for fd in connection_fds:
        connection = Connection(fd)
        try:
            memory_bytes, channels, slot_bytes, channel, config, decoding = connection.recv()
        except EOFError:  # the caller has gone before the first message
            continue
        if memory is None:
            memory = mmap.mmap(memory_fd, memory_bytes)
        slots[connection] = _slots(memory, channels, slot_bytes)[channel], config, decoding
    os.close(memory_fd)
    while slots:
        for connection in wait(list(slots)):
            try:
                request = connection.recv()
            except EOFError:  # the caller has gone
                request = None
            if request is None:
                del slots[connection]
                connection.close()
                continue
            slot, config, decoding = slots[connection]
            connection.send(_decode_into(slot, request, config, decoding))


def _decode_into(slot: np.ndarray, request: tuple[Any, str | None], config: PreprocessConfig,
                 decoding: ImageDecoding) -> tuple[str, Any, Any, float]:
    """One request's answer (``_serve``), its pixels written into ``slot`` where they fit."""
    source, name = request
    started = time.perf_counter()
    clipped = []
    # Preprocessed pixels go straight into the slot; decoded ones are PIL's array, copied.
    into = ({} if decoding.device_resize or not config.do_resize else
            {"out": slot.view(np.float32).reshape(3, *config.size)})
    try:
        pixels = decode_function(decoding)(source, config, name=name, decoding=decoding,
                                           on_clipped=lambda *report: clipped.append(report),
                                           **into)
    except Exception as error:  # raised again by the calling thread
        return "error", error, None, time.perf_counter() - started
    report = clipped[0] if clipped else None
    if pixels.nbytes > slot.size:
        return "pixels", pixels, report, time.perf_counter() - started
    if not into:
        slot[:pixels.nbytes] = np.ascontiguousarray(pixels).reshape(-1).view(np.uint8)
    return "shape", (pixels.shape, pixels.dtype.str), report, time.perf_counter() - started
