"""Image decoding on worker processes: the feed's CPU work, out of reach of the GIL.

Decode threads scale until the GIL binds. Measured with scripts/accelerator_benchmark.py
(part 4, 640x480 JPEGs, exact decode) on the 16-core host of an H200 machine (Intel Xeon),
2026-11-27, images/s at 1 / 2 / 4 / 8 / 16 workers: threads 158 / 331 / 533 / 812 / 559,
processes 178 / 282 / 579 / 1,083 / 2,108. So with more than ``THREADS_UP_TO`` decode workers
the command line decodes in processes.

Each decode thread then hands its image to a process and waits for it (without holding the
GIL). The process writes the pixels into a shared-memory slot that the thread owns, so only
the source (a path or encoded bytes) and a slot number cross the pool's pipe. Pixels sent back
through the pipe capped the pool at ~1,050 images/s on a 2-core AMD EPYC (Zen 4), slots at
~4,500 (float32[3, 224, 224] each, 2026-11-27).

This module imports no JAX: the worker processes import it, not the rest of the package.
"""

from __future__ import annotations

import concurrent.futures
import math
import multiprocessing
import queue
from multiprocessing import shared_memory
from typing import Any

import numpy as np

from flax_captioner.errors import CaptionerError
from flax_captioner.preprocess import ImageDecoding, PreprocessConfig, load_and_preprocess_one

# Decode workers up to which threads decode as fast as processes (see above: 533 vs 579
# images/s at 4), without the processes' start-up and memory.
THREADS_UP_TO = 4


def use_processes(workers: int) -> bool:
    """Whether ``workers`` decode workers run faster as processes than as threads."""
    return workers > THREADS_UP_TO


class DecodeProcesses:
    """A pool of decoding processes with one shared-memory pixel slot per calling thread.

    ``decode`` may be called from up to ``workers`` threads at once; ``close`` ends the
    processes and frees the shared memory.
    """

    def __init__(self, workers: int, config: PreprocessConfig, decoding: ImageDecoding):
        height, width = config.size
        # do_resize=False leaves each image its own size: its pixels travel through the pipe.
        self._slot_floats = 3 * height * width if config.do_resize else 0
        self._memory = shared_memory.SharedMemory(
            create=True, size=workers * (self._slot_floats * 4 + 1))
        self._slots, self._busy = _shared_views(self._memory, workers, self._slot_floats)
        self._names: list[str | None] = [None] * workers
        self._free: queue.SimpleQueue = queue.SimpleQueue()
        for slot in range(workers):
            self._free.put(slot)
        # Not fork: it would copy the locks of JAX's threads mid-use. Like spawn, forkserver
        # starts each process by importing the caller's main script again (as __mp_main__),
        # so that script must keep its work under ``if __name__ == "__main__":``.
        context = multiprocessing.get_context("forkserver")
        self._pool = concurrent.futures.ProcessPoolExecutor(
            workers, mp_context=context, initializer=_attach,
            initargs=(self._memory.name, workers, self._slot_floats, config, decoding))

    def decode(self, source: Any, name: str | None) -> np.ndarray:
        """``load_and_preprocess_one(source, config, name=name, decoding=decoding)`` on a
        worker process, with the pool's ``config`` and ``decoding``: float32[3, H, W].

        Raises:
          ImageReadError: as ``load_and_preprocess_one``.
          CaptionerError: a worker process died (the pool cannot go on), naming the images
            it may have been decoding.
        """
        slot = self._free.get()
        self._names[slot] = name
        self._busy[slot] = 1  # the process clears it when done with the image
        try:
            try:
                shape = self._pool.submit(_decode_into_slot, slot, source, name).result()
            except concurrent.futures.process.BrokenProcessPool:
                # busy stays set, so every thread the break reaches names the same suspects.
                suspects = sorted(str(self._names[s]) for s in np.flatnonzero(self._busy))
                images = suspects[0] if len(suspects) == 1 else "one of " + ", ".join(suspects)
                raise CaptionerError(
                    f"a decoding process ended abruptly while decoding {images} (a script "
                    "that decodes in processes must keep its work under "
                    "'if __name__ == \"__main__\":')") from None
            except BaseException:  # e.g. a source that does not pickle: no process saw it
                self._busy[slot] = 0
                raise
            if isinstance(shape, np.ndarray):  # larger than a slot: sent whole
                return shape
            return self._slots[slot, :math.prod(shape)].reshape(shape).copy()
        finally:
            self._free.put(slot)

    def close(self) -> None:
        self._pool.shutdown(cancel_futures=True)
        self._memory.close()
        self._memory.unlink()


def _shared_views(memory: shared_memory.SharedMemory, workers: int,
                  slot_floats: int) -> tuple[np.ndarray, np.ndarray]:
    """The pool's shared memory as both sides see it: float32[workers, slot_floats] pixel
    slots, then uint8[workers] busy flags. A busy flag is 1 from an image's submission until a
    process has finished with it: when a process dies, the pool fails every pending image at
    once, and the busy ones are the suspects."""
    slots = np.ndarray((workers, slot_floats), np.float32, buffer=memory.buf)
    busy = np.ndarray((workers,), np.uint8, buffer=memory.buf, offset=slots.nbytes)
    return slots, busy


# Worker-process side: the slots, preprocessing and decoding of this process's pool, set once
# by the pool's initializer, so each image sends only its source and slot through the pipe.
_WORKER: dict[str, Any] = {}


def _attach(memory_name: str, workers: int, slot_floats: int, config: PreprocessConfig,
            decoding: ImageDecoding) -> None:
    memory = shared_memory.SharedMemory(name=memory_name)
    _WORKER["memory"] = memory  # keeps the mapping alive
    _WORKER["slots"], _WORKER["busy"] = _shared_views(memory, workers, slot_floats)
    _WORKER["config"], _WORKER["decoding"] = config, decoding


def _decode_into_slot(slot: int, source: Any, name: str | None) -> tuple[int, ...] | np.ndarray:
    """Decodes into ``slot`` and returns the pixels' shape, or the pixels when they do not
    fit a slot."""
    try:
        pixels = load_and_preprocess_one(source, _WORKER["config"], name=name,
                                         decoding=_WORKER["decoding"])
    finally:  # this image did not end the process, whatever happens to the pool next
        _WORKER["busy"][slot] = 0
    slots = _WORKER["slots"]
    if pixels.size > slots.shape[1]:
        return pixels
    slots[slot, :pixels.size] = pixels.ravel()
    return pixels.shape
